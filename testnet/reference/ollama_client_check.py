"""Drives a mesh node's Ollama API with the official `ollama` Python client, plus a strict
read of the raw NDJSON stream. Prints one JSON object with what it saw.

Usage: python3 ollama_client_check.py HOST CHAT_MODEL EMBED_MODEL [--default-host]
With --default-host, `list` is also asked of a client made without a host (Ollama's
default, 127.0.0.1:11434), which the node must be serving.
"""
import json
import sys
import urllib.request

import ollama

host, chat_model, embed_model = sys.argv[1:4]
client = ollama.Client(host=host, timeout=120)
out = {}
if "--default-host" in sys.argv:
    out["default_host_models"] = sorted(m.model for m in ollama.Client().list().models)
# The Python client has no version call: read the route as Ollama tools do.
with urllib.request.urlopen(host + "/api/version", timeout=30) as resp:
    out["version"] = json.loads(resp.read())["version"]

listed = client.list()
out["models"] = sorted(m.model for m in listed.models)
out["list_details"] = {m.model: m.details.family for m in listed.models}
out["ps"] = sorted((m.model, m.context_length) for m in client.ps().models)

shown = client.show(chat_model)
out["show"] = {"family": shown.details.family, "capabilities": list(shown.capabilities),
               "parameter_size": shown.details.parameter_size, "modelinfo": dict(shown.modelinfo)}
out["show_tagged"] = list(client.show(chat_model + ":latest").capabilities)

question = [{"role": "user", "content": "Name the capital of France."}]
greedy = {"temperature": 0, "num_predict": 24}
r = client.chat(model=chat_model, messages=question, options=greedy)
out["chat"] = {"text": r.message.content, "role": r.message.role, "done": r.done,
               "done_reason": r.done_reason, "model": r.model,
               "eval_count": r.eval_count, "prompt_eval_count": r.prompt_eval_count,
               "total_duration": r.total_duration, "load_duration": r.load_duration,
               "prompt_eval_duration": r.prompt_eval_duration, "eval_duration": r.eval_duration}
tagged = client.chat(model=chat_model + ":latest", messages=question, options=greedy)
out["chat_tagged"] = tagged.message.content

parts = list(client.chat(model=chat_model, messages=question, options=greedy, stream=True))
out["stream"] = {"text": "".join(p.message.content for p in parts), "chunks": len(parts),
                 "done": [p.done for p in parts], "done_reason": parts[-1].done_reason,
                 "eval_count": parts[-1].eval_count}

g = client.generate(model=chat_model, prompt="Name the capital of France.", options=greedy)
out["generate"] = {"text": g.response, "done_reason": g.done_reason, "eval_count": g.eval_count}
gs = list(client.generate(model=chat_model, prompt="Name the capital of France.",
                          options=greedy, stream=True))
out["generate_stream"] = "".join(p.response for p in gs)
short = client.generate(model=chat_model, prompt="Count: one, two,", raw=True,
                        options={"temperature": 0, "num_predict": 3})
out["generate_raw"] = {"text": short.response, "done_reason": short.done_reason,
                       "eval_count": short.eval_count}

e = client.embed(model=embed_model, input=["A man is eating food.", "A man is eating a piece of bread."])
a, b = e.embeddings
out["embed"] = {"count": len(e.embeddings), "dims": len(a), "model": e.model,
                "norms": [sum(x * x for x in v) ** 0.5 for v in e.embeddings],
                "cosine": sum(x * y for x, y in zip(a, b)), "prompt_eval_count": e.prompt_eval_count}
old = client.embeddings(model=embed_model, prompt="A man is eating food.")
out["embeddings"] = {"dims": len(old.embedding),
                     "same": max(abs(x - y) for x, y in zip(old.embedding, a))}

# Strict NDJSON: one JSON object per line, `done` only on the last, and the right type.
req = urllib.request.Request(host + "/api/chat", method="POST",
                             data=json.dumps({"model": chat_model, "messages": question,
                                              "options": {"temperature": 0, "num_predict": 8}}).encode())
with urllib.request.urlopen(req, timeout=120) as resp:
    raw = resp.read().decode()
    ctype = resp.headers.get("content-type", "")
assert raw.endswith("\n"), repr(raw[-40:])
lines = [json.loads(line) for line in raw.split("\n")[:-1]]
assert [x["done"] for x in lines] == [False] * (len(lines) - 1) + [True], lines
out["ndjson"] = {"content_type": ctype, "lines": len(lines)}

errors = {}
def expect(name, fn):
    try:
        fn()
        errors[name] = "no error"
    except ollama.ResponseError as e:
        errors[name] = {"status": e.status_code, "error": e.error}
expect("unknown_model", lambda: client.chat(model="no-such-model", messages=question))
expect("unknown_show", lambda: client.show("no-such-model"))
expect("bad_temperature", lambda: client.chat(model=chat_model, messages=question,
                                              options={"temperature": 5}))
expect("num_ctx_too_big", lambda: client.generate(model=chat_model, prompt="hi",
                                                  options={"num_ctx": 10_000_000}))
expect("embed_with_chat_model", lambda: client.embed(model=chat_model, input="x"))
expect("chat_with_embed_model", lambda: client.chat(model=embed_model, messages=question))
expect("stream_unknown_model", lambda: list(client.chat(model="no-such-model", messages=question,
                                                        stream=True)))
expect("pull", lambda: client.pull("smol"))
out["errors"] = errors
print(json.dumps(out))
