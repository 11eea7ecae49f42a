# shellcheck shell=bash
# mesh NAT lab: a small internet in network namespaces with real Linux NAT routers.
# Sourced by testnet/testnet.sh (`testnet.sh nat`); it defines functions only, nat_main runs the lab.
#
#   ns inet    bridge br0, the "internet" 198.51.100.0/24
#   ns relay   198.51.100.10        public node: bootstrap and relay
#   ns r1      wan 198.51.100.21    lan 192.0.2.1/26     cone-like NAT (MASQUERADE)
#   ns r2      wan 198.51.100.22    lan 192.0.2.65/26    cone-like NAT (MASQUERADE)
#   ns r3      wan 198.51.100.23    lan 192.0.2.129/26   symmetric NAT (MASQUERADE --random-fully)
#   ns a       192.0.2.2   behind r1
#   ns b       192.0.2.66  behind r2
#   ns c       192.0.2.130 behind r3
#
# Router rules (docs/architecture.md, "NAT traversal"): FORWARD drops new inbound, INPUT drops
# NEW/INVALID on wan (without it a cone NAT picks a new port on collision and punching fails),
# and conntrack is flushed in every router before each scenario.
#
# Environment knobs (all optional):
#   MESH_BIN              use this mesh binary and skip `cargo build`
#   NAT_READY_TIMEOUT     seconds to wait for a node's ready line            (30)
#   NAT_JOIN_TIMEOUT      seconds for the first a->b call after b joins      (30)
#   NAT_ATTEMPT_TIMEOUT   --timeout of one attempt in that retry loop        (10)
#   NAT_CALL_TIMEOUT      --timeout of every other call                      (30)
#   NAT_PUNCH_WAIT        seconds to wait for `mesh peers` to say hole-punched (15)
#   NAT_RECOVERY_TIMEOUT  seconds after relay 1 stops for a->c to answer again  (30)
#   NAT_RELAY_STOP        how relay 1 stops: KILL (a crash) or TERM (it shuts down)     (KILL)
#   NAT_FROZEN_CALLS      `any` calls made while one of two providers is frozen (10)
#   NAT_FROZEN_LIMIT_MS   each of them must answer within this many ms         (2000)
#   NAT_LATENCY_CALLS     small calls a->b and a->c timed after the pairs     (50)
#   NAT_TRANSPORT         what the NATed nodes listen on and bootstrap over:
#                         tcp, quic or both                                   (both)
#   NAT_RELAY_ARGS        extra arguments for the relay's `mesh join` (debugging only)
#   NAT_SPLIT             1: run the split-model checks (SmolLM2 from $MESH_MODELS); 0: skip them (1)
#   NAT_SPLIT_TIMEOUT     seconds from a split head's start to its first answer or refusal (60)
#   RUST_LOG              node log filter (default info,mesh_node=debug,libp2p_dcutr=debug,libp2p_relay=debug)

NAT_EXIT_CANNOT_RUN=77

nat_usage() {
  cat <<'EOF'
usage: testnet/testnet.sh nat [--runs N] [--results FILE] [--keep]

  Builds a small internet in network namespaces (needs root): a public bootstrap/relay node,
  nodes a and b behind two cone-like NATs, node c behind a symmetric NAT. Runs calls a->b, b->a
  (must end up hole-punched), a->c and c->a (relayed), then SmolLM2 split by layers (a stage of
  layers 10..30 next to b): a head next to a must answer through it hole-punched (row a=>b), a
  head next to c must not plan the relay-only hop by default and answers with
  --split-allow-relayed (rows c=>b); prints a table per run and a summary.

  --runs N        repeat the whole scenario N times on fresh namespaces and node homes (default 1)
  --results FILE  write per-run results as JSON lines to FILE (kinds: call, pair, latency,
                  split, failover, run)
  --keep          keep the run directory (node homes, logs, call outputs) and print where it is

  Exit status: 0 every call answered, every cone<->cone pair was hole-punched and every split
  check passed; 1 otherwise;
  2 usage error; 77 the lab cannot run here (not root, a missing tool, no network namespaces).
EOF
}

nat_say() { printf '%s\n' "$*"; }
nat_warn() { printf 'testnet nat: %s\n' "$*" >&2; }
nat_cannot_run() {
  nat_warn "cannot run the NAT lab: $*"
  exit "$NAT_EXIT_CANNOT_RUN"
}
nat_now_ms() { date +%s%3N; }

# ---------------------------------------------------------------------------------------------
# Prerequisites

nat_check_prereqs() {
  if [ "$(id -u)" -ne 0 ]; then
    nat_cannot_run "it needs root to create network namespaces and NAT rules (run it with sudo; CI runs it as root)"
  fi
  local missing=() t
  for t in ip iptables conntrack sysctl python3 date; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    nat_cannot_run "missing tool(s): ${missing[*]} (on Debian/Ubuntu: apt-get install -y iptables conntrack iproute2 procps python3)"
  fi
  nat_py=$(python3 -c 'import sys; print(sys.executable)') || nat_cannot_run "python3 does not run"
  # Can we make a namespace, run in it, and set NAT rules there (nf_tables/xt modules)?
  local probe="${nat_prefix}probe" err
  if ! err=$(ip netns add "$probe" 2>&1); then
    nat_cannot_run "\`ip netns add\` failed: $err"
  fi
  nat_ns_made+=("$probe")
  if ! err=$(ip netns exec "$probe" true 2>&1); then
    nat_cannot_run "\`ip netns exec\` failed: $err"
  fi
  if ! err=$(ip netns exec "$probe" iptables -t nat -A POSTROUTING -o lo -j MASQUERADE --random-fully 2>&1 &&
    ip netns exec "$probe" iptables -A INPUT -i lo -m conntrack --ctstate NEW,INVALID -j DROP 2>&1); then
    nat_cannot_run "iptables NAT/conntrack rules do not work in a namespace: $err"
  fi
  if ! err=$(ip netns exec "$probe" conntrack -F 2>&1); then
    nat_cannot_run "\`conntrack -F\` failed in a namespace: $err"
  fi
  ip netns del "$probe"
  nat_ns_made=()
}

# ---------------------------------------------------------------------------------------------
# Topology

nat_names=(inet relay relay2 r1 r2 r3 a b c)
declare -A nat_ns=()
for _n in "${nat_names[@]}"; do nat_ns[$_n]=""; done
unset _n

nat_topology_up() {
  local n
  for n in "${nat_names[@]}"; do
    nat_ns[$n]="${nat_prefix}$n"
    ip netns add "${nat_ns[$n]}"
    nat_ns_made+=("${nat_ns[$n]}")
    ip -n "${nat_ns[$n]}" link set lo up
  done
  local inet=${nat_ns[inet]}
  ip -n "$inet" link add br0 type bridge
  ip -n "$inet" link set br0 up

  # The public side: the relay and the routers' wan ports on the bridge.
  ip -n "${nat_ns[relay]}" link add eth0 type veth peer name p-relay netns "$inet"
  ip -n "${nat_ns[relay]}" addr add 198.51.100.10/24 dev eth0
  ip -n "${nat_ns[relay]}" link set eth0 up
  ip -n "$inet" link set p-relay master br0 up
  # A second public node: a relay the NATed nodes find through the DHT, and fall back to when
  # the first relay goes away.
  ip -n "${nat_ns[relay2]}" link add eth0 type veth peer name p-relay2 netns "$inet"
  ip -n "${nat_ns[relay2]}" addr add 198.51.100.11/24 dev eth0
  ip -n "${nat_ns[relay2]}" link set eth0 up
  ip -n "$inet" link set p-relay2 master br0 up

  nat_router r1 198.51.100.21 cone
  nat_router r2 198.51.100.22 cone
  nat_router r3 198.51.100.23 symmetric
  nat_host a r1 192.0.2.2 192.0.2.1
  nat_host b r2 192.0.2.66 192.0.2.65
  nat_host c r3 192.0.2.130 192.0.2.129
}

# nat_router NAME WAN_IP cone|symmetric (its lan side is added by nat_host)
nat_router() {
  local name=$1 wan=$2 kind=$3 ns=${nat_ns[$1]} inet=${nat_ns[inet]}
  ip -n "$ns" link add wan type veth peer name "p-$name" netns "$inet"
  ip -n "$inet" link set "p-$name" master br0 up
  ip -n "$ns" addr add "$wan/24" dev wan
  ip -n "$ns" link set wan up
  ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
  local masq=(-t nat -A POSTROUTING -o wan -j MASQUERADE)
  [ "$kind" = symmetric ] && masq+=(--random-fully)
  ip netns exec "$ns" iptables "${masq[@]}"
  ip netns exec "$ns" iptables -A FORWARD -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
  ip netns exec "$ns" iptables -A FORWARD -i wan -j DROP
  ip netns exec "$ns" iptables -A INPUT -i wan -m conntrack --ctstate NEW,INVALID -j DROP
  nat_kind[$name]=$kind
  nat_wan_of_router[$name]=$wan
}

# nat_host NAME ROUTER IP GW
nat_host() {
  local name=$1 router=$2 ip=$3 gw=$4 ns=${nat_ns[$1]} rns=${nat_ns[$2]}
  ip -n "$rns" link add lan type veth peer name eth0 netns "$ns"
  ip -n "$rns" addr add "$gw/26" dev lan
  ip -n "$rns" link set lan up
  ip -n "$ns" addr add "$ip/26" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via "$gw"
  nat_router_of[$name]=$router
  nat_ip[$name]=$ip
}

declare -A nat_kind=() nat_wan_of_router=() nat_router_of=() nat_ip=()

nat_flush_conntrack() {
  local r
  for r in r1 r2 r3; do ip netns exec "${nat_ns[$r]}" conntrack -F >/dev/null 2>&1 || true; done
}

