"""sentence-transformers with all-MiniLM-L6-v2 from the same files: embeddings/s at batch
sizes 1, 8 and 32 on the CPU, same sentences as mesh-bench. Prints JSON lines.

Usage: python3 sentence_transformers_bench.py MODEL_DIR SECONDS THREADS
"""
import json
import sys
import time

import torch
from sentence_transformers import SentenceTransformer

model_dir, seconds, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse along the beach at sunset.",
    "A woman is playing the violin in front of a small audience.",
    "Two men pushed carts through the woods while it was raining.",
    "A monkey is playing drums.",
    "The new movie is awesome for kids and their parents alike.",
]
model = SentenceTransformer(model_dir, device="cpu")
a, b = model.encode(SENTENCES[:2], normalize_embeddings=True)
print(json.dumps({"bench": "embed-check", "engine": "sentence-transformers",
                  "cosine_food_bread": float(a @ b)}))
for batch in (1, 8, 32):
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    model.encode(texts, batch_size=batch, normalize_embeddings=True)
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        done += len(model.encode(texts, batch_size=batch, normalize_embeddings=True))
    print(json.dumps({"bench": "embed", "engine": "sentence-transformers " +
                      __import__("sentence_transformers").__version__, "batch": batch,
                      "embeddings_per_s": done / (time.perf_counter() - start)}))
