"""Token ids of SmolLM2's GGUF tokenizer as llama.cpp computes them (an independent
implementation of the same tokenizer), written as a fixture for the Rust tokenizer test.

Run: python3 testnet/reference/llama_cpp_tokens.py MODEL.gguf > tests/e2e/fixtures/smollm2_tokens.json
Needs: pip install llama-cpp-python (builds llama.cpp from source).
"""
import json
import sys

import llama_cpp

STRINGS = [
    "Name the capital of France.",
    " leading space and  two spaces",
    "Digits: 1234567890 and 3.14159, year 2026!",
    "unicode: café, naïve, Größe, 東京, emoji 🚀🔥, ∑x²",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "tabs\tand\nnewlines\n\n  indented",
    "<|endoftext|>",
    "CamelCaseIdentifiers and snake_case_names; x+=1",
]

model = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
cases = [
    {"text": s, "ids": model.tokenize(s.encode("utf-8"), add_bos=False, special=True)}
    for s in STRINGS
]
json.dump({"source": "llama.cpp via llama-cpp-python " + llama_cpp.__version__, "cases": cases},
          sys.stdout, ensure_ascii=False, indent=1)
print()
