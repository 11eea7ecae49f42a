"""llama.cpp on the same GGUF, the same prompt texts and the same thread count as
`mesh-bench generate`: time to first token and decode tokens/s, greedy. Prints one JSON line
per case.

Usage: python3 llama_cpp_bench.py MODEL.gguf PROMPT_DIR MAX_TOKENS RUNS THREADS

PROMPT_DIR holds the texts `mesh-bench generate --prompt-dir` wrote: fresh.txt (run with
MAX_TOKENS), repeat.txt (the same prompt again, with llama.cpp's prefix reuse), long.txt and
deep.txt (about 1,000 and 2,000 tokens).
"""
import json
import os
import statistics
import sys
import time

import llama_cpp

model_path, prompt_dir, max_tokens, runs, threads = sys.argv[1:6]
llm = llama_cpp.Llama(model_path=model_path, n_threads=int(threads), n_threads_batch=int(threads),
                      n_ctx=4096, verbose=False)


def measure(prompt, tokens, reset):
    ttft, tps, counts = [], [], []
    for run in range(int(runs) + 1):
        if reset:
            llm.reset()
        start = time.perf_counter()
        first = None
        n = 0
        for _ in llm.create_completion(prompt, max_tokens=tokens, temperature=0.0, top_k=1,
                                       stream=True):
            n += 1
            if first is None:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        if run == 0:
            continue  # warm-up (and, for `repeat`, the call whose prefix is reused)
        ttft.append(first * 1000)
        tps.append((n - 1) / (total - first) if n > 1 else 0.0)
        counts.append(n)
    return {"prompt_tokens": len(llm.tokenize(prompt.encode("utf-8"), add_bos=False,
                                              special=True)),
            "completion_tokens": counts[-1], "runs": int(runs),
            "ttft_p50_ms": statistics.median(ttft),
            "decode_tokens_per_s_median": statistics.median(tps)}


cases = [("fresh", int(max_tokens), True), ("repeat", 16, False), ("long", 16, True),
         ("deep", 64, True)]
for case, tokens, reset in cases:
    path = os.path.join(prompt_dir, case + ".txt")
    if not os.path.exists(path):
        continue
    prompt = open(path, encoding="utf-8").read()
    line = {"bench": "generate", "case": case, "engine": "llama.cpp " + llama_cpp.__version__,
            "threads": int(threads)}
    line.update(measure(prompt, tokens, reset))
    print(json.dumps(line), flush=True)
