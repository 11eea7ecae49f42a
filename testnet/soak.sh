#!/usr/bin/env bash
# Churn soak: nodes keep joining and leaving while a caller keeps calling `any`.
#
#   testnet/soak.sh [--minutes N] [--providers K] [--churn-secs S] [--results FILE]
#                   [--min-success PCT]
#
# On loopback: a bootstrap node, K nodes hosting the builtin echo model, and a caller node
# whose OpenAI gateway is called in a loop (curl, one call at a time). Every S seconds one
# provider leaves, by SIGTERM and SIGKILL in turn, and a new one (a new key, a new home) joins.
# Every 10 s a line reports the calls answered and failed since the last line, and the RSS and
# open file descriptors of the caller and the bootstrap node. --results writes those samples as
# JSON lines, then a summary line.
#
# Exit status: 0 when the success rate reached --min-success (default 99) and neither the
# caller's descriptors nor its memory kept growing (the last third of the run stays within
# bounds of the first third), 1 otherwise, 2 on a usage error.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,16p' testnet/soak.sh | sed 's/^# \{0,1\}//'; exit 2; }
minutes=2 providers=4 churn=5 results="" min_success=99
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="${2:?}"; shift 2 ;;
    --providers) providers="${2:?}"; shift 2 ;;
    --churn-secs) churn="${2:?}"; shift 2 ;;
    --results) results="${2:?}"; shift 2 ;;
    --min-success) min_success="${2:?}"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "soak: unknown argument $1" >&2; usage ;;
  esac
done
[[ "$minutes" =~ ^[0-9]+$ ]] && [ "$minutes" -ge 1 ] && [ "$minutes" -le 600 ] || { echo "soak: --minutes must be 1..600" >&2; exit 2; }
[[ "$providers" =~ ^[0-9]+$ ]] && [ "$providers" -ge 2 ] && [ "$providers" -le 16 ] || { echo "soak: --providers must be 2..16" >&2; exit 2; }
[[ "$churn" =~ ^[0-9]+$ ]] && [ "$churn" -ge 1 ] || { echo "soak: --churn-secs must be at least 1" >&2; exit 2; }
command -v curl >/dev/null || { echo "soak: needs curl" >&2; exit 2; }

mesh="${MESH_BIN:-$PWD/target/debug/mesh}"
if [ -z "${MESH_BIN:-}" ]; then cargo build -q -p mesh-cli; fi
[ -x "$mesh" ] || { echo "soak: $mesh is not there" >&2; exit 2; }

run=$(mktemp -d "${TMPDIR:-/tmp}/mesh-soak.XXXXXX")
# shellcheck source=testnet/nodes.sh
. testnet/nodes.sh
loop_pid=""
cleanup() {
  [ -n "$loop_pid" ] && kill "$loop_pid" 2>/dev/null || true
  stop_nodes
  rm -rf "$run"
}
trap cleanup EXIT INT TERM

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
fds() { ls "/proc/$1/fd" 2>/dev/null | wc -l; }

start_node boot
boot=$(ready_field boot listen_addrs)
for i in $(seq 1 "$providers"); do start_node "p$i" --bootstrap "$boot" --model echo=builtin:echo; done
start_node caller --bootstrap "$boot"
api=$(ready_field caller api)
next=$((providers + 1))

# The caller's loop: one call at a time through the gateway, one line per call.
calls="$run/calls"
: >"$calls"
(
  n=0
  while :; do
    n=$((n + 1))
    body="{\"model\":\"echo\",\"messages\":[{\"role\":\"user\",\"content\":\"ping $n\"}]}"
    out=$(curl -s -m 10 -o "$run/answer" -w '%{http_code} %{time_total}' \
      -H 'content-type: application/json' -d "$body" "$api/v1/chat/completions" || echo "000 10")
    if [ "${out%% *}" = 200 ] && grep -q "echo: ping $n\"" "$run/answer"; then
      echo "ok ${out#* }" >>"$calls"
    else
      echo "fail ${out#* } ${out%% *}" >>"$calls"
    fi
  done
) &
loop_pid=$!