# Kills every process we started (nodes, calls, probes), then every process still inside one of
# our namespaces (only ours: they were made by this run), then deletes the namespaces.
nat_topology_down() {
  local pid ns i
  for pid in "${nat_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for i in $(seq 1 30); do
    local alive=0
    for pid in "${nat_pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${nat_pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for ns in "${nat_ns_made[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  for pid in "${nat_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  nat_pids=()
  # Also anything named with our prefix that the list above missed (e.g. interrupted mid-add).
  local leftover
  leftover=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -F "$nat_prefix" || true)
  for ns in "${nat_ns_made[@]}" $leftover; do
    ip netns del "$ns" 2>/dev/null || true
  done
  nat_ns_made=()
}

# A cheap check that the lab is what it claims: every host reaches the relay through its NAT with
# the router's wan address as source; r1/r2 keep one mapping for every destination (cone-like),
# r3 picks a new one per destination (symmetric); no host reaches another host's private address;
# the relay reaches no private address.
nat_sanity_check() {
  local out="$run_dir/sanity"
  mkdir -p "$out"
  ip netns exec "${nat_ns[relay]}" "$nat_py" - 198.51.100.10 "$out/server.ready" >"$out/server.log" 2>&1 <<'PY' &
import socket, select, sys, time
ip, ready = sys.argv[1], sys.argv[2]
udp = []
for port in (3478, 3479):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port)); udp.append(s)
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((ip, 3478)); tcp.listen(8)
open(ready, "w").close()
end = time.time() + 20
while time.time() < end:
    r, _, _ = select.select(udp + [tcp], [], [], 0.5)
    for s in r:
        if s is tcp:
            c, addr = tcp.accept()
            c.sendall(f"{addr[0]}:{addr[1]}".encode()); c.close()
        else:
            data, addr = s.recvfrom(64)
            if data == b"quit":
                sys.exit(0)
            s.sendto(f"{addr[0]}:{addr[1]}".encode(), addr)
PY
  local spid=$!
  nat_pids+=("$spid")
  local i
  for i in $(seq 1 50); do [ -e "$out/server.ready" ] && break; sleep 0.1; done

  local h others report fails=0
  for h in a b c; do
    others=()
    for i in a b c; do [ "$i" != "$h" ] && others+=("${nat_ip[$i]}"); done
    if ! report=$(ip netns exec "${nat_ns[$h]}" "$nat_py" - "$h" "${nat_wan_of_router[${nat_router_of[$h]}]}" \
        "${nat_kind[${nat_router_of[$h]}]}" "${others[@]}" 2>&1 <<'PY'
import errno, socket, sys
name, wan, kind, others = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
relay = "198.51.100.10"
seen, problems = {}, []
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5000)); s.settimeout(1)
for port in (3478, 3479):
    for _ in range(3):
        s.sendto(b"?", (relay, port))
        try:
            seen[port] = s.recvfrom(64)[0].decode(); break
        except socket.timeout:
            pass
try:
    t = socket.create_connection((relay, 3478), timeout=2)
    seen["tcp"] = t.recv(64).decode(); t.close()
except OSError as e:
    problems.append(f"TCP to the relay failed: {e}")
if len(seen) < 2 or 3478 not in seen or 3479 not in seen:
    problems.append(f"UDP to the relay failed (answers: {seen})")
else:
    ips = {v.split(":")[0] for v in seen.values()}
    if ips != {wan}:
        problems.append(f"the relay saw source(s) {sorted(ips)}, not the NAT's {wan}")
    p1, p2 = seen[3478].split(":")[1], seen[3479].split(":")[1]
    mapping = "cone" if p1 == p2 else "symmetric"
    if mapping != kind:
        problems.append(f"expected a {kind} NAT, but port 5000 was mapped to {p1} and {p2} for two destinations")
for ip in others:
    try:
        socket.create_connection((ip, 9), timeout=1).close()
        problems.append(f"reached the private address {ip}")
    except ConnectionRefusedError:
        problems.append(f"reached the private address {ip} (refused)")
    except OSError:
        pass  # unreachable or timed out: as it should be
udp = f"udp 5000 -> {seen.get(3478, '?')} / {seen.get(3479, '?')}"
print(f"   {name}: {udp}, tcp -> {seen.get('tcp', '?')} ({kind}); private peers unreachable" if not problems
      else f"   {name}: " + "; ".join(problems))
sys.exit(1 if problems else 0)
PY
    ); then
      fails=$((fails + 1))
    fi
    nat_say "$report"
  done
  # The relay must not reach any private address.
  if ! report=$(ip netns exec "${nat_ns[relay]}" "$nat_py" - "${nat_ip[a]}" "${nat_ip[b]}" "${nat_ip[c]}" 2>&1 <<'PY'
import socket, sys
bad = []
for ip in sys.argv[1:]:
    try:
        socket.create_connection((ip, 9), timeout=1).close(); bad.append(ip)
    except ConnectionRefusedError:
        bad.append(ip)
    except OSError:
        pass
print("   relay: private addresses unreachable" if not bad else f"   relay: reached private address(es) {bad}")
sys.exit(1 if bad else 0)
PY
  ); then
    fails=$((fails + 1))
  fi
  nat_say "$report"
  ip netns exec "${nat_ns[a]}" "$nat_py" -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"quit", ("198.51.100.10", 3478))' 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
  [ "$fails" -eq 0 ]
}

# ---------------------------------------------------------------------------------------------
# Nodes

declare -A nat_pid_of=() nat_peer=()

# A node runs in the namespace of the same name on port 4001 (TCP and UDP) with its API on
# 127.0.0.1:7440, unless placed elsewhere: `nat_place NAME HOST PORT API_PORT` puts node NAME in
# host HOST's namespace, next to HOST's own node, on ports of its own (the split checks do).
declare -A nat_host_of=() nat_port_of=() nat_api_of=()
nat_place() { nat_host_of[$1]=$2 nat_port_of[$1]=$3 nat_api_of[$1]=$4; }
nat_ns_of() { echo "${nat_ns[${nat_host_of[$1]:-$1}]}"; }

# nat_start_node NAME [extra join args...]: starts `mesh join` for node NAME, in the background.
nat_start_node() {
  local name=$1 ip=0.0.0.0 port=${nat_port_of[$1]:-4001} api=${nat_api_of[$1]:-7440}
  shift
  [ "$name" = relay ] && ip=198.51.100.10
  [ "$name" = relay2 ] && ip=198.51.100.11
  mkdir -p "$run_dir/$name"
  local listen=()
  if [ "${name#relay}" != "$name" ] || [ "$NAT_TRANSPORT" != quic ]; then listen+=(--listen "/ip4/$ip/tcp/$port"); fi
  if [ "${name#relay}" != "$name" ] || [ "$NAT_TRANSPORT" != tcp ]; then listen+=(--listen "/ip4/$ip/udp/$port/quic-v1"); fi
  RUST_LOG="$nat_rust_log" NO_COLOR=1 ip netns exec "$(nat_ns_of "$name")" "$mesh" join --json \
    --home "$run_dir/$name" "${listen[@]}" \
    --no-mdns --api "127.0.0.1:$api" "$@" >"$run_dir/$name.out" 2>"$run_dir/$name.log" &
  nat_pid_of[$name]=$!
  nat_pids+=("$!")
  nat_started_ms[$name]=$(nat_now_ms)
}
declare -A nat_started_ms=() nat_ready_ms=()

# nat_wait_ready NAME: waits for the ready line and records the node's peer id.
nat_wait_ready() {
  local name=$1 pid=${nat_pid_of[$1]} i
  for i in $(seq 1 $((NAT_READY_TIMEOUT * 10))); do
    if [ -s "$run_dir/$name.out" ] && head -1 "$run_dir/$name.out" | grep -q '"event":"ready"'; then
      nat_peer[$name]=$(head -1 "$run_dir/$name.out" | "$nat_py" -c 'import json,sys; print(json.load(sys.stdin)["peer_id"])')
      nat_ready_ms[$name]=$(nat_now_ms)
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      nat_warn "node $name exited before it was ready; its log:"
      tail -n 40 "$run_dir/$name.log" "$run_dir/$name.out" >&2
      return 1
    fi
    sleep 0.1
  done
  nat_warn "node $name printed no ready line within ${NAT_READY_TIMEOUT} s; its log:"
  tail -n 40 "$run_dir/$name.log" "$run_dir/$name.out" >&2
  return 1
}

nat_show_logs() {
  local name
  if [ "$nat_keep" = 1 ]; then
    nat_say "== log tails of run $nat_run_no (all logs are kept in $run_dir)"
  else
    nat_say "== log tails of run $nat_run_no (pass --keep to keep every log)"
  fi
  for name in relay relay2 a b c "${nat_split_nodes[@]}"; do
    [ -e "$run_dir/$name.log" ] || continue
    nat_say "--- $name: stderr ($run_dir/$name.log)"
    tail -n 25 "$run_dir/$name.log"
    nat_say "--- $name: stdout ($run_dir/$name.out)"
    tail -n 10 "$run_dir/$name.out"
  done
  # The last few failed calls (the a->b retry loop can fail many times while b is still joining).
  for name in "${nat_failed_calls[@]: -4}"; do
    nat_say "--- failed call $name"
    tail -n 10 "$name" "${name%.json}.log"
  done
}

# ---------------------------------------------------------------------------------------------
# Calls

