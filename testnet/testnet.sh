#!/usr/bin/env bash
# mesh local testnet.
#
#   testnet/testnet.sh local [--nodes N]   N mesh nodes on loopback (default 3) hosting the real
#                                          models; a separate client calls each node through the
#                                          DHT and prints a table of results. No root needed.
#   testnet/testnet.sh nat [--runs N] [--results FILE] [--keep]
#                                          a NAT lab in network namespaces (needs root): a public
#                                          relay, two nodes behind cone-like NATs, one behind a
#                                          symmetric NAT; calls between them must answer and the
#                                          cone<->cone pairs must end up hole-punched; a model split
#                                          by layers must answer across them. See natlab.sh.
#
# Exit status: 0 when every call answered, 1 when one failed, 2 on a usage error,
# 77 when the nat lab cannot run here (not root, a missing tool).
set -euo pipefail
caller_pwd=$PWD
cd "$(dirname "$0")/.."

usage() { sed -n '2,16p' testnet/testnet.sh | sed 's/^# \{0,1\}//'; exit 2; }

mode="${1:-}"; shift || true
if [ "$mode" = nat ]; then
  # shellcheck source=testnet/natlab.sh
  . testnet/natlab.sh
  nat_main "$@"
fi
nodes=3
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes="${2:?--nodes needs a number}"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "testnet: unknown argument $1" >&2; usage ;;
  esac
done
case "$mode" in
  local) ;;
  -h|--help|"") usage ;;
  *) echo "testnet: unknown mode '$mode' (local or nat)" >&2; exit 2 ;;
esac
[[ "$nodes" =~ ^[0-9]+$ ]] && [ "$nodes" -ge 2 ] && [ "$nodes" -le 16 ] || { echo "testnet: --nodes must be 2..16" >&2; exit 2; }

export MESH_MODELS="${MESH_MODELS:-$PWD/target/mesh-models}"
echo "== building mesh (first build takes ~12 minutes on 2 cores)"
cargo build -q -p mesh-cli
mesh="$PWD/target/debug/mesh"
echo "== fetching the models into $MESH_MODELS"
"$mesh" model fetch all >/dev/null 2>&1 || "$mesh" model fetch all

run_dir=$(mktemp -d "${TMPDIR:-/tmp}/mesh-testnet.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$run_dir"
}
trap cleanup EXIT INT TERM


# Starts node $1 hosting model spec $2 (may be empty) with bootstrap $3 (may be empty).
start_node() {
  local i=$1 spec=$2 boot=$3 args=()
  [ -n "$spec" ] && args+=(--model "$spec")
  [ -n "$boot" ] && args+=(--bootstrap "$boot")
  "$mesh" join --json --home "$run_dir/node$i" --listen /ip4/127.0.0.1/tcp/0 --no-mdns \
    --api 127.0.0.1:0 "${args[@]}" >"$run_dir/node$i.out" 2>"$run_dir/node$i.log" &
  pids+=($!)
  for _ in $(seq 1 300); do
    [ -s "$run_dir/node$i.out" ] && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "node$i failed to start:"; cat "$run_dir/node$i.log"; exit 1; }
    sleep 0.1
  done
  echo "node$i did not become ready"; cat "$run_dir/node$i.log"; exit 1
}

model_for() { if [ $(( $1 % 2 )) -eq 1 ]; then echo "smollm2=smollm2-135m-instruct"; else echo "minilm=all-minilm-l6-v2"; fi; }

echo "== starting $nodes nodes on loopback"
start_node 1 "$(model_for 1)" ""
boot=$(head -1 "$run_dir/node1.out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["listen_addrs"][0])')
for i in $(seq 2 "$nodes"); do start_node "$i" "$(model_for "$i")" "$boot"; done
for i in $(seq 1 "$nodes"); do
  head -1 "$run_dir/node$i.out" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("   node" + sys.argv[1], r["peer_id"], "hosts", ", ".join(r["models"]))' "$i"
done

echo "== a client that knows only node1 calls every node"
printf '%-6s %-9s %-8s %-7s %8s %8s  %s\n' NODE MODEL PATH RESULT TTFB_MS TOTAL_MS ANSWER
failures=0
for i in $(seq 1 "$nodes"); do
  peer=$(head -1 "$run_dir/node$i.out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["peer_id"])')
  spec=$(model_for "$i"); model=${spec%%=*}
  if [ "$model" = smollm2 ]; then
    prompt=(--prompt "Name the capital of France." --max-tokens 32)
  else
    prompt=(--prompt "A man is eating food." --prompt "A man is eating a piece of bread.")
  fi
  out="$run_dir/call$i.json"
  ok=0
  for attempt in 1 2 3 4 5; do  # the node may need a moment to appear in the DHT
    if "$mesh" infer --json --home "$run_dir/client" --no-mdns --bootstrap "$boot" \
        "$peer" "$model" "${prompt[@]}" >"$out" 2>"$run_dir/call$i.log"; then ok=1; break; fi
    sleep 1
  done
  python3 - "$out" "$i" "$model" "$ok" <<'PY' || failures=$((failures+1))
import json, sys, math
path, node, model, ok = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
events = [json.loads(l) for l in open(path) if l.strip()]
done = next((e for e in events if e["event"] == "done"), None)
if not ok or done is None:
    err = next((e for e in events if e["event"] == "error"), {"message": "no answer"})
    print(f"{'node'+node:<6} {model:<9} {'-':<8} {'FAIL':<7} {'-':>8} {'-':>8}  {err['message']}")
    sys.exit(1)
if model == "smollm2":
    answer = "".join(e["text"] for e in events if e["event"] == "delta").strip().replace("\n", " ")
else:
    v = next(e["vectors"] for e in events if e["event"] == "embeddings")
    answer = f"{len(v)} vectors of {len(v[0])} dims, cosine {sum(a*b for a,b in zip(v[0], v[1])):.3f}"
print(f"{'node'+node:<6} {model:<9} {done['path']:<8} {'ok':<7} {done['time_to_first_byte_ms']:>8} {done['total_ms']:>8}  {answer}")
PY
done
if [ "$failures" -gt 0 ]; then
  echo "== $failures call(s) failed; the client's and nodes' logs:"
  tail -n 20 "$run_dir"/call*.log "$run_dir"/node*.log
  exit 1
fi
echo "== every call answered"