end=$(( $(date +%s) + minutes * 60 ))
last_churn=$(date +%s) last_sample=$(date +%s) seen=0 kills=0 signal=TERM
samples="$run/samples"
: >"$samples"
printf '%-6s %7s %7s %9s %9s %9s %9s %10s\n' T_S OK FAIL CALLER_KB CALLER_FD BOOT_KB BOOT_FD PROVIDERS
started=$(date +%s)
while [ "$(date +%s)" -lt "$end" ]; do
  sleep 1
  now=$(date +%s)
  if [ $((now - last_churn)) -ge "$churn" ]; then
    # One provider leaves (SIGTERM and SIGKILL in turn), a new one joins.
    victims=()
    for name in "${!node_pid[@]}"; do [[ "$name" == p* ]] && victims+=("$name"); done
    victim=${victims[$((RANDOM % ${#victims[@]}))]}
    kill "-$signal" "${node_pid[$victim]}" 2>/dev/null || true
    wait "${node_pid[$victim]}" 2>/dev/null || true
    unset "node_pid[$victim]"
    rm -rf "${run:?}/$victim"
    kills=$((kills + 1))
    [ "$signal" = TERM ] && signal=KILL || signal=TERM
    start_node "p$next" --bootstrap "$boot" --model echo=builtin:echo
    next=$((next + 1))
    last_churn=$now
  fi
  if [ $((now - last_sample)) -ge 10 ]; then
    total=$(wc -l <"$calls")
    window=$(tail -n +"$((seen + 1))" "$calls" | head -n "$((total - seen))")
    ok=$(grep -c '^ok' <<<"$window" || true)
    fail=$(grep -c '^fail' <<<"$window" || true)
    seen=$total
    live=0; for name in "${!node_pid[@]}"; do [[ "$name" == p* ]] && live=$((live + 1)); done
    line=$(printf '%-6s %7s %7s %9s %9s %9s %9s %10s' $((now - started)) "$ok" "$fail" \
      "$(rss_kb "${node_pid[caller]}")" "$(fds "${node_pid[caller]}")" \
      "$(rss_kb "${node_pid[boot]}")" "$(fds "${node_pid[boot]}")" "$live")
    echo "$line"
    echo "$line" >>"$samples"
    last_sample=$now
  fi
done
kill "$loop_pid" 2>/dev/null || true
wait "$loop_pid" 2>/dev/null || true
loop_pid=""
kill -0 "${node_pid[caller]}" 2>/dev/null || { echo "soak: the caller node died"; tail -20 "$run/caller.log"; exit 1; }

# Calls whose DHT lookup named no live provider, answered by asking the connected nodes.
fallbacks=$(grep -c "asking the connected nodes" "$run/caller.log" || true)

python3 - "$calls" "$samples" "$min_success" "$kills" "$minutes" "${results:-}" "$fallbacks" <<'PY'
import json, statistics, sys
calls_path, samples_path, min_success, kills, minutes, results, fallbacks = sys.argv[1:8]
calls = [l.split() for l in open(calls_path) if l.strip()]
ok = [float(c[1]) * 1000 for c in calls if c[0] == "ok"]
fail = [c for c in calls if c[0] == "fail"]
rows = [list(map(int, l.split())) for l in open(samples_path) if l.strip()]
total = len(ok) + len(fail)
rate = 100.0 * len(ok) / total if total else 0.0
third = max(1, len(rows) // 3)
first, last = rows[:third], rows[-third:]
fd_first, fd_last = max(r[4] for r in first), max(r[4] for r in last)
kb_first, kb_last = max(r[3] for r in first), max(r[3] for r in last)
# Growth bounds: descriptors may vary with the peers connected at the moment; a leak grows
# with every churn event, which over a run of several minutes passes these bounds.
fd_ok = fd_last <= fd_first + 32
kb_ok = kb_last <= kb_first * 1.5 + 16 * 1024
summary = {
    "minutes": int(minutes), "calls": total, "answered": len(ok), "failed": len(fail),
    "success_pct": round(rate, 3), "churn_events": int(kills),
    "lookups_falling_back_to_connected_nodes": int(fallbacks or 0),
    "latency_ms_p50": round(statistics.median(ok), 1) if ok else None,
    "latency_ms_p99": round(sorted(ok)[int(len(ok) * 0.99) - 1], 1) if len(ok) >= 100 else None,
    "caller_fd_first_third_max": fd_first, "caller_fd_last_third_max": fd_last,
    "caller_kb_first_third_max": kb_first, "caller_kb_last_third_max": kb_last,
    "caller_kb_max": max(r[3] for r in rows), "boot_kb_max": max(r[5] for r in rows),
    "caller_fd_max": max(r[4] for r in rows), "boot_fd_max": max(r[6] for r in rows),
}
print("== summary: " + json.dumps(summary))
if results:
    with open(results, "a") as f:
        for r in rows:
            f.write(json.dumps(dict(zip(["t_s", "ok", "fail", "caller_kb", "caller_fd", "boot_kb", "boot_fd", "providers"], r))) + "\n")
        f.write(json.dumps({"summary": summary}) + "\n")
problems = []
if rate < float(min_success):
    problems.append(f"success {rate:.2f}% is under {min_success}%")
if not fd_ok:
    problems.append(f"the caller's descriptors grew from {fd_first} to {fd_last}")
if not kb_ok:
    problems.append(f"the caller's memory grew from {kb_first} to {kb_last} KiB")
if total < 10 * int(minutes):
    problems.append(f"only {total} calls were made")
if problems:
    print("== FAILED: " + "; ".join(problems))
    sys.exit(1)
print("== soak passed")
PY