# nat_call FROM TO LABEL TIMEOUT [MODEL]: one `mesh infer` from FROM's namespace through FROM's node.
# LABEL goes into the record's "attempt": join (the a->b retry loop right after b joined; the
# last one of them answered), first (a pair's first call), final (the call after the punch).
# MODEL (default echo) is the model called; TO may be `any`.
# Sets c_ok (ok|fail) c_path c_ttfb c_total c_peer c_wall c_err, and appends a "call" record to
# the results.
nat_call() {
  local from=$1 to=$2 label=$3 secs=$4 model=${5:-echo} target
  nat_call_seq=$((nat_call_seq + 1))
  local base="$run_dir/call$nat_call_seq-$from-$to"
  local started rc=0
  if [ "$to" = any ]; then target=any; else target=${nat_peer[$to]}; fi
  started=$(nat_now_ms)
  ip netns exec "${nat_ns[$from]}" "$mesh" infer --json --no-mdns --home "$run_dir/$from" \
    "$target" "$model" --prompt "hello from $from" --timeout "$secs" >"$base.json" 2>"$base.log" &
  nat_call_pid=$!
  nat_pids+=("$nat_call_pid")
  wait "$nat_call_pid" || rc=$?
  c_ended_ms=$(nat_now_ms)
  nat_call_pid=
  local line
  line=$("$nat_py" - "$base.json" "$base.log" "echo: hello from $from" "$nat_results" "$nat_run_no" \
    "$from->$to" "$(nat_nats "$from" "$to")" "$label" "$rc" "$started" "$c_ended_ms" <<'PY'
import json, sys
out, log, expect, results, run, pair, nats, label, rc, started, ended = sys.argv[1:]
events = []
for l in open(out, errors="replace"):
    l = l.strip()
    if l:
        try:
            events.append(json.loads(l))
        except ValueError:
            pass
done = next((e for e in events if e.get("event") == "done"), None)
text = "".join(e.get("text", "") for e in events if e.get("event") == "delta").strip()
err = None
if done is None:
    e = next((e for e in events if e.get("event") == "error"), None)
    if e:
        err = f"{e.get('code')}: {e.get('message')}"
    else:
        tail = [l.strip() for l in open(log, errors="replace") if l.strip()]
        err = f"no answer (exit {rc})" + (f": {tail[-1]}" if tail else "")
elif text != expect:
    err = f"wrong answer {text!r}, expected {expect!r}"
done = done or {}
rec = {"kind": "call", "run": int(run), "pair": pair, "nats": nats, "attempt": label,
       "ok": err is None, "path": done.get("path"), "peer": done.get("peer"),
       "wall_ms": int(ended) - int(started),
       "time_to_first_byte_ms": done.get("time_to_first_byte_ms"), "total_ms": done.get("total_ms"),
       "connect_ms": done.get("connect_ms"), "exit": int(rc), "error": err,
       "started_ms": int(started), "ended_ms": int(ended)}
with open(results, "a") as f:
    f.write(json.dumps(rec) + "\n")
def s(v):
    return "-" if v is None else str(v)
print("\t".join(["ok" if err is None else "fail", s(rec["path"]), s(rec["time_to_first_byte_ms"]),
                 s(rec["total_ms"]), s(rec["peer"]), (err or "").replace("\t", " ").replace("\n", " ")]))
PY
  )
  IFS=$'\t' read -r c_ok c_path c_ttfb c_total c_peer c_err <<<"$line" || true
  c_wall=$((c_ended_ms - started))
  c_err=${c_err:-}
  [ "$c_ok" = ok ] || nat_failed_calls+=("$base.json")
}

