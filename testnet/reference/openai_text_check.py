"""Drives a mesh node's `/v1/responses` and `/v1/completions` with the official OpenAI Python
client, plain and streamed. Prints one JSON object with what it saw.

Usage: python3 openai_text_check.py BASE_URL CHAT_MODEL EMBED_MODEL
"""
import json
import sys

import openai

base, chat_model, embed_model = sys.argv[1:4]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
out = {}

question = "Name the capital of France."
r = client.responses.create(model=chat_model, input=question, temperature=0, max_output_tokens=24)
out["response"] = {"text": r.output_text, "status": r.status, "object": r.object,
                   "usage": {"input": r.usage.input_tokens, "output": r.usage.output_tokens,
                             "total": r.usage.total_tokens}}
items = client.responses.create(model=chat_model, temperature=0, max_output_tokens=24,
                                instructions=None,
                                input=[{"role": "user", "content": [{"type": "input_text", "text": question}]}])
out["response_items"] = items.output_text

events = list(client.responses.create(model=chat_model, input=question, temperature=0,
                                      max_output_tokens=24, stream=True))
completed = events[-1].response
out["response_stream"] = {
    "types": [e.type for e in events],
    "sequence": [e.sequence_number for e in events],
    "text": "".join(e.delta for e in events if e.type == "response.output_text.delta"),
    "final_text": completed.output_text,
    "status": completed.status,
    "output_tokens": completed.usage.output_tokens,
}
cut = client.responses.create(model=chat_model, input=question, temperature=0, max_output_tokens=2)
out["response_cut"] = {"status": cut.status, "reason": cut.incomplete_details.reason if cut.incomplete_details else None}

prompt = "The capital of France is"
c = client.completions.create(model=chat_model, prompt=prompt, temperature=0, max_tokens=8)
out["completion"] = {"text": c.choices[0].text, "finish": c.choices[0].finish_reason, "object": c.object,
                     "usage": c.usage.model_dump() if c.usage else None}
chunks = list(client.completions.create(model=chat_model, prompt=prompt, temperature=0, max_tokens=8,
                                        stream=True, stream_options={"include_usage": True}))
out["completion_stream"] = {
    "text": "".join(ch.choices[0].text for ch in chunks if ch.choices),
    "finish": [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1],
    "usage": next((ch.usage.model_dump() for ch in chunks if ch.usage), None),
}

errors = {}
def expect(name, fn):
    try:
        fn()
        errors[name] = "no error"
    except openai.APIStatusError as e:
        errors[name] = {"status": e.status_code, "message": str(e)[:200]}
expect("responses_unknown_model", lambda: client.responses.create(model="no-such-model", input="hi"))
expect("responses_bad_temperature", lambda: client.responses.create(model=chat_model, input="hi", temperature=5))
expect("responses_with_embed_model", lambda: client.responses.create(model=embed_model, input="hi"))
expect("completions_unknown_model", lambda: client.completions.create(model="no-such-model", prompt="hi"))
expect("completions_echo", lambda: client.completions.create(model=chat_model, prompt="hi", echo=True))
expect("completions_stream_unknown", lambda: list(client.completions.create(
    model="no-such-model", prompt="hi", stream=True)))
out["errors"] = errors
print(json.dumps(out))
