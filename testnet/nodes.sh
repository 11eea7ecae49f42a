# Sourced by testnet/soak.sh and testnet/load.sh: `mesh join` processes on loopback, each with
# its own home under "$run". The caller sets $mesh (the binary) and $run (a scratch directory).
#
#   start_node NAME [mesh join args...]   starts a node, waits for its ready line (60 s at most)
#   ready_field NAME KEY                  a field of its ready line (a list gives its first item)
#   stop_nodes                            SIGTERM to every node started, then waits for them
# node_pid[NAME] holds each running node's pid; unset an entry when a node is stopped early.

declare -A node_pid=()
nodes_script=$(basename "$0" .sh)

start_node() {
  local name=$1; shift
  "$mesh" join --json --home "$run/$name" --listen /ip4/127.0.0.1/tcp/0 --no-mdns \
    --api 127.0.0.1:0 "$@" >"$run/$name.out" 2>"$run/$name.log" &
  node_pid[$name]=$!
  for _ in $(seq 1 600); do
    [ -s "$run/$name.out" ] && return 0
    kill -0 "${node_pid[$name]}" 2>/dev/null || { echo "$nodes_script: $name failed to start:"; cat "$run/$name.log"; exit 1; }
    sleep 0.1
  done
  echo "$nodes_script: $name did not become ready"; exit 1
}

ready_field() {
  head -1 "$run/$1.out" | python3 -c "import json,sys; v=json.load(sys.stdin)[sys.argv[1]]; print(v[0] if isinstance(v, list) else v)" "$2"
}

stop_nodes() {
  for p in "${node_pid[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${node_pid[@]}"; do wait "$p" 2>/dev/null || true; done
}
