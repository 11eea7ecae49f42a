"""Pull throughput: `mesh model pull` from 1, 2 and 3 holders against `curl` from a plain HTTP
server, the same file, alternating in each round (testnet/bench.sh pull); then the CPU that
hashing takes per GiB, `mesh model add` against `sha256sum`.

Usage: pull_bench.py MESH BOOTSTRAP URL SCRATCH ROUNDS PEER...
Prints one JSON line per transfer or hash, and a summary line for each with medians and ratios.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

mesh, bootstrap, url, scratch, rounds = sys.argv[1:6]
peers = sys.argv[6:]
rounds = int(rounds)
results = {}


def record(name, wall, took, size):
    results.setdefault(name, []).append(wall)
    line = {"bench": "pull", "how": name, "wall_ms": round(wall * 1000), "bytes": size}
    if took is not None:
        line["transfer_ms"] = took
    print(json.dumps(line), flush=True)


for r in range(rounds):
    target = os.path.join(scratch, "curl.gguf")
    t = time.perf_counter()
    subprocess.run(["curl", "-sf", "-o", target, url], check=True)
    record("curl", time.perf_counter() - t, None, os.path.getsize(target))
    os.remove(target)
    for n in range(1, len(peers) + 1):
        models = os.path.join(scratch, f"pull-{n}-{r}")
        args = [mesh, "model", "pull", "smol", "--json", "--no-mdns", "--bootstrap", bootstrap,
                "--home", os.path.join(scratch, "puller")]
        for p in peers[:n]:
            args += ["--from", p]
        env = dict(os.environ, MESH_MODELS=models, RUST_LOG="warn")
        t = time.perf_counter()
        out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
        wall = time.perf_counter() - t
        done = json.loads(out.strip().splitlines()[-1])
        assert done["event"] == "done", done
        assert len([k for k, v in done["by_source"].items() if v > 0]) == n, done
        record(f"mesh-{n}", wall, done["took_ms"], done["len"])
        shutil.rmtree(models)

med = {k: statistics.median(v) for k, v in results.items()}
summary = {"bench": "pull-summary", "rounds": rounds,
           "median_wall_ms": {k: round(v * 1000) for k, v in med.items()},
           "vs_curl": {k: round(v / med["curl"], 2) for k, v in med.items() if k != "curl"}}
print(json.dumps(summary), flush=True)

# Hashing CPU per GiB: `mesh model add` of a 1 GiB GGUF-headed file (one read: sha256 and the
# BLAKE3 blob tree; the file is hard-linked, not copied) against sha256 alone (`sha256sum`,
# `openssl dgst -sha256`), the same
# file, page cache warm for both, alternating. CPU is user + system of the child.
big = os.path.join(scratch, "hash-1g.gguf")
with open(big, "wb") as f:
    f.write(b"GGUF")
    for _ in range(1024):
        f.write(os.urandom(1 << 20))
gib = os.path.getsize(big) / (1 << 30)


def cpu_of(args, env=None):
    before = os.times()
    t = time.perf_counter()
    subprocess.run(args, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return cpu, wall


cpu = {"mesh-add": [], "sha256sum": [], "openssl-sha256": []}
for r in range(rounds):
    # coreutils' sha256sum and OpenSSL's (which uses the CPU's SHA extensions where present).
    for how, args in (("sha256sum", ["sha256sum", big]),
                      ("openssl-sha256", ["openssl", "dgst", "-sha256", big])):
        c, w = cpu_of(args)
        cpu[how].append(c / gib)
        print(json.dumps({"bench": "hash", "how": how, "cpu_s_per_gib": round(c / gib, 3),
                          "wall_ms": round(w * 1000)}), flush=True)
    models = os.path.join(scratch, f"add-{r}")
    env = dict(os.environ, MESH_MODELS=models, RUST_LOG="warn")
    c, w = cpu_of([mesh, "model", "add", big, "--json", "--home", os.path.join(scratch, "adder")], env)
    cpu["mesh-add"].append(c / gib)
    print(json.dumps({"bench": "hash", "how": "mesh model add", "cpu_s_per_gib": round(c / gib, 3),
                      "wall_ms": round(w * 1000)}), flush=True)
    shutil.rmtree(models)
os.remove(big)
print(json.dumps({"bench": "hash-summary", "rounds": rounds,
                  "median_cpu_s_per_gib": {k: round(statistics.median(v), 3) for k, v in cpu.items()}}),
      flush=True)
