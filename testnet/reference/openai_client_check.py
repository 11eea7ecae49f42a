"""Drives a mesh node's OpenAI-compatible gateway with the official OpenAI Python client, plus
a strict read of the raw server-sent events. Prints one JSON object with what it saw.

Usage: python3 openai_client_check.py BASE_URL CHAT_MODEL EMBED_MODEL
"""
import json
import sys

import urllib.request
import openai

base, chat_model, embed_model = sys.argv[1:4]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
out = {}

out["models"] = sorted({m.id for m in client.models.list().data})

r = client.chat.completions.create(
    model=chat_model, messages=[{"role": "user", "content": "Name the capital of France."}],
    temperature=0, max_tokens=24)
out["chat"] = {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
               "usage": r.usage.model_dump() if r.usage else None, "object": r.object}

chunks = list(client.chat.completions.create(
    model=chat_model, messages=[{"role": "user", "content": "Name the capital of France."}],
    temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True}))
out["stream"] = {
    "text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
    "finish": [c.choices[0].finish_reason for c in chunks if c.choices][-1],
    "usage": next((c.usage.model_dump() for c in chunks if c.usage), None),
    "chunks": len(chunks),
}

# Strict SSE: every event is one `data: ` line and a blank line; the last is [DONE].
req = urllib.request.Request(base + "/chat/completions", method="POST",
                             headers={"content-type": "application/json"},
                             data=json.dumps({"model": chat_model, "stream": True, "temperature": 0,
                                              "max_tokens": 8,
                                              "messages": [{"role": "user", "content": "Hi"}]}).encode())
with urllib.request.urlopen(req, timeout=120) as resp:
    raw = resp.read().decode()
    ctype = resp.headers.get("content-type", "")
events = raw.split("\n\n")
assert events[-1] == "", repr(raw[-40:])
events = events[:-1]
for e in events:
    assert e.startswith("data: ") and "\n" not in e, repr(e)
assert events[-1] == "data: [DONE]", events[-1]
for e in events[:-1]:
    assert json.loads(e[len("data: "):])["object"] == "chat.completion.chunk"
out["sse"] = {"events": len(events), "content_type": ctype}

one = client.embeddings.create(model=embed_model, input="A man is eating food.")
many = client.embeddings.create(model=embed_model,
                                input=["A man is eating food.", "A man is eating a piece of bread."])
a, b = (d.embedding for d in many.data)
out["embeddings"] = {"single": len(one.data), "dims": len(one.data[0].embedding), "batch": len(many.data),
                     "cosine": sum(x * y for x, y in zip(a, b))}

errors = {}
def expect(name, fn):
    try:
        fn()
        errors[name] = "no error"
    except openai.APIStatusError as e:
        errors[name] = {"status": e.status_code, "type": (e.body or {}).get("type") if isinstance(e.body, dict) else None,
                        "message": str(e)[:200]}
expect("unknown_model", lambda: client.chat.completions.create(
    model="no-such-model", messages=[{"role": "user", "content": "hi"}]))
expect("bad_temperature", lambda: client.chat.completions.create(
    model=chat_model, messages=[{"role": "user", "content": "hi"}], temperature=5))
expect("embed_with_chat_model", lambda: client.embeddings.create(model=chat_model, input="x"))
expect("chat_with_embed_model", lambda: client.chat.completions.create(
    model=embed_model, messages=[{"role": "user", "content": "hi"}]))
expect("empty_messages", lambda: client.chat.completions.create(model=chat_model, messages=[]))
out["errors"] = errors
print(json.dumps(out))
