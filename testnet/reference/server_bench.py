"""Two OpenAI-compatible servers streaming the same chats, as a user's client sees them: time
to first token and decode tokens/s over HTTP, greedy. Prints one JSON line per server and case.

Usage: python3 server_bench.py RUNS MAX_TOKENS NAME=URL=MODEL [NAME=URL=MODEL ...]

Cases, in this order, for each server in turn:
- `fresh`: a chat this server has not seen (a new question each run; the chat template's
  system prompt is shared, as in any real use);
- `repeat`: the last chat sent again;
- `extend`: the last chat with its answer and one more question (a chat's next turn).
Standard library only.
"""
import json
import statistics
import sys
import time
import urllib.request

runs, max_tokens = int(sys.argv[1]), int(sys.argv[2])
servers = [arg.split("=", 2) for arg in sys.argv[3:]]

TOPICS = ["a lighthouse keeper", "a clockmaker", "a desert fox", "a violinist", "a glacier",
          "a night train", "a beekeeper", "a cartographer", "a chess player", "a volcano",
          "a tailor", "a kite"]


def stream(url, model, messages, tokens):
    body = json.dumps({"model": model, "messages": messages, "max_tokens": tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first, n, text, usage = None, 0, [], None
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
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    n += 1
                    text.append(piece)
                    if first is None:
                        first = time.perf_counter()
    total = time.perf_counter()
    first = first or total
    # Tokens, when the server reports them; else one per streamed delta.
    n = usage["completion_tokens"] if usage else n
    return (first - start) * 1000, (n - 1) / (total - first) if n > 1 else 0.0, "".join(text)


for name, url, model in servers:
    results = {"fresh": [], "repeat": [], "extend": []}
    for run in range(runs + 1):
        topic = TOPICS[run % len(TOPICS)]
        chat = [{"role": "user", "content": f"Write a long story about {topic} ({run})."}]
        fresh = stream(url, model, chat, max_tokens)
        repeat = stream(url, model, chat, max_tokens)
        longer = chat + [{"role": "assistant", "content": repeat[2]},
                         {"role": "user", "content": "Now tell it again, shorter."}]
        extend = stream(url, model, longer, max_tokens)
        if run == 0:
            continue  # warm-up
        results["fresh"].append(fresh)
        results["repeat"].append(repeat)
        results["extend"].append(extend)
    for case, samples in results.items():
        print(json.dumps({"bench": "server", "server": name, "case": case, "runs": runs,
                          "ttft_p50_ms": statistics.median(s[0] for s in samples),
                          "decode_tokens_per_s_median": statistics.median(s[1] for s in samples)}),
              flush=True)