# Small-call latency from $1 to $2 over the connection the pair ended up with: NAT_LATENCY_CALLS
# calls through the caller node's API (/v1/mesh/infer), one after another, timed in the caller's
# namespace. Records a "latency" line; prints "PATH MEDIAN_US P90_US" (or "- - -").
nat_latency() {
  local from=$1 to=$2
  ip netns exec "${nat_ns[$from]}" "$nat_py" - "${nat_peer[$to]}" "$NAT_LATENCY_CALLS" \
    "$nat_results" "$nat_run_no" "$from->$to" "$(nat_nats "$from" "$to")" <<'PY'
import json, statistics, sys, time, urllib.request
peer, n, results, run, pair, nats = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
body = json.dumps({"target": peer, "model": "echo", "prompts": ["ping"], "deadline_ms": 10000}).encode()
times, paths = [], set()
for _ in range(n):
    req = urllib.request.Request("http://127.0.0.1:7440/v1/mesh/infer", data=body,
                                 headers={"content-type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=15) as r:
        lines = [json.loads(l) for l in r.read().splitlines() if l.strip()]
    elapsed = time.perf_counter() - t
    done = next((e for e in lines if e.get("event") == "done"), None)
    if done is None:
        continue
    times.append(elapsed * 1e6)
    paths.add(done.get("path"))
if not times:
    print("- - -"); sys.exit(0)
times.sort()
path = paths.pop() if len(paths) == 1 else "mixed"
med, p90 = statistics.median(times), times[int(0.9 * (len(times) - 1))]
with open(results, "a") as f:
    f.write(json.dumps({"kind": "latency", "run": int(run), "pair": pair, "nats": nats, "path": path,
                        "calls": len(times), "median_us": round(med), "p90_us": round(p90)}) + "\n")
print(path, round(med), round(p90))
PY
}

# nat_metrics: scrapes a's GET /metrics after the latency series (calls through a's API
# to b, hole-punched, and to c, relayed) and checks that its counters saw them: its hole punches
# (DCUtR successes) and its answered calls by path. Sets metrics_line; returns 1 when a counter
# did not move.
nat_metrics() {
  local out rc=0
  out=$(ip netns exec "${nat_ns[a]}" "$nat_py" - <<'PY'
import re, sys, urllib.request
with urllib.request.urlopen("http://127.0.0.1:7440/metrics", timeout=10) as r:
    kind = r.headers.get("content-type", "")
    text = r.read().decode()
def total(name, **labels):
    n = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            n += float(line.rsplit(" ", 1)[1])
    return n
punched = total("mesh_hole_punches_total", result="success")
via_punch = total("mesh_calls_made_total", outcome="answered", path="hole-punched")
via_relay = total("mesh_calls_made_total", outcome="answered", path="relayed")
ok = kind.startswith("application/openmetrics-text") and text.endswith("# EOF\n") \
    and punched >= 1 and via_punch >= 1 and via_relay >= 1
print(f"a's /metrics: {punched:.0f} hole punch(es) succeeded, calls answered hole-punched {via_punch:.0f}, relayed {via_relay:.0f}")
sys.exit(0 if ok else 1)
PY
  ) || rc=1
  metrics_line="   $out"
  [ "$rc" = 0 ] || metrics_line="$metrics_line: WRONG (a counter did not move)"
  return "$rc"
}

# nat_doctor: `mesh doctor` as the lab's operators would run it. On c (behind the symmetric
# NAT) it must say so from the ports its peers observe, name the relays its calls go through,
# and explain a relayed a by the symmetric NAT; on a (cone NAT) it must find the mapping
# consistent. Sets doctor_line; returns 1 when a verdict is wrong.
nat_doctor() {
  local rc=0 out_c out_ca out_a
  out_c=$(ip netns exec "$(nat_ns_of c)" env RUST_LOG=warn "$mesh" doctor --home "$run_dir/c" --json 2>&1) || true
  out_ca=$(ip netns exec "$(nat_ns_of c)" env RUST_LOG=warn "$mesh" doctor "${nat_peer[a]}" --home "$run_dir/c" --json 2>&1) || true
  out_a=$(ip netns exec "$(nat_ns_of a)" env RUST_LOG=warn "$mesh" doctor --home "$run_dir/a" --json 2>&1) || true
  doctor_line=$("$nat_py" - "$out_c" "$out_ca" "$out_a" "${nat_peer[a]}" "$NAT_TRANSPORT" <<'PY'
import json, sys
out_c, out_ca, out_a, peer_a, transport = sys.argv[1:]
def checks(text):
    try:
        return json.loads(text.strip().splitlines()[-1])["checks"]
    except (ValueError, IndexError, KeyError):
        return []
c, ca, a = checks(out_c), checks(out_ca), checks(out_a)
problems = []
reach = next((x["summary"] for x in c if x["area"] == "reach"), "")
c_nat = [x for x in c if x["area"].startswith("nat ")]
# Every transport two peers observed must say symmetric; one observed by a single peer is
# unknown. c joins through both relays over one transport, so that one is always judged.
judged = [x for x in c_nat if "not enough to judge" not in x["summary"]]
must_judge = True
if (must_judge and not judged) or not all(x["verdict"] == "warn" and "symmetric" in x["summary"] for x in judged):
    problems.append(f"c's nat checks: {c_nat}")
if judged and not reach.startswith("behind a symmetric NAT: direct connections will not form; calls go through relays"):
    problems.append(f"c's reach: {reach or out_c[-300:]!r}")
short = f"peer {peer_a[:8]}\u2026{peer_a[-6:]}"
why = next((x for x in ca if x["area"] == short), None)
if not why or why["verdict"] != "warn" or (judged and "symmetric NAT" not in why["summary"]):
    problems.append(f"c's doctor {peer_a[:12]}: {why or out_ca[-300:]}")
a_nat = [x for x in a if x["area"].startswith("nat ") and "not enough to judge" not in x["summary"]]
if (must_judge and not a_nat) or not all(x["verdict"] == "ok" and "consistently" in x["summary"] for x in a_nat):
    problems.append(f"a's nat checks: {a_nat or out_a[-300:]}")
if problems:
    print("mesh doctor: WRONG: " + "; ".join(problems))
    sys.exit(1)
c_says = f"{judged[0]['area']} on c: {judged[0]['summary'][:70]}..." if judged else "c: no transport observed by two peers"
a_says = f"on a: {a_nat[0]['summary'][:70]}..." if a_nat else "a: no transport observed by two peers"
print(f"mesh doctor: c says {reach[:90]}...; {c_says}; {a_says}; c explains a: {why['summary'][:90]}...")
PY
  ) || rc=1
  doctor_line="   $doctor_line"
  return "$rc"
}

# nat_status NAME: what node NAME says of its reachability (GET /v1/mesh/status), checked against
# what the lab built: the relay public and relaying; a NATed node not public, reachable through
# the relay, and not relaying. Prints one line; returns 1 when the node is wrong about itself.
nat_status() {
  local name=$1
  ip netns exec "${nat_ns[$name]}" "$nat_py" - "$name" "${nat_peer[relay]}" <<'PY'
import json, sys, urllib.request
name, relay = sys.argv[1], sys.argv[2]
with urllib.request.urlopen("http://127.0.0.1:7440/v1/mesh/status", timeout=10) as r:
    net = json.load(r)["network"]
reach, relays, relaying = net["reachability"], net["relays"], net["relaying"]
print(f"   {name}: reachability {reach}, relays {len(relays)}, relaying {str(relaying).lower()}")
if name.startswith("relay"):
    ok = reach == "public" and relaying
else:
    ok = reach != "public" and relay in relays and not relaying
sys.exit(0 if ok else 1)
PY
}

# nat_failover: stops the first relay (NAT_RELAY_STOP: KILL, a crash, by default: its TCP
# connections are reset by the kernel, its QUIC connections just go silent until their idle
# timeout; TERM lets it close them) and checks the NATed nodes carry on through the second:
# the next a->c call answers soon (a "recovery" record), each node ends up holding a
# reservation with relay2 only, and a->c (symmetric NAT, so relayed) still answers. Sets
# failover_line; returns 1 on failure.
nat_failover() {
  local pid=${nat_pid_of[relay]} n i
  kill "-$NAT_RELAY_STOP" "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  local t0 waited
  t0=$(nat_now_ms)
  # The next a->c call, at once: the time from relay 1's end to the first answer.
  nat_recover relay-stopped "$t0" a c echo
  for n in a b c; do
    if ! ip netns exec "${nat_ns[$n]}" "$nat_py" - "${nat_peer[relay2]}" 25 <<'PY'
import json, sys, time, urllib.request
want, secs = sys.argv[1], float(sys.argv[2])
end = time.time() + secs
while time.time() < end:
    try:
        with urllib.request.urlopen("http://127.0.0.1:7440/v1/mesh/status", timeout=5) as r:
            if json.load(r)["network"]["relays"] == [want]:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(1)
PY
    then
      failover_line="   relay 1 stopped: $n holds no reservation with relay 2 alone after 25 s"
      return 1
    fi
  done
  waited=$(($(nat_now_ms) - t0))
  nat_call a c failover "$NAT_CALL_TIMEOUT"
  if [ "$c_ok" != ok ]; then
    failover_line="   relay 1 stopped: a, b, c on relay 2 after $waited ms, but a->c failed: $c_err"
    return 1
  fi
  failover_line="   relay 1 stopped: a, b, c on relay 2 alone after $waited ms; a->c answered, $c_path, in $c_total ms"
  printf '{"kind": "failover", "run": %s, "relays_replaced_ms": %s, "call_ok": true, "path": "%s", "total_ms": %s}\n' \
    "$nat_run_no" "$waited" "$c_path" "$c_total" >>"$nat_results"
}

# ---------------------------------------------------------------------------------------------
# Recovery (issue 20): how long after an event the next call answers. Each event writes a
# "recovery" record: the event, whether it passed, the time from the event to the first answer
# (recovery_ms), and every call's wall time in order.

# nat_recover EVENT T0 FROM TO MODEL: calls FROM->TO (TO may be `any`) one after the other until
# one answers (at most NAT_RECOVERY_TIMEOUT s after T0, each call bounded by NAT_ATTEMPT_TIMEOUT)
# and records how long after T0 it answered. Sets r_ms (- if never).
nat_recover() {
  local event=$1 t0=$2 from=$3 to=$4 model=$5 walls=() left
  r_ms=-
  while :; do
    left=$(((t0 + NAT_RECOVERY_TIMEOUT * 1000 - $(nat_now_ms)) / 1000))
    [ "$left" -ge 1 ] || break
    nat_call "$from" "$to" "$event" "$((left < NAT_ATTEMPT_TIMEOUT ? left : NAT_ATTEMPT_TIMEOUT))" "$model"
    walls+=("$c_wall")
    if [ "$c_ok" = ok ]; then r_ms=$((c_ended_ms - t0)); break; fi
    sleep 0.1
  done
  nat_recovery_record "$event" "$([ "$r_ms" = - ] && echo 0 || echo 1)" "$r_ms" "${walls[*]}" \
    "$from->$to ${c_path:--}"
  [ "$r_ms" = - ] && nat_network_views "$from" "$to"
  nat_say "   $event: $from->$to answered $([ "$r_ms" = - ] && echo "never (within ${NAT_RECOVERY_TIMEOUT} s)" || echo "$r_ms ms after it") ($((${#walls[@]})) call(s): ${walls[*]} ms)"
}

# nat_network_views NAME...: what each node says of its network (reachability, external
# addresses, relays held) and of its peers (path and addresses), for a failure's diagnosis.
nat_network_views() {
  local name
  for name in "$@"; do
    nat_say "   -- $name's view of the network (GET /v1/mesh/status, /v1/mesh/peers):"
    ip netns exec "$(nat_ns_of "$name")" "$nat_py" - "${nat_api_of[$name]:-7440}" <<'PY' || true
import json, sys, urllib.request
api = sys.argv[1]
for path in ("status", "peers"):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{api}/v1/mesh/{path}", timeout=5) as r:
            body = json.load(r)
        print(f"      {path}: {json.dumps(body.get('network', body) if path == 'status' else body)[:4000]}")
    except OSError as e:
        print(f"      {path}: unavailable ({e})")
PY
  done
}

nat_recovery_record() { # EVENT OK MS "WALL_MS ..." NOTE
  "$nat_py" - "$nat_results" "$nat_run_no" "$NAT_TRANSPORT" "$NAT_RELAY_STOP" "$@" <<'PY'
import json, sys
results, run, transport, relay_stop, event, ok, ms, walls, note = sys.argv[1:]
rec = {"kind": "recovery", "run": int(run), "event": event, "ok": ok == "1",
       "recovery_ms": None if ms == "-" else int(ms),
       "calls_ms": [int(w) for w in walls.split()], "note": note,
       "transport": transport, "relay_stop": relay_stop}
with open(results, "a") as f:
    f.write(json.dumps(rec) + "\n")
PY
}

# nat_frozen: twin-b (next to b) and twin-c (next to c) both host `twin`. Once a lists both,
# the one a's next `any twin` call goes to is stopped with SIGSTOP (its sockets stay open; it
# never answers again) and a calls `any twin` NAT_FROZEN_CALLS times:
# every call must answer, from the other, within NAT_FROZEN_LIMIT_MS. Returns 1 on failure.
nat_frozen() {
  local boot=$1 n frozen="" i slow=0 failed=0 walls=() t0
  for n in twin-b twin-c; do
    nat_start_node "$n" --model twin=builtin:echo --bootstrap "$boot"
    nat_wait_ready "$n" || { frozen_line="   frozen provider: $n not ready"; return 1; }
  done
  # Once a sees both providers, the one its next call goes to is the one it prefers: frozen.
  ip netns exec "${nat_ns[a]}" "$nat_py" - <<'PY' || true
import json, time, urllib.request
end = time.time() + 30
while time.time() < end:
    try:
        with urllib.request.urlopen("http://127.0.0.1:7440/v1/mesh/models", timeout=5) as r:
            if sum(row.get("model") == "twin" for row in json.load(r)) >= 2:
                break
    except OSError:
        pass
    time.sleep(0.2)
PY
  nat_call a any warm "$NAT_ATTEMPT_TIMEOUT" twin
  [ "$c_ok" = ok ] && frozen=$c_peer
  if [ -z "$frozen" ] || [ "$frozen" = - ]; then
    frozen_line="   frozen provider: a's \`any twin\` did not answer: $c_err"
    return 1
  fi
  local pid name
  for name in twin-b twin-c; do [ "${nat_peer[$name]}" = "$frozen" ] && pid=${nat_pid_of[$name]} n=$name; done
  kill -STOP "$pid"
  t0=$(nat_now_ms)
  for i in $(seq 1 "$NAT_FROZEN_CALLS"); do
    nat_call a any frozen "$NAT_ATTEMPT_TIMEOUT" twin
    walls+=("$c_wall")
    if [ "$c_ok" != ok ] || [ "$c_peer" = "$frozen" ]; then failed=$((failed + 1));
    elif [ "$c_wall" -gt "$NAT_FROZEN_LIMIT_MS" ]; then slow=$((slow + 1)); fi
  done
  kill -CONT "$pid" 2>/dev/null || true
  kill -KILL "${nat_pid_of[twin-b]}" "${nat_pid_of[twin-c]}" 2>/dev/null || true
  { wait "${nat_pid_of[twin-b]}" "${nat_pid_of[twin-c]}"; } 2>/dev/null || true
  local answered=$((NAT_FROZEN_CALLS - failed))
  nat_recovery_record provider-frozen "$([ $failed -eq 0 ] && [ $slow -eq 0 ] && echo 1 || echo 0)" \
    "$([ "$failed" -eq 0 ] && echo "${walls[0]}" || echo -)" "${walls[*]}" "$n frozen, $answered/$NAT_FROZEN_CALLS answered, $slow over ${NAT_FROZEN_LIMIT_MS} ms"
  frozen_line="   frozen provider ($n stopped by SIGSTOP): a's \`any twin\` calls answered $answered/$NAT_FROZEN_CALLS, $slow over $NAT_FROZEN_LIMIT_MS ms (${walls[*]} ms)"
  [ "$failed" -eq 0 ] && [ "$slow" -eq 0 ]
}

nat_nats() { echo "$(nat_kind_of "$1")->$(nat_kind_of "$2")"; }
nat_kind_of() {
  if [ -n "${nat_router_of[$1]:-}" ]; then echo "${nat_kind[${nat_router_of[$1]}]}"; else echo public; fi
}

# nat_wait_punched FROM TO SECS: polls FROM's `mesh peers --json` until TO's entry says hole-punched.
nat_wait_punched() {
  local from=$1 to=$2 secs=$3 end
  end=$(($(nat_now_ms) + secs * 1000))
  while [ "$(nat_now_ms)" -lt "$end" ]; do
    if ip netns exec "${nat_ns[$from]}" "$mesh" peers --json --home "$run_dir/$from" 2>/dev/null |
        grep -F "\"peer_id\":\"${nat_peer[$to]}\"" | grep -q '"path":"hole-punched"'; then
      return 0
    fi
    sleep 0.25
  done
  return 1
}

# nat_record_pair FROM TO OK PATH FIRST_PATH TTFB TOTAL RESULT: a table row and a "pair" record
# (c_ok tells whether the pair's last call answered).
nat_record_pair() {
  local from=$1 to=$2 ok=$3 path=$4 first=$5 ttfb=$6 total=$7 result=$8
  nat_rows+=("$(printf '%-6s %-16s %-13s %8s %9s  %s' "$from->$to" "$(nat_nats "$from" "$to")" "$path" "$ttfb" "$total" "$result")")
  "$nat_py" - "$nat_results" "$nat_run_no" "$from->$to" "$(nat_nats "$from" "$to")" "$ok" "$([ "$c_ok" = ok ] && echo 1 || echo 0)" "$path" "$first" \
    "$ttfb" "$total" "$result" <<'PY'
import json, sys
results, run, pair, nats, ok, answered, path, first, ttfb, total, result = sys.argv[1:]
num = lambda v: None if v in ("", "-") else int(v)
rec = {"kind": "pair", "run": int(run), "pair": pair, "nats": nats, "ok": ok == "1",
       "answered": answered == "1",
       "path": None if path == "-" else path, "first_path": None if first == "-" else first,
       "hole_punched": path == "hole-punched", "time_to_first_byte_ms": num(ttfb),
       "total_ms": num(total), "result": result}
with open(results, "a") as f:
    f.write(json.dumps(rec) + "\n")
PY
  [ "$ok" = 1 ] || nat_run_failures=$((nat_run_failures + 1))
}

# A cone<->cone pair after its first call (c_* hold that call): it must end up hole-punched.
nat_finish_cone_pair() {
  local from=$1 to=$2
  if [ "$c_ok" != ok ]; then
    nat_record_pair "$from" "$to" 0 "$c_path" "$c_path" "$c_ttfb" "$c_total" "FAIL: $c_err"
    return
  fi
  local first=$c_path
  if [ "$first" = hole-punched ]; then
    nat_record_pair "$from" "$to" 1 "$c_path" "$first" "$c_ttfb" "$c_total" "ok (1st call already hole-punched)"
    return
  fi
  local t0 waited note
  t0=$(nat_now_ms)
  if nat_wait_punched "$from" "$to" "$NAT_PUNCH_WAIT"; then
    waited=$(($(nat_now_ms) - t0))
    note="punched ${waited} ms after the 1st call"
  else
    note="mesh peers never said hole-punched within ${NAT_PUNCH_WAIT} s"
  fi
  nat_call "$from" "$to" final "$NAT_CALL_TIMEOUT"
  if [ "$c_ok" != ok ]; then
    nat_record_pair "$from" "$to" 0 "$c_path" "$first" "$c_ttfb" "$c_total" "FAIL: 2nd call: $c_err"
  elif [ "$c_path" != hole-punched ]; then
    nat_record_pair "$from" "$to" 0 "$c_path" "$first" "$c_ttfb" "$c_total" "FAIL: not hole-punched (1st call $first; $note)"
  else
    nat_record_pair "$from" "$to" 1 "$c_path" "$first" "$c_ttfb" "$c_total" "ok (1st call $first, $note)"
  fi
}

# A pair with the symmetric NAT: punching cannot work; the call must answer, over the relay.
nat_symmetric_pair() {
  local from=$1 to=$2
  nat_call "$from" "$to" first "$NAT_CALL_TIMEOUT"
  if [ "$c_ok" != ok ]; then
    nat_record_pair "$from" "$to" 0 "$c_path" "$c_path" "$c_ttfb" "$c_total" "FAIL: $c_err"
  elif [ "$c_path" != relayed ]; then
    nat_record_pair "$from" "$to" 1 "$c_path" "$c_path" "$c_ttfb" "$c_total" "ok (but expected relayed)"
  else
    nat_record_pair "$from" "$to" 1 "$c_path" "$c_path" "$c_ttfb" "$c_total" "ok"
  fi
}

# ---------------------------------------------------------------------------------------------
# A model split by layers across the NATs (`mesh join --layers`). Extra nodes, each in a host's
# namespace next to that host's own node (which keeps serving echo):
#
#   stage-b   behind b's cone NAT         layers 10..30 of SmolLM2 (a stage, found in the DHT)
#   head-a    behind a's cone NAT         layers 0..10: serves `smol`, runs 10..30 on stage-b
#   head-c    behind c's symmetric NAT    layers 0..10: stage-b is reachable only through a relay
#   head-cr   behind c's symmetric NAT    the same with --split-allow-relayed
#
# Rows X=>Y: a greedy call to the head on X whose layers 10..30 run on the stage on Y. a=>b must
# answer with the stage's path hole-punched; c=>b must not be planned by default (the error names
# stage-b as reachable only through a relay), and answers over the relay with
# --split-allow-relayed (the same text as a=>b: greedy, the same weights, f32 hidden states).

nat_split_nodes=(stage-b head-a head-c head-cr)
nat_place stage-b b 4002 7441
nat_place head-a a 4003 7442
nat_place head-c c 4004 7443
nat_place head-cr c 4005 7444
nat_place twin-b b 4006 7445
nat_place twin-c c 4007 7446
nat_split_prompt="Name the capital of France."
nat_split_tokens=16

# nat_split_call HEAD SECS EXPECT SAME_AS: one greedy `mesh infer` of `smol` through head HEAD,
# addressed to the head itself. EXPECT is the stage path an answer must show (hole-punched,
# relayed); SAME_AS a file with the text the answer must equal, or "-". Sets s_kind (answered,
# refused: stage-b left out as reachable only through a relay, fail: anything else), s_path (the
# stage's path; relayed for a refusal), s_ttfb, s_total, s_text (quoted, shortened) and s_problem
# (why an answer or refusal is wrong, or the error); s_base.outcome.json holds all of it.
nat_split_call() {
  local head=$1 secs=$2 expect=$3 same_as=$4 rc=0
  nat_call_seq=$((nat_call_seq + 1))
  s_base="$run_dir/call$nat_call_seq-split-$head"
  ip netns exec "$(nat_ns_of "$head")" "$mesh" infer --json --no-mdns --home "$run_dir/$head" \
    "${nat_peer[$head]}" smol --prompt "$nat_split_prompt" --max-tokens "$nat_split_tokens" \
    --timeout "$secs" >"$s_base.json" 2>"$s_base.log" &
  nat_call_pid=$!
  nat_pids+=("$nat_call_pid")
  wait "$nat_call_pid" || rc=$?
  nat_call_pid=
  local line
  line=$("$nat_py" - "$s_base" "$rc" "${nat_peer[stage-b]}" "$expect" "$same_as" <<'PY'
import json, re, sys
base, rc, stage, expect, same_as = sys.argv[1:]
events = []
for l in open(base + ".json", errors="replace"):
    l = l.strip()
    if l:
        try:
            events.append(json.loads(l))
        except ValueError:
            pass
done = next((e for e in events if e.get("event") == "done"), None)
error = next((e for e in events if e.get("event") == "error"), None)
text = "".join(e.get("text", "") for e in events if e.get("event") == "delta")
stages = (done or {}).get("stages") or []
kind, path, problems = "fail", None, []
if done is not None:
    kind = "answered"
    path = stages[0].get("path") if stages else None
    if not text.strip():
        problems.append("empty answer")
    if len(stages) != 1:
        problems.append(f"{len(stages)} stages in done, expected 1: {stages}")
    else:
        s = stages[0]
        if s.get("peer") != stage:
            problems.append(f"stage {s.get('peer')}, expected stage-b {stage}")
        if s.get("layers") != "10..30":
            problems.append(f"stage layers {s.get('layers')}, expected 10..30")
        if s.get("replacement"):
            problems.append("the stage was a replacement")
        if not re.fullmatch(r"[0-9a-f]{64}", s.get("receipt_sha256") or ""):
            problems.append("no stage receipt")
        if (s.get("steps") or 0) < 2:
            problems.append(f"{s.get('steps')} steps")
        if path != expect:
            problems.append(f"stage path {path}, expected {expect}")
    if same_as != "-":
        want = open(same_as).read()
        if text != want:
            problems.append(f"text {text!r} differs from a=>b's {want!r}")
elif error is not None:
    message = error.get("message") or ""
    if "no node runs layers 10..30" in message and f"{stage}: reachable only through a relay" in message:
        kind, path = "refused", "relayed"
    else:
        problems.append(f"{error.get('code')}: {message}")
else:
    tail = [l.strip() for l in open(base + ".log", errors="replace") if l.strip()]
    problems.append(f"no answer (exit {rc})" + (f": {tail[-1]}" if tail else ""))
outcome = {"kind": kind, "path": path, "text": text if done else None, "stages": stages,
           "error": error, "time_to_first_byte_ms": (done or {}).get("time_to_first_byte_ms"),
           "total_ms": (done or {}).get("total_ms"), "problem": "; ".join(problems) or None,
           "exit": int(rc)}
json.dump(outcome, open(base + ".outcome.json", "w"))
if done is not None:
    open(base + ".text", "w").write(text)
shown = json.dumps(text.strip() if len(text.strip()) <= 48 else text.strip()[:45] + "...")
s = lambda v: "-" if v is None else str(v)
print("\t".join([kind, s(path), s(outcome["time_to_first_byte_ms"]), s(outcome["total_ms"]), shown,
                 (outcome["problem"] or "").replace("\t", " ").replace("\n", " ")]))
PY
  )
  IFS=$'\t' read -r s_kind s_path s_ttfb s_total s_text s_problem <<<"$line" || true
  s_problem=${s_problem:-}
  if [ "$s_kind" = fail ] || [ -n "$s_problem" ]; then nat_failed_calls+=("$s_base.json"); fi
}

# nat_split_until HEAD WANT EXPECT SAME_AS: calls through head HEAD until the outcome is WANT
# (answered or refused) or something else final, within NAT_SPLIT_TIMEOUT s of the head's start
# (the stage must be found in the DHT and the path to it settled). Sets the s_* of the last call,
# s_attempts and s_first_ms (head start to that call's end).
nat_split_until() {
  local head=$1 want=$2 expect=$3 same_as=$4 deadline left per
  deadline=$((nat_started_ms[$head] + NAT_SPLIT_TIMEOUT * 1000))
  s_attempts=0 s_first_ms=- s_kind=fail s_path=- s_ttfb=- s_total=- s_text='""'
  s_problem="no call within ${NAT_SPLIT_TIMEOUT} s of the head's start" s_base=
  while :; do
    left=$(((deadline - $(nat_now_ms)) / 1000))
    [ "$left" -ge 1 ] || break
    per=$((left < NAT_CALL_TIMEOUT ? left : NAT_CALL_TIMEOUT))
    s_attempts=$((s_attempts + 1))
    nat_split_call "$head" "$per" "$expect" "$same_as"
    # An answer is final (right or wrong); so is the refusal asked for.
    if [ "$s_kind" = answered ] || [ "$s_kind" = "$want" ]; then
      s_first_ms=$(($(nat_now_ms) - nat_started_ms[$head]))
      return 0
    fi
    sleep 0.5
  done
  s_problem="not $want within ${NAT_SPLIT_TIMEOUT} s of the head's start ($s_attempts attempts); last: $s_problem"
}

# nat_split_record CHECK HEAD_HOST STAGE_HOST OK RESULT: a table row (PATH is the stage's) and a
# "split" record with the last call's outcome.
nat_split_record() {
  local check=$1 from=$2 to=$3 ok=$4 result=$5
  nat_rows+=("$(printf '%-6s %-16s %-13s %8s %9s  %s' "$from=>$to" "$(nat_nats "$from" "$to")" "$s_path" "$s_ttfb" "$s_total" "$result")")
  "$nat_py" - "$nat_results" "$nat_run_no" "$check" "$from" "$to" "$(nat_nats "$from" "$to")" "$ok" \
    "$s_attempts" "$s_first_ms" "${s_base:+$s_base.outcome.json}" "$result" <<'PY'
import json, sys
results, run, check, head, stage, nats, ok, attempts, first, outcome, result = sys.argv[1:]
o = json.load(open(outcome)) if outcome else {}
rec = {"kind": "split", "run": int(run), "check": check, "head": head, "stage": stage, "nats": nats,
       "ok": ok == "1", "outcome": o.get("kind"), "path": o.get("path"), "text": o.get("text"),
       "stages": o.get("stages") or [], "time_to_first_byte_ms": o.get("time_to_first_byte_ms"),
       "total_ms": o.get("total_ms"), "first_answer_ms": None if first == "-" else int(first),
       "attempts": int(attempts), "error": (o.get("error") or {}).get("message"), "result": result}
with open(results, "a") as f:
    f.write(json.dumps(rec) + "\n")
PY
  [ "$ok" = 1 ] || nat_run_failures=$((nat_run_failures + 1))
}

# nat_pull NODE PATH: NODE pulls SmolLM2's file from stage-b (behind b's cone NAT) through its
# running node (`mesh model pull --from`): a (behind the other cone NAT) must end hole-punched to
# stage-b, c (behind the symmetric NAT) relayed. The file must be whole (sha256) and every piece
# from stage-b. Appends to pull_line; returns 1 on failure.
nat_pull() {
  local node=$1 want=$2 out rc=0 sha line
  sha=$(sha256sum "$nat_split_model" | cut -d' ' -f1)
  out=$(ip netns exec "$(nat_ns_of "$node")" env RUST_LOG=warn "$mesh" model pull "sha256:$sha" \
    --from "${nat_peer[stage-b]}" --home "$run_dir/$node" --json 2>&1) || rc=1
  line=$(ip netns exec "$(nat_ns_of "$node")" "$nat_py" - "$out" "$sha" "${nat_peer[stage-b]}" "$rc" "$node" "$want" <<'PY'
import hashlib, json, sys, urllib.request
out, sha, stage, rc, node, want = sys.argv[1:]
lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
done = next((l for l in lines if l.get("event") == "done"), None)
with urllib.request.urlopen("http://127.0.0.1:7440/v1/mesh/peers", timeout=5) as r:
    path = next((p["path"] for p in json.load(r) if p["peer_id"] == stage), "not connected")
problems = []
if rc != "0" or not done:
    problems.append(f"the pull failed: {out[-400:]!r}")
else:
    h = hashlib.sha256()
    with open(done["path"], "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != sha:
        problems.append("the file's sha256 is wrong")
    if done["by_source"].get(stage) != done["pieces"]:
        problems.append(f"pieces not all from stage-b: {done['by_source']}")
if path != want:
    problems.append(f"{node} reaches stage-b {path}, not {want}")
if problems:
    print(f"pull {node}<=stage-b: WRONG: " + "; ".join(problems))
    sys.exit(1)
mb, secs = done["len"] / 1e6, done["took_ms"] / 1000
print(f"pull {node}<=stage-b: {mb:.0f} MB in {secs:.1f} s ({mb / secs:.0f} MB/s), {done['pieces']} pieces from stage-b, sha256 verified, path {path}")
PY
  ) || rc=1
  pull_line+="   $line"$'\n'
  return "$rc"
}

# nat_split BOOT: the split checks (see above), one head after the other. The nodes they start
# run until the run ends: stopped here, just before the failover stops relay 1, they made a, b
# and c notice relay 1's departure over QUIC only by idle timeout (10-15 s, against the
# failover's 15 s) in 3 of 5 QUIC-only runs.
nat_split() {
  local boot=$1 model="smol=$nat_split_model"
  nat_start_node stage-b --model "$model" --layers 10..30 --bootstrap "$boot"
  if ! nat_wait_ready stage-b; then
    s_attempts=0 s_first_ms=- s_path=- s_ttfb=- s_total=- s_base=
    nat_split_record hole-punched a b 0 "FAIL: stage-b (layers 10..30) not ready"
    nat_split_record relayed-refused c b 0 "FAIL: stage-b (layers 10..30) not ready"
    nat_split_record relayed-allowed c b 0 "FAIL: stage-b (layers 10..30) not ready"
    return 0
  fi
  split_line="   split rows X=>Y: the head on X runs layers 0..10 of SmolLM2, the stage on Y 10..30 (stage-b ready $((nat_ready_ms[stage-b] - nat_started_ms[stage-b])) ms after start)"

  # a=>b: cone to cone, the hop must be hole-punched.
  local a_text=-
  nat_start_node head-a --model "$model" --layers 0..10 --bootstrap "$boot"
  if ! nat_wait_ready head-a; then
    s_attempts=0 s_first_ms=- s_path=- s_ttfb=- s_total=- s_base=
    nat_split_record hole-punched a b 0 "FAIL: head-a not ready"
  else
    nat_split_until head-a answered hole-punched -
    if [ "$s_kind" = answered ] && [ -z "$s_problem" ]; then
      a_text="$s_base.text"
      nat_split_record hole-punched a b 1 "ok: $s_text (1st answer $s_first_ms ms after the head started, $s_attempts attempt(s))"
    else
      nat_split_record hole-punched a b 0 "FAIL: $s_problem"
    fi
  fi

  # c=>b by default: the only path is the relay, so no plan; the error must say why.
  nat_start_node head-c --model "$model" --layers 0..10 --bootstrap "$boot"
  if ! nat_wait_ready head-c; then
    s_attempts=0 s_first_ms=- s_path=- s_ttfb=- s_total=- s_base=
    nat_split_record relayed-refused c b 0 "FAIL: head-c not ready"
  else
    nat_split_until head-c refused relayed -
    if [ "$s_kind" = refused ]; then
      nat_split_record relayed-refused c b 1 "ok: not planned by default, stage-b \"reachable only through a relay\" ($s_first_ms ms after the head started, $s_attempts attempt(s))"
    elif [ "$s_kind" = answered ]; then
      nat_split_record relayed-refused c b 0 "FAIL: planned a relay-only hop without --split-allow-relayed ($s_text)"
    else
      nat_split_record relayed-refused c b 0 "FAIL: $s_problem"
    fi
  fi

  # c=>b with --split-allow-relayed: answers over the relay, with a=>b's text.
  nat_start_node head-cr --model "$model" --layers 0..10 --split-allow-relayed --bootstrap "$boot"
  if ! nat_wait_ready head-cr; then
    s_attempts=0 s_first_ms=- s_path=- s_ttfb=- s_total=- s_base=
    nat_split_record relayed-allowed c b 0 "FAIL: head-cr not ready"
  else
    nat_split_until head-cr answered relayed "$a_text"
    if [ "$s_kind" = answered ] && [ -z "$s_problem" ]; then
      local same=""
      [ "$a_text" = - ] || same=", same text as a=>b"
      nat_split_record relayed-allowed c b 1 "ok with --split-allow-relayed$same (1st answer $s_first_ms ms after the head started, $s_attempts attempt(s))"
    else
      nat_split_record relayed-allowed c b 0 "FAIL: --split-allow-relayed: $s_problem"
    fi
  fi
}

# ---------------------------------------------------------------------------------------------
# One run of the scenario. Sets nat_run_rc: 0 passed, 1 failed, 2 the lab itself is broken.

nat_run_record() { # OK JOIN_MS ATTEMPTS NOTE
  "$nat_py" - "$nat_results" "$nat_run_no" "$@" "$run_started_ms" <<'PY'
import json, sys
results, run, ok, join_ms, attempts, note, started = sys.argv[1:]
rec = {"kind": "run", "run": int(run), "ok": ok == "1",
       "join_to_first_call_ms": None if join_ms == "-" else int(join_ms),
       "join_call_attempts": int(attempts), "note": note or None, "started_ms": int(started)}
with open(results, "a") as f:
    f.write(json.dumps(rec) + "\n")
PY
}

nat_run() {
  nat_run_no=$1 nat_run_rc=0
  run_dir="$nat_base/run$nat_run_no"
  mkdir -p "$run_dir"
  nat_rows=() nat_failed_calls=() nat_run_failures=0 nat_call_seq=0
  nat_peer=() nat_pid_of=()
  run_started_ms=$(nat_now_ms)
  nat_say "== run $nat_run_no/$nat_runs: building the lab (namespaces ${nat_prefix}*)"
  nat_topology_up
  if ! nat_sanity_check; then
    nat_warn "the lab topology is not what it should be (see above); giving up"
    nat_run_record 0 - 0 "topology check failed"
    nat_run_rc=2; return 0
  fi
  nat_flush_conntrack

  nat_say "== run $nat_run_no: starting the relay, then a and c, then b"
  # The relays carry c's pull of SmolLM2's file (98 MB, nat_pull) in one circuit: the default
  # circuit budget (64 MiB) would close it midway (docs/operations.md, "Relaying model files").
  # shellcheck disable=SC2086  # NAT_RELAY_ARGS is a word list on purpose
  nat_start_node relay --relay-circuit-mib 256 ${NAT_RELAY_ARGS:-}
  if ! nat_wait_ready relay; then
    nat_run_record 0 - 0 "relay not ready"; nat_show_logs; nat_run_rc=1; return 0
  fi
  local boot="/ip4/198.51.100.10/tcp/4001/p2p/${nat_peer[relay]}" n
  [ "$NAT_TRANSPORT" = quic ] && boot="/ip4/198.51.100.10/udp/4001/quic-v1/p2p/${nat_peer[relay]}"
  nat_start_node relay2 --relay-circuit-mib 256 \
    --bootstrap "/ip4/198.51.100.10/tcp/4001/p2p/${nat_peer[relay]}"
  if ! nat_wait_ready relay2; then
    nat_run_record 0 - 0 "relay2 not ready"; nat_show_logs; nat_run_rc=1; return 0
  fi
  # a and c pull model files into models directories of their own (nat_pull). They join
  # through both relays over the same transport, so two public peers observe their address on
  # it (what `mesh doctor` judges the NAT by, nat_doctor).
  local boot2="/ip4/198.51.100.11/tcp/4001/p2p/${nat_peer[relay2]}"
  [ "$NAT_TRANSPORT" = quic ] && boot2="/ip4/198.51.100.11/udp/4001/quic-v1/p2p/${nat_peer[relay2]}"
  for n in a c; do
    MESH_MODELS="$run_dir/$n-models" nat_start_node "$n" --model echo=builtin:echo \
      --bootstrap "$boot" --bootstrap "$boot2"
  done
  for n in a c; do
    if ! nat_wait_ready "$n"; then
      nat_run_record 0 - 0 "node $n not ready"; nat_show_logs; nat_run_rc=1; return 0
    fi
  done
  local t_join t_first="" attempts=0
  t_join=$(nat_now_ms)
  nat_start_node b --model echo=builtin:echo --bootstrap "$boot"
  if ! nat_wait_ready b; then
    nat_run_record 0 - 0 "node b not ready"; nat_show_logs; nat_run_rc=1; return 0
  fi
  for n in relay relay2 a b c; do
    nat_say "   $n ${nat_peer[$n]} ready $((nat_ready_ms[$n] - nat_started_ms[$n])) ms after start"
  done

  nat_say "== run $nat_run_no: calls"
  # a->b right after b joined, retried every 200 ms: the time from b's join to the first answer.
  local deadline left per
  deadline=$((t_join + NAT_JOIN_TIMEOUT * 1000))
  while :; do
    left=$(((deadline - $(nat_now_ms)) / 1000))
    [ "$left" -ge 1 ] || break
    per=$((left < NAT_ATTEMPT_TIMEOUT ? left : NAT_ATTEMPT_TIMEOUT))
    attempts=$((attempts + 1))
    nat_call a b join "$per"
    if [ "$c_ok" = ok ]; then t_first=$c_ended_ms; break; fi
    sleep 0.2
  done
  if [ "$attempts" -eq 0 ]; then c_ok=fail c_path=- c_ttfb=- c_total=- c_err="b took the whole join budget to start"; fi
  if [ "$c_ok" != ok ]; then c_err="no answer within ${NAT_JOIN_TIMEOUT} s of b's join ($attempts attempts); last: $c_err"; fi
  nat_finish_cone_pair a b
  nat_call b a first "$NAT_CALL_TIMEOUT"
  nat_finish_cone_pair b a
  nat_symmetric_pair a c
  nat_symmetric_pair c a

  local status_lines="" n_status
  for n_status in relay relay2 a b c; do
    if ! status_lines+="$(nat_status "$n_status")"$'\n'; then
      status_lines+="   $n_status: WRONG about its own reachability"$'\n'
      nat_run_failures=$((nat_run_failures + 1))
    fi
  done
  local lat_b lat_c
  lat_b=$(nat_latency a b || echo "- - -")
  lat_c=$(nat_latency a c || echo "- - -")
  local metrics_line=""
  if ! nat_metrics; then nat_run_failures=$((nat_run_failures + 1)); fi
  local doctor_line=""
  if ! nat_doctor; then nat_run_failures=$((nat_run_failures + 1)); fi

  local frozen_line=""
  if ! nat_frozen "$boot"; then nat_run_failures=$((nat_run_failures + 1)); fi

  local split_line="" pull_line=""
  if [ "$NAT_SPLIT" = 1 ]; then
    nat_split "$boot"
    if ! nat_pull a hole-punched; then nat_run_failures=$((nat_run_failures + 1)); fi
    if ! nat_pull c relayed; then nat_run_failures=$((nat_run_failures + 1)); fi
  fi

  local failover_line=""
  if ! nat_failover; then nat_run_failures=$((nat_run_failures + 1)); fi

  local join_ms=-
  [ -n "$t_first" ] && join_ms=$((t_first - t_join))
  nat_say ""
  printf '%-6s %-16s %-13s %8s %9s  %s\n' PAIR NATS PATH TTFB_MS TOTAL_MS RESULT
  printf '%s\n' "${nat_rows[@]}"
  nat_say "   b's join to the first answered call from a: $([ "$join_ms" = - ] && echo "never" || echo "$join_ms ms") ($attempts attempt(s))"
  [ -n "$split_line" ] && nat_say "$split_line"
  [ -n "$pull_line" ] && printf '%s' "$pull_line"
  printf '%s' "$status_lines"
  nat_say "$metrics_line"
  nat_say "$doctor_line"
  nat_say "$frozen_line"
  nat_say "$failover_line"
  read -r p m q <<<"$lat_b"; nat_say "   small calls a->b through a's API, $NAT_LATENCY_CALLS in a row: $p, median $m us, p90 $q us"
  read -r p m q <<<"$lat_c"; nat_say "   small calls a->c through a's API, $NAT_LATENCY_CALLS in a row: $p, median $m us, p90 $q us"
  nat_say ""
  if [ "$nat_run_failures" -gt 0 ]; then
    nat_run_record 0 "$join_ms" "$attempts" "$nat_run_failures pair(s) failed"
    nat_show_logs
    nat_run_rc=1; return 0
  fi
  nat_run_record 1 "$join_ms" "$attempts" ""
}

nat_summary() {
  "$nat_py" - "$nat_results" "$nat_runs" <<'PY'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
runs = int(sys.argv[2])
pairs = [r for r in recs if r["kind"] == "pair"]
calls = [r for r in recs if r["kind"] == "call" and r["ok"]]
done_runs = [r for r in recs if r["kind"] == "run"]
print(f"== summary over {len(done_runs)} run(s)")
early = [r for r in done_runs if r["note"] and "pair(s) failed" not in r["note"]]
if early:
    print(f"   runs that failed before their calls: {len(early)} ("
          + ", ".join(sorted({r['note'] for r in early})) + ")")
cone = [p for p in pairs if p["nats"] == "cone->cone"]
punched = sum(p["hole_punched"] for p in cone)
rate = f"{100 * punched / len(cone):.0f}%" if cone else "-"
print(f"   hole punching, cone<->cone pairs: {punched}/{len(cone)} ({rate})")
order = ["a->b", "b->a", "a->c", "c->a"]
answered = []
for name in order:
    ps = [p for p in pairs if p["pair"] == name]
    answered.append(f"{name} {sum(p['answered'] for p in ps)}/{len(ps)}")
print("   calls answered (final call of each pair): " + ", ".join(answered))
joins = sorted(r["join_to_first_call_ms"] for r in done_runs if r["join_to_first_call_ms"] is not None)
never = sum(r["join_to_first_call_ms"] is None for r in done_runs)
if joins:
    print(f"   b's join to the first answered call from a: p50 {statistics.median(joins):.0f} ms, "
          f"max {max(joins)} ms over {len(joins)} run(s)" + (f"; {never} run(s) never answered" if never else ""))
else:
    print("   b's join to the first answered call from a: never answered")
for path in ("direct", "hole-punched", "relayed"):
    cs = [c for c in calls if c["path"] == path]
    if cs:
        tot = statistics.median(c["total_ms"] for c in cs)
        ttfb = statistics.median(c["time_to_first_byte_ms"] for c in cs)
        print(f"   median call latency, {path:<12}: total {tot:.0f} ms, first byte {ttfb:.0f} ms (n={len(cs)})")
    elif path != "direct":
        print(f"   median call latency, {path:<12}: no answered call took this path")
lat = [r for r in recs if r["kind"] == "latency"]
for path in ("hole-punched", "relayed"):
    ms = [r["median_us"] for r in lat if r["path"] == path]
    if ms:
        print(f"   small warm calls through the caller's API, {path:<12}: median of run medians "
              f"{statistics.median(ms):.0f} us over {len(ms)} run(s)")
h = [r["median_us"] for r in lat if r["path"] == "hole-punched"]
r_ = [r["median_us"] for r in lat if r["path"] == "relayed"]
if h and r_:
    print(f"   relayed / hole-punched: {statistics.median(r_) / statistics.median(h):.2f}x")
splits = [r for r in recs if r["kind"] == "split"]
if splits:
    parts = []
    for check, what in (("hole-punched", "a=>b answered hole-punched"),
                        ("relayed-refused", "c=>b relay-only hop not planned by default"),
                        ("relayed-allowed", "c=>b answered with --split-allow-relayed")):
        cs = [r for r in splits if r["check"] == check]
        parts.append(f"{what} {sum(r['ok'] for r in cs)}/{len(cs)}")
    print("   split SmolLM2: " + ", ".join(parts))
    firsts = sorted(r["first_answer_ms"] for r in splits
                    if r["check"] == "hole-punched" and r["ok"] and r["first_answer_ms"] is not None)
    if firsts:
        print(f"   head a's start to its first split answer: p50 {statistics.median(firsts):.0f} ms, "
              f"max {max(firsts)} ms over {len(firsts)} run(s)")
# Recovery (issue 20): the first call of each kind of trouble, p50 and max over the runs.
def p50_max(xs):
    return f"p50 {statistics.median(xs):.0f} ms, max {max(xs)} ms" if xs else "none"
firsts = [c for c in recs if c["kind"] == "call" and c["attempt"] == "first"]
for pair in ("a->c", "c->a", "b->a"):
    cs = [c for c in firsts if c["pair"] == pair and c["ok"]]
    if cs:
        print(f"   first call {pair} ({cs[0]['nats']}): wall {p50_max([c['wall_ms'] for c in cs])}; "
              f"its total {p50_max([c['total_ms'] for c in cs])} (n={len(cs)})")
rec_ = [r for r in recs if r["kind"] == "recovery"]
for event, what in (("relay-stopped", "relay 1 stopped: a->c answers again"),
                    ("provider-frozen", "one of two providers frozen: first `any` call")):
    rs = [r for r in rec_ if r["event"] == event]
    if rs:
        ms = [r["recovery_ms"] for r in rs if r["recovery_ms"] is not None]
        print(f"   {what} after {p50_max(ms)} ({sum(r['ok'] for r in rs)}/{len(rs)} run(s) within bounds)")
frozen = [w for r in rec_ if r["event"] == "provider-frozen" for w in r["calls_ms"]]
if frozen:
    print(f"   every `any` call while a provider is frozen: {p50_max(frozen)} (n={len(frozen)})")
PY
}

# ---------------------------------------------------------------------------------------------

nat_cleanup() {
  local rc=$?
  trap - EXIT INT TERM ERR
  set +e
  nat_topology_down
  if [ -n "${nat_base:-}" ] && [ -d "$nat_base" ]; then
    if [ "${nat_keep:-0}" = 1 ]; then
      nat_say "== kept the run directory: $nat_base (node homes, logs, call outputs)"
    else
      rm -rf "$nat_base"
    fi
  fi
  exit "$rc"
}

nat_main() {
  nat_runs=1 nat_keep=0
  local results=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --runs) nat_runs="${2:?--runs needs a number}"; shift 2 ;;
      --results) results="${2:?--results needs a file}"; shift 2 ;;
      --keep) nat_keep=1; shift ;;
      -h|--help) nat_usage; exit 2 ;;
      *) nat_warn "unknown argument $1"; nat_usage >&2; exit 2 ;;
    esac
  done
  if ! [[ "$nat_runs" =~ ^[0-9]+$ ]] || [ "$nat_runs" -lt 1 ] || [ "$nat_runs" -gt 1000 ]; then
    nat_warn "--runs must be 1..1000"; exit 2
  fi
  NAT_READY_TIMEOUT=${NAT_READY_TIMEOUT:-30}
  NAT_JOIN_TIMEOUT=${NAT_JOIN_TIMEOUT:-30}
  NAT_ATTEMPT_TIMEOUT=${NAT_ATTEMPT_TIMEOUT:-10}
  NAT_CALL_TIMEOUT=${NAT_CALL_TIMEOUT:-30}
  NAT_PUNCH_WAIT=${NAT_PUNCH_WAIT:-15}
  NAT_RECOVERY_TIMEOUT=${NAT_RECOVERY_TIMEOUT:-30}
  NAT_RELAY_STOP=${NAT_RELAY_STOP:-KILL}
  case "$NAT_RELAY_STOP" in TERM|KILL) ;; *) nat_warn "NAT_RELAY_STOP must be TERM or KILL"; exit 2 ;; esac
  NAT_FROZEN_CALLS=${NAT_FROZEN_CALLS:-10}
  NAT_FROZEN_LIMIT_MS=${NAT_FROZEN_LIMIT_MS:-2000}
  NAT_LATENCY_CALLS=${NAT_LATENCY_CALLS:-50}
  NAT_TRANSPORT=${NAT_TRANSPORT:-both}
  case "$NAT_TRANSPORT" in tcp|quic|both) ;; *) nat_warn "NAT_TRANSPORT must be tcp, quic or both"; exit 2 ;; esac
  NAT_SPLIT=${NAT_SPLIT:-1}
  case "$NAT_SPLIT" in 0|1) ;; *) nat_warn "NAT_SPLIT must be 0 or 1"; exit 2 ;; esac
  NAT_SPLIT_TIMEOUT=${NAT_SPLIT_TIMEOUT:-60}
  nat_rust_log=${RUST_LOG:-info,mesh_node=debug,libp2p_dcutr=debug,libp2p_relay=debug}

  nat_prefix="mnat$$-"
  nat_pids=() nat_ns_made=() nat_call_pid=
  trap nat_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  nat_check_prereqs

  if [ -n "${MESH_BIN:-}" ]; then
    mesh=$MESH_BIN
    case "$mesh" in /*) ;; *) mesh="${caller_pwd:-$PWD}/$mesh" ;; esac
  else
    echo "== building mesh (first build takes ~12 minutes on 2 cores)"
    cargo build -q -p mesh-cli
    mesh="$PWD/target/debug/mesh"
  fi
  [ -x "$mesh" ] || { nat_warn "no mesh binary at $mesh"; exit 1; }
  if [ "$NAT_SPLIT" = 1 ]; then
    # The split checks run SmolLM2 from the models directory the tests use (scripts/test.sh
    # exports MESH_MODELS), fetched as `testnet.sh local` fetches it when it is not there.
    export MESH_MODELS="${MESH_MODELS:-$PWD/target/mesh-models}"
    case "$MESH_MODELS" in /*) ;; *) MESH_MODELS="${caller_pwd:-$PWD}/$MESH_MODELS" ;; esac
    nat_split_model="$MESH_MODELS/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    if [ ! -f "$nat_split_model" ]; then
      echo "== fetching SmolLM2 into $MESH_MODELS (the split checks run it; NAT_SPLIT=0 skips them)"
      "$mesh" model fetch smollm2-135m-instruct >/dev/null 2>&1 || "$mesh" model fetch smollm2-135m-instruct ||
        { nat_warn "no SmolLM2 at $nat_split_model and it could not be fetched"; exit 1; }
    fi
  fi

  nat_base=$(mktemp -d "${TMPDIR:-/tmp}/mesh-natlab.XXXXXX")
  if [ -n "$results" ]; then
    case "$results" in /*) ;; *) results="${caller_pwd:-$PWD}/$results" ;; esac
    nat_results=$results
  else
    nat_results="$nat_base/results.jsonl"
  fi
  : >"$nat_results"
  set -E
  trap 'nat_warn "command failed (line $LINENO): $BASH_COMMAND"; exit 1' ERR

  local i failed=0 rc
  for i in $(seq 1 "$nat_runs"); do
    nat_run "$i"  # not in a condition: errexit must stay on inside (a broken lab aborts)
    rc=$nat_run_rc
    nat_topology_down
    if [ "$rc" -eq 2 ]; then failed=$((failed + 1)); break; fi
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
  done
  nat_summary
  [ -n "$results" ] && nat_say "== per-run results (JSON lines): $nat_results"
  if [ "$failed" -gt 0 ]; then
    nat_say "== $failed of $nat_runs run(s) failed"
    [ "$nat_keep" = 1 ] || nat_say "   (pass --keep to keep every node's home and log)"
    exit 1
  fi
  nat_say "== every call answered and every cone<->cone pair was hole-punched$([ "$NAT_SPLIT" = 1 ] && echo "; the split answered hole-punched and planned no relay-only hop by default" || true)"
  exit 0
}
