"""A model served whole and split across processes, side by side: time to first token and
decode tokens/s as a client sees them (the OpenAI API, streaming, greedy). Prints one JSON line
per server and case.

Usage: python3 split_bench.py RUNS MAX_TOKENS NAME=URL=HOPS [NAME=URL=HOPS ...]

HOPS is the number of stages the server's calls cross (0 for a whole model). Cases:
- `short`: a new 42-token chat each run, MAX_TOKENS tokens;
- `long`: a new chat of about 256 tokens each run, 8 tokens (its first token is the prefill).
After the runs, each split server's per-hop overhead per decoded token against the first
server (which must be the whole model) is printed. Standard library only.
"""
import json
import statistics
import sys
import time
import urllib.request

runs, max_tokens = int(sys.argv[1]), int(sys.argv[2])
servers = [arg.split("=", 2) for arg in sys.argv[3:]]

TOPICS = ["a lighthouse keeper", "a clockmaker", "a desert fox", "a violinist", "a glacier",
          "a night train", "a beekeeper", "a cartographer", "a chess player", "a volcano"]


def long_prompt(run):
    notes = " ".join(f"Note {i}: the keeper lit lamp {i + run} at dusk and logged the wind."
                     for i in range(12))
    return f"Summarize these notes in one sentence. {notes}"


def stream(url, messages, tokens):
    body = json.dumps({"model": "smol", "messages": messages, "max_tokens": tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first, n, usage = None, 0, None
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    n += 1
                    first = first or time.perf_counter()
    total = time.perf_counter()
    first = first or total
    n = usage["completion_tokens"] if usage else n
    return (first - start) * 1000, (n - 1) / (total - first) if n > 1 else 0.0


decode = {}
for name, url, hops in servers:
    short, long = [], []
    for run in range(runs + 1):
        topic = TOPICS[run % len(TOPICS)]
        s = stream(url, [{"role": "user", "content": f"Write a long story about {topic} ({run})."}],
                   max_tokens)
        l = stream(url, [{"role": "user", "content": long_prompt(run)}], 8)
        if run:
            short.append(s)
            long.append(l)
    decode[name] = (statistics.median(s[1] for s in short), int(hops))
    for case, samples in (("short", short), ("long", long)):
        print(json.dumps({"bench": "split", "server": name, "hops": int(hops), "case": case,
                          "runs": runs, "ttft_p50_ms": statistics.median(s[0] for s in samples),
                          "decode_tokens_per_s_median": statistics.median(s[1] for s in samples)}),
              flush=True)
base_tps, _ = decode[servers[0][0]]
for name, (tps, hops) in decode.items():
    if hops:
        per_hop_us = (1 / tps - 1 / base_tps) / hops * 1e6
        print(json.dumps({"bench": "split-overhead", "server": name, "hops": hops,
                          "per_hop_per_token_us": round(per_hop_us)}), flush=True)
