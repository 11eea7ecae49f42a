#!/usr/bin/env bash
# The mesh at scale, simulated: N real mesh nodes in one process over libp2p's memory
# transport (testnet/src/sim, the `mesh-sim` binary, release build).
#
#   testnet/sim.sh [MESH-SIM FLAGS]     one run; prints a table and a JSON line
#                                       e.g. testnet/sim.sh --nodes 1000 --churn 0.05
#   testnet/sim.sh sweep [FILE]         N = 100 and 200 at 5% churn per minute, and 100 at 0%
#                                       and 20%: JSON lines appended to FILE (default
#                                       target/sim/sweep.jsonl); SIM_SIZES, SIM_CHURN_SIZE,
#                                       SIM_CHURNS, SIM_MEASURE_SECS, SIM_FLAGS change it (on 2
#                                       cores about 200 nodes run in real time: docs/scale.md)
#   testnet/sim.sh plots [FILE]         docs/scale/*.png from a sweep's lines (matplotlib,
#                                       installed into target/sim/venv on first use)
#
# See docs/scale.md for what it measures and what the figures say.
set -euo pipefail
cd "$(dirname "$0")/.."

build() {
  cargo build -q --release -p mesh-testnet --bin mesh-sim
}

case "${1:-}" in
  sweep)
    out="${2:-target/sim/sweep.jsonl}"
    mkdir -p "$(dirname "$out")"
    build
    measure="${SIM_MEASURE_SECS:-90}"
    # shellcheck disable=SC2206
    flags=(${SIM_FLAGS:-})
    for n in ${SIM_SIZES:-100 200}; do
      echo "sim.sh: $n nodes, 5% churn per minute" >&2
      target/release/mesh-sim --nodes "$n" --churn 0.05 --measure-secs "$measure" --json \
        "${flags[@]}" | tee -a "$out"
    done
    size="${SIM_CHURN_SIZE:-100}"
    for churn in ${SIM_CHURNS:-0 0.2}; do
      echo "sim.sh: $size nodes, churn $churn per minute" >&2
      target/release/mesh-sim --nodes "$size" --churn "$churn" --measure-secs "$measure" --json \
        "${flags[@]}" | tee -a "$out"
    done
    ;;
  plots)
    in="${2:-target/sim/sweep.jsonl}"
    venv=target/sim/venv
    if [ ! -x "$venv/bin/python" ]; then
      python3 -m venv "$venv"
      "$venv/bin/pip" install -q matplotlib
    fi
    "$venv/bin/python" testnet/reference/scale_plots.py "$in" docs/scale
    ;;
  *)
    build
    exec target/release/mesh-sim "$@"
    ;;
esac
