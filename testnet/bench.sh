#!/usr/bin/env bash
# Benchmarks, side by side with the peers a user would otherwise pick, in one run:
#   network:  tiny calls over the mesh vs HTTP/1.1 keep-alive (axum + hyper)
#   generate: SmolLM2 in mesh vs llama.cpp in-process, same GGUF, same prompts, same threads:
#             fresh, repeated, 1,000-token and 2,000-token prompts, for each weight format in
#             BENCH_WEIGHTS (default: original q8_0 q4_0)
#   kernels:  mesh's quantized matrix kernels alone on SmolLM2's shapes (µs, GB/s, GMAC/s)
#   server:   `mesh join` and its gateway vs llama-cpp-python's server, the same chats streamed
#             over HTTP: fresh, repeated and extended
#   split:    SmolLM2 whole against split across 2 and 3 processes (f32 and f16 hidden states),
#             as servers streaming the same chats; each stage's peak RSS
#   rss:      peak RSS of a node hosting both models
#   embed:    MiniLM in mesh (candle) vs sentence-transformers, same files, same threads
#   gateway:  a chat completion through a node's OpenAI gateway vs the engine in-process
#   pull:     `mesh model pull` of SmolLM2's file from 1, 2 and 3 `mesh join` holders vs curl
#             from a plain HTTP server (Python's http.server), the same file, on loopback
#             then hashing CPU per GiB: `mesh model add` (sha256 + BLAKE3 tree) vs sha256sum
#   hostile:  a `mesh join` process under each hostile-peer attack (half-open TCP flood, 300
#             sybils, stalled streams, lying providers, a Kademlia flood): an honest caller's calls before, during
#             and after, and the node's peak RSS during the attack
# Prints JSON lines; docs/benchmarks.md quotes them.
#
# The reference implementations come from PyPI (llama-cpp-python builds llama.cpp from source,
# ~15 min on 2 cores, into the venv the tests share; sentence-transformers pulls torch).
# Usage: testnet/bench.sh [all|network|generate|kernels|server|split|rss|gateway|embed|pull|hostile]
set -euo pipefail
cd "$(dirname "$0")/.."
export MESH_MODELS="${MESH_MODELS:-$PWD/target/mesh-models}"
threads="${BENCH_THREADS:-2}"
what="${1:-all}"
# Both compute pools (see node/src/engine/threads.rs) sized alike for every measurement.
export CANDLE_NUM_THREADS=$threads RAYON_NUM_THREADS=$threads

# The release profile: what `cargo install --path cli` builds (opt-level 3, no debug
# assertions or overflow checks in any crate; line tables only).
cargo build -q --release -p mesh-cli -p mesh-testnet
mesh=target/release/mesh
bench=target/release/mesh-bench
"$mesh" model fetch all >/dev/null 2>&1
# llama.cpp through llama-cpp-python, built from source for this CPU: the same venv the tests
# use; sentence-transformers (with torch) in a second one.
. scripts/llama-venv.sh
st_venv="${BENCH_ST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mesh/st-venv}"
if ! "$st_venv/bin/python" -c 'import sentence_transformers' 2>/dev/null; then
  python3 -m venv "$st_venv"
  "$st_venv/bin/pip" install -q sentence-transformers
fi
gguf="$MESH_MODELS/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
minilm="$MESH_MODELS/all-minilm-l6-v2"
echo "# $(date -u +%FT%TZ) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads, release build of $(git rev-parse --short HEAD)"
scratch=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$scratch"' EXIT

if [ "$what" = all ] || [ "$what" = network ]; then
  "$bench" network --calls 5000 --seconds 5
fi
if [ "$what" = all ] || [ "$what" = generate ]; then
  for weights in ${BENCH_WEIGHTS:-original q8_0 q4_0}; do
    "$bench" generate --tokens 128 --runs 5 --weights "$weights" --prompt-dir "$scratch"
  done
  "$llama_venv/bin/python" testnet/reference/llama_cpp_bench.py "$gguf" "$scratch" 128 5 "$threads"
fi
if [ "$what" = all ] || [ "$what" = kernels ]; then
  "$bench" kernels --threads "$threads"
