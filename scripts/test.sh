#!/usr/bin/env bash
# The test command: builds everything once (dev profile, dependencies optimised) and runs
# every test in the workspace. Needs only a Rust toolchain; it fetches what else it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p mesh-cli
cargo test --workspace --all-targets "$@"
