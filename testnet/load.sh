#!/usr/bin/env bash
# Load: N calls at once (default 1,000) at a node, through its OpenAI gateway and over the
# mesh, on the builtin echo model and on SmolLM2.
#
#   testnet/load.sh [--calls N] [--models echo,smol] [--results FILE]
#
# On loopback: node A hosts `echo` (builtin) and `smol` (SmolLM2, fetched by
# `mesh model fetch`); node C hosts nothing, and every call goes to C's API: the gateway's
# /v1/chat/completions, or /v1/mesh/infer (C dispatches it to A over libp2p). While each run
# lasts, the peak RSS and open descriptors of A and C are sampled every 100 ms.
#
# Every call must end answered or refused (HTTP 429/503, `overloaded`) within its deadline:
# the exit status is 1 when one failed or hung, or a node died; 0 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

calls=1000 models=echo,smol results=""
while [ $# -gt 0 ]; do
  case "$1" in
    --calls) calls="${2:?}"; shift 2 ;;
    --models) models="${2:?}"; shift 2 ;;
    --results) results="${2:?}"; shift 2 ;;
    -h|--help) sed -n '2,13p' testnet/load.sh | sed 's/^# \{0,1\}//'; exit 2 ;;
    *) echo "load: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ "$calls" =~ ^[0-9]+$ ]] && [ "$calls" -ge 1 ] && [ "$calls" -le 5000 ] || { echo "load: --calls must be 1..5000" >&2; exit 2; }

export MESH_MODELS="${MESH_MODELS:-$PWD/target/mesh-models}"
if [ -z "${MESH_BIN:-}" ]; then cargo build -q -p mesh-cli -p mesh-testnet; fi
mesh="${MESH_BIN:-$PWD/target/debug/mesh}"
bench="${MESH_BENCH_BIN:-$(dirname "$mesh")/mesh-bench}"
[ -x "$mesh" ] && [ -x "$bench" ] || { echo "load: $mesh or $bench is not there" >&2; exit 2; }
case ",$models," in *,smol,*) "$mesh" model fetch smollm2-135m-instruct >/dev/null ;; esac

run=$(mktemp -d "${TMPDIR:-/tmp}/mesh-load.XXXXXX")
# shellcheck source=testnet/nodes.sh
. testnet/nodes.sh
cleanup() {
  stop_nodes
  rm -rf "$run"
}
trap cleanup EXIT INT TERM

a_models=(--model echo=builtin:echo)
case ",$models," in *,smol,*) a_models+=(--model smol=smollm2-135m-instruct) ;; esac
start_node a "${a_models[@]}"
a_pid=${node_pid[a]}
start_node c --bootstrap "$(ready_field a listen_addrs)"
c_pid=${node_pid[c]}
api=$(ready_field c api)

# Waits until C can reach every model through the DHT.
for model in ${models//,/ }; do
  for _ in $(seq 1 100); do
    "$bench" load --api "$api" --via mesh --model "$model" --calls 1 --deadline-secs 60 >/dev/null 2>&1 && break
    sleep 0.2
  done
done

printf '%-8s %-5s %6s %8s %7s %6s %4s %10s %10s %8s %6s %8s %6s\n' VIA MODEL CALLS ANSWERED REFUSED FAILED HUNG ANS_P50_MS ANS_P99_MS A_MAX_KB A_FD C_MAX_KB C_FD
status=0
for model in ${models//,/ }; do
  for via in gateway mesh; do
    peaks="$run/peaks"
    echo "0 0 0 0" >"$peaks"
    (
      a_kb=0 a_fd=0 c_kb=0 c_fd=0
      while :; do
        for who in a c; do
          pid=$a_pid; [ "$who" = c ] && pid=$c_pid
          kb=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
          fd=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
          if [ "$who" = a ]; then [ "$kb" -gt "$a_kb" ] && a_kb=$kb; [ "$fd" -gt "$a_fd" ] && a_fd=$fd
          else [ "$kb" -gt "$c_kb" ] && c_kb=$kb; [ "$fd" -gt "$c_fd" ] && c_fd=$fd; fi
        done
        echo "$a_kb $a_fd $c_kb $c_fd" >"$peaks.new" && mv "$peaks.new" "$peaks"
        sleep 0.1
      done
    ) &
    sampler=$!
    deadline=30; [ "$model" = smol ] && deadline=120
    set +e
    line=$("$bench" load --api "$api" --via "$via" --model "$model" --calls "$calls" --deadline-secs "$deadline" 2>"$run/bench.log")
    code=$?
    set -e
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
    read -r a_kb a_fd c_kb c_fd <"$peaks"
    [ "$code" -eq 0 ] || status=1
    kill -0 "$a_pid" 2>/dev/null && kill -0 "$c_pid" 2>/dev/null || { echo "load: a node died"; tail -20 "$run"/*.log; status=1; }
    python3 - "$line" "$a_kb" "$a_fd" "$c_kb" "$c_fd" "${results:-}" <<'PY' || status=1
import json, sys
line, a_kb, a_fd, c_kb, c_fd, results = sys.argv[1:7]
try:
    r = json.loads(line)
except ValueError:
    print("load: no report from mesh-bench:", line); sys.exit(1)
r.update(a_peak_kb=int(a_kb), a_peak_fd=int(a_fd), c_peak_kb=int(c_kb), c_peak_fd=int(c_fd))
lat = r.get("answered_latency") or {}
print(f"{r['via']:<8} {r['model']:<5} {r['calls']:>6} {r['answered']:>8} {r['refused']:>7} {r['failed']:>6} {r['hung']:>4} "
      f"{lat.get('p50_ms', '-'):>10} {lat.get('p99_ms', '-'):>10} {a_kb:>8} {a_fd:>6} {c_kb:>8} {c_fd:>6}")
for f in r["failures"]:
    print("   ", f)
if results:
    with open(results, "a") as out:
        out.write(json.dumps(r) + "\n")
PY
  done
done
exit "$status"
