#!/usr/bin/env bash
# Benchmarks, side by side with the peers a user would otherwise pick, in one run:
#   network:  tiny calls over the mesh vs HTTP/1.1 keep-alive (axum + hyper)
#   generate: SmolLM2 in mesh (candle) vs llama.cpp, same GGUF, same prompt, same threads
#   embed:    MiniLM in mesh (candle) vs sentence-transformers, same files, same threads
#   gateway:  a chat completion through a node's OpenAI gateway vs the engine in-process
# Prints JSON lines; docs/benchmarks.md quotes them.
#
# The reference implementations come from PyPI into a venv (llama-cpp-python builds
# llama.cpp from source, ~15 min on 2 cores; sentence-transformers pulls torch):
#   BENCH_VENV=/path/to/venv (default target/bench-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
export MESH_MODELS="${MESH_MODELS:-$PWD/target/mesh-models}"
venv="${BENCH_VENV:-$PWD/target/bench-venv}"
threads="${BENCH_THREADS:-2}"
what="${1:-all}"

cargo build -q -p mesh-cli -p mesh-testnet
target/debug/mesh model fetch all >/dev/null 2>&1
bench=target/debug/mesh-bench
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install -q llama-cpp-python sentence-transformers
fi
gguf="$MESH_MODELS/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "# $(date -u +%FT%TZ) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

if [ "$what" = all ] || [ "$what" = network ]; then
  "$bench" network --calls 5000 --seconds 5
fi
if [ "$what" = all ] || [ "$what" = generate ]; then
  mesh_line=$(RAYON_NUM_THREADS=$threads "$bench" generate --tokens 128 --runs 5)
  prompt_file=$(mktemp)
  python3 -c 'import json,sys; print(json.loads(sys.argv[1])["prompt_text"], end="")' "$mesh_line" >"$prompt_file"
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.pop("prompt_text"); print(json.dumps(d))' "$mesh_line"
  "$venv/bin/python" testnet/reference/llama_cpp_bench.py "$gguf" "$prompt_file" 128 5 "$threads"
  rm -f "$prompt_file"
fi
if [ "$what" = all ] || [ "$what" = gateway ]; then
  "$bench" gateway --runs 10 --seconds 5
fi
if [ "$what" = all ] || [ "$what" = embed ]; then
  RAYON_NUM_THREADS=$threads "$bench" embed --seconds 5
  "$venv/bin/python" testnet/reference/sentence_transformers_bench.py "$MESH_MODELS/all-minilm-l6-v2" 5 "$threads" 2>/dev/null
fi
