"""llama.cpp on the same GGUF, same prompt text, same thread count: time to first token and
decode tokens/s, greedy. Prints one JSON line.

Usage: python3 llama_cpp_bench.py MODEL.gguf PROMPT_FILE MAX_TOKENS RUNS THREADS
"""
import json
import statistics
import sys
import time

import llama_cpp

model_path, prompt_file, max_tokens, runs, threads = sys.argv[1:6]
prompt = open(prompt_file, encoding="utf-8").read()
llm = llama_cpp.Llama(model_path=model_path, n_threads=int(threads), n_threads_batch=int(threads),
                      n_ctx=2048, verbose=False)
ttft, tps, counts = [], [], []
for run in range(int(runs) + 1):
    llm.reset()
    start = time.perf_counter()
    first = None
    n = 0
    for _ in llm.create_completion(prompt, max_tokens=int(max_tokens), temperature=0.0,
                                   top_k=1, stream=True):
        n += 1
        if first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    if run == 0:
        continue  # warm-up
    ttft.append(first * 1000)
    tps.append((n - 1) / (total - first))
    counts.append(n)
print(json.dumps({"bench": "generate", "engine": "llama.cpp " + llama_cpp.__version__,
                  "threads": int(threads), "completion_tokens": counts[-1], "runs": int(runs),
                  "ttft_p50_ms": statistics.median(ttft),
                  "decode_tokens_per_s_median": statistics.median(tps)}))