fi
if [ "$what" = all ] || [ "$what" = server ]; then
  # Both as servers a user would run, streaming the same chats over HTTP.
  "$mesh" join --json --home "$scratch/home" --listen /ip4/127.0.0.1/tcp/0 --no-mdns \
    --api 127.0.0.1:0 --threads "$threads" --model "smol=$gguf" >"$scratch/mesh.out" 2>"$scratch/mesh.log" &
  mesh_pid=$!
  "$llama_venv/bin/python" -m llama_cpp.server --model "$gguf" --n_threads "$threads" \
    --n_threads_batch "$threads" --n_ctx 4096 --host 127.0.0.1 --port 7461 >"$scratch/llama.log" 2>&1 &
  llama_pid=$!
  for _ in $(seq 1 600); do
    [ -s "$scratch/mesh.out" ] && curl -sf http://127.0.0.1:7461/v1/models >/dev/null && break
    sleep 0.2
  done
  api=$(head -1 "$scratch/mesh.out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["api"])')
  "$llama_venv/bin/python" testnet/reference/server_bench.py 5 64 \
    "mesh=$api=smol" "llama.cpp=http://127.0.0.1:7461=smol"
  kill "$mesh_pid" "$llama_pid"; wait "$mesh_pid" "$llama_pid" 2>/dev/null || true
fi
if [ "$what" = all ] || [ "$what" = split ]; then
  # One machine, several processes: what a split costs, not what it gains (memory pooled).
  start() { # NAME ARGS...: a node on loopback; its ready line in $scratch/NAME.out
    local name=$1; shift
    "$mesh" join --json --home "$scratch/$name" --listen /ip4/127.0.0.1/tcp/0 --no-mdns \
      --api 127.0.0.1:0 --threads "$threads" "$@" >"$scratch/$name.out" 2>"$scratch/$name.log" &
    echo $! >"$scratch/$name.pid"
    for _ in $(seq 1 300); do [ -s "$scratch/$name.out" ] && break; sleep 0.1; done
  }
  field() { head -1 "$scratch/$1.out" | python3 -c "import json,sys; print(json.load(sys.stdin)$2)"; }
  start whole --model "smol=$gguf" --prompt-cache-mib 0
  boot=$(field whole '["listen_addrs"][0]')
  start s10 --bootstrap "$boot" --model "smol=$gguf" --layers 10..20
  start s20 --bootstrap "$boot" --model "smol=$gguf" --layers 20..30
  start s15 --bootstrap "$boot" --model "smol=$gguf" --layers 15..30
  start h3 --bootstrap "$boot" --model "smol=$gguf" --layers 0..10
  start h2 --bootstrap "$boot" --model "smol=$gguf" --layers 0..15
  start h2f16 --bootstrap "$boot" --model "smol=$gguf" --layers 0..15 --split-hidden f16
  sleep 3
  "$llama_venv/bin/python" testnet/reference/split_bench.py 5 64 \
    "whole=$(field whole '["api"]')=0" "split2=$(field h2 '["api"]')=1" \
    "split2-f16=$(field h2f16 '["api"]')=1" "split3=$(field h3 '["api"]')=2"
  # One hop alone: a stage of the last layer, and that layer computed here.
  start s29 --bootstrap "$boot" --model "smol=$gguf" --layers 29..30
  "$bench" hop --bootstrap "$(field s29 '["listen_addrs"][0]')" --gguf "$gguf" --steps 300
  kill "$(cat "$scratch/s29.pid")"
  for name in whole s10 s20 s15 h3 h2; do
    pid=$(cat "$scratch/$name.pid")
    echo "{\"bench\": \"split-rss\", \"node\": \"$name\", \"peak_rss_mib\": $(( $(awk '/VmHWM/ {print $2}' "/proc/$pid/status") / 1024 ))}"
  done
  for name in whole s10 s20 s15 h3 h2 h2f16; do kill "$(cat "$scratch/$name.pid")"; done
  wait 2>/dev/null || true
fi
if [ "$what" = all ] || [ "$what" = rss ]; then
  # Peak RSS of a node hosting both models, after one chat and one embedding.
  "$mesh" join --json --home "$scratch/rss" --listen /ip4/127.0.0.1/tcp/0 --no-mdns \
    --api 127.0.0.1:0 --model "smol=$gguf" --model "minilm=$minilm" >"$scratch/rss.out" 2>"$scratch/rss.log" &
  rss_pid=$!
  for _ in $(seq 1 600); do [ -s "$scratch/rss.out" ] && break; sleep 0.2; done
  api=$(head -1 "$scratch/rss.out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["api"])')
  curl -sf "$api/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model":"smol","messages":[{"role":"user","content":"Write a long story about a robot who learns to paint."}],"max_tokens":128}' >/dev/null
  curl -sf "$api/v1/embeddings" -H 'Content-Type: application/json' \
    -d '{"model":"minilm","input":["A man is eating food.","A man is eating a piece of bread."]}' >/dev/null
  peak=$(awk '/VmHWM/ {print $2}' "/proc/$rss_pid/status")
  echo "{\"bench\": \"rss\", \"models\": [\"smol\", \"minilm\"], \"peak_rss_mib\": $((peak / 1024))}"
  kill "$rss_pid"; wait "$rss_pid" 2>/dev/null || true
fi
if [ "$what" = all ] || [ "$what" = gateway ]; then
  "$bench" gateway --runs 10 --seconds 5
fi
if [ "$what" = all ] || [ "$what" = pull ]; then
  holders=()
  for n in 1 2 3; do
    boot_args=()
    [ "$n" = 1 ] || boot_args=(--bootstrap "$(head -1 "$scratch/h1.out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["listen_addrs"][0])')")
    "$mesh" join --json --home "$scratch/h$n" --listen /ip4/127.0.0.1/tcp/0 --no-mdns \
      --api 127.0.0.1:0 --model "smol=$gguf" "${boot_args[@]}" >"$scratch/h$n.out" 2>"$scratch/h$n.log" &
    holders+=($!)
    for _ in $(seq 1 300); do [ -s "$scratch/h$n.out" ] && break; sleep 0.1; done
  done
  python3 -m http.server 7462 --bind 127.0.0.1 --directory "$(dirname "$gguf")" >/dev/null 2>&1 &
  http_pid=$!
  sleep 2
  peer() { head -1 "$scratch/h$1.out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["peer_id"])'; }
  python3 testnet/reference/pull_bench.py "$mesh" \
    "$(head -1 "$scratch/h1.out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["listen_addrs"][0])')" \
    "http://127.0.0.1:7462/$(basename "$gguf")" "$scratch" "${BENCH_PULL_ROUNDS:-5}" \
    "$(peer 1)" "$(peer 2)" "$(peer 3)"
  kill "${holders[@]}" "$http_pid"; wait "${holders[@]}" "$http_pid" 2>/dev/null || true
fi
if [ "$what" = all ] || [ "$what" = hostile ]; then
  "$bench" hostile --mesh "$mesh" --seconds 5
fi
if [ "$what" = all ] || [ "$what" = embed ]; then
  "$bench" embed --seconds 5
  "$st_venv/bin/python" testnet/reference/sentence_transformers_bench.py "$minilm" 5 "$threads" 2>/dev/null
fi
