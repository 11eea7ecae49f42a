"""Greedy token ids of SmolLM2 as llama.cpp generates them, on the wide-margin golden prompts
(../shared/MODELS.md explains why only those), written as a fixture for mesh's forward pass.

Run: python3 testnet/reference/llama_cpp_greedy.py MODEL.gguf > tests/e2e/fixtures/smollm2_greedy.json
Needs: pip install llama-cpp-python (builds llama.cpp from source).
"""
import json
import sys

import llama_cpp

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTIONS = [
    "Name the capital of France.",
    "What color is the sky on a clear day?",
    "What is the largest planet in our solar system?",
]
TOKENS = 32

model = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, verbose=False)
# The end of a turn ends the answer, as in mesh.
stops = {model.token_eos(), *model.tokenize(b"<|im_end|>", add_bos=False, special=True)}
cases = []
for q in QUESTIONS:
    # SmolLM2's ChatML template with its default system prompt, as the GGUF's template renders it.
    prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
              "<|im_start|>assistant\n")
    ids = model.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    model.reset()
    out = []
    for token in model.generate(ids, top_k=1, temp=0.0, reset=True):
        if token in stops or len(out) == TOKENS:
            break
        out.append(token)
    cases.append({"question": q, "prompt": prompt, "prompt_ids": ids, "greedy_ids": out,
                  "text": model.detokenize(out).decode("utf-8", errors="replace")})
json.dump({"source": "llama.cpp via llama-cpp-python " + llama_cpp.__version__,
           "tokens": TOKENS, "cases": cases}, sys.stdout, ensure_ascii=False, indent=1)
print()
