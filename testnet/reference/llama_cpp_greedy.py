"""Greedy token ids of SmolLM2 as llama.cpp generates them, on the wide-margin golden prompts
(../shared/MODELS.md explains why only those), written as a fixture for mesh's forward pass,
with llama.cpp's five best tokens and their logits at each step, and its margin (its top logit
minus its second): where that margin
is small, a second implementation may break the tie the other way, as llama.cpp itself does
between a batched and a token-by-token evaluation.

Run: python3 testnet/reference/llama_cpp_greedy.py MODEL.gguf > tests/e2e/fixtures/smollm2_greedy.json
Needs: pip install llama-cpp-python (builds llama.cpp from source).
"""
import json
import sys

import llama_cpp
import numpy as np

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTIONS = [
    "Name the capital of France.",
    "What color is the sky on a clear day?",
    "What is the largest planet in our solar system?",
]
TOKENS = 32

model = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, verbose=False,
                        logits_all=True)
# The end of a turn ends the answer, as in mesh.
stops = {model.token_eos(), *model.tokenize(b"<|im_end|>", add_bos=False, special=True)}
cases = []
for q in QUESTIONS:
    # SmolLM2's ChatML template with its default system prompt, as the GGUF's template renders it.
    prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
              "<|im_start|>assistant\n")
    ids = model.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    model.reset()
    # The prompt in one batch, then one token at a time, as llama.cpp generates.
    model.eval(ids)
    out, margins, top = [], [], []
    while len(out) < TOKENS:
        logits = np.array(model.scores[model.n_tokens - 1])
        token = int(np.argmax(logits))
        if token in stops:
            break
        second, first = np.sort(logits)[-2:]
        out.append(token)
        margins.append(round(float(first - second), 4))
        best = np.argsort(logits)[-5:][::-1]
        top.append([[int(i), round(float(logits[i]), 4)] for i in best])
        model.eval([token])
    cases.append({"question": q, "prompt": prompt, "prompt_ids": ids, "greedy_ids": out,
                  "margins": margins, "top": top,
                  "text": model.detokenize(out).decode("utf-8", errors="replace")})
json.dump({"source": "llama.cpp via llama-cpp-python " + llama_cpp.__version__,
           "tokens": TOKENS, "cases": cases}, sys.stdout, ensure_ascii=False, indent=1)
print()
