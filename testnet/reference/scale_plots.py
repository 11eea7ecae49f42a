"""Plots for docs/scale.md from `testnet/sim.sh sweep` lines (mesh-sim's JSON reports).

Usage: scale_plots.py SWEEP.jsonl OUT_DIR
Writes OUT_DIR/lookups.png, OUT_DIR/messages.png and OUT_DIR/calls.png, and prints the
markdown tables docs/scale.md quotes. The last report for each (nodes, churn) is used.
"""

import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sweep, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
runs = {}
with open(sweep) as f:
    for line in f:
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            c = r["config"]
            runs[(c["nodes"], c["churn_per_minute"])] = r

by_size = sorted((n, r) for (n, churn), r in runs.items() if abs(churn - 0.05) < 1e-9)
sizes = [n for n, _ in by_size]


def rate(r, kind):
    return dict(r["per_node_per_minute"]).get(kind, 0.0)


# Lookups: p50 and p99 against N, popular and rare.
fig, ax = plt.subplots(figsize=(6, 4))
for kind, style in (("popular", "o-"), ("rare", "s--")):
    for q in ("p50_ms", "p99_ms"):
        ax.plot(sizes, [r[kind]["time"][q] for _, r in by_size], style,
                label=f"{kind} {q[:3]}")
ax.set_xscale("log")
ax.set_xlabel("nodes")
ax.set_ylabel("provider lookup, ms")
ax.set_title("DHT provider lookups, 5% churn per minute")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(out, "lookups.png"), dpi=120)

# Messages per node per minute, by kind, with a log N curve through the first point.
kinds = ["dht announce (add_provider in)", "dht lookup (get_providers in)",
         "dht routing (find_node in)", "identify (received + pushed)", "ping",
         "catalogs served"]
fig, ax = plt.subplots(figsize=(6, 4))
totals = []
for kind in kinds:
    ax.plot(sizes, [rate(r, kind) for _, r in by_size], "o-", label=kind)
for _, r in by_size:
    totals.append(sum(rate(r, k) for k in kinds))
ax.plot(sizes, totals, "k-", linewidth=2, label="all of these")
if sizes:
    base = totals[0] / math.log(sizes[0])
    ax.plot(sizes, [base * math.log(n) for n in sizes], "k:", label="∝ log N (from the first)")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("nodes")
ax.set_ylabel("messages per node per minute")
ax.set_title("What each node handles, 5% churn per minute")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(out, "messages.png"), dpi=120)

# `any` call success against churn, at each size measured at several churns.
fig, ax = plt.subplots(figsize=(6, 4))
for n in sorted({n for n, _ in runs}):
    points = sorted((churn, r) for (m, churn), r in runs.items() if m == n)
    if len(points) < 2:
        continue
    ax.plot([100 * c for c, _ in points],
            [100 * r["calls_answered"] / max(r["calls"], 1) for _, r in points], "o-",
            label=f"{n} nodes")
ax.set_xlabel("churn, % of nodes per minute")
ax.set_ylabel("`any` calls answered, %")
ax.set_title("`any` calls under churn")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(out, "calls.png"), dpi=120)

print("| nodes | churn/min | KiB/node | popular p50/p99 ms | rare p50/p99 ms | requests/lookup "
      "| stale per lookup (popular) | calls answered | records/node | msgs/node/min | KB/node/min |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for (n, churn), r in sorted(runs.items()):
    msgs = sum(rate(r, k) for k in kinds)
    kb = (rate(r, "bytes in") + rate(r, "bytes out")) / 1000
    print(f"| {n} | {100 * churn:.0f}% | {r['rss_kib_per_node']} "
          f"| {r['popular']['time']['p50_ms']:.0f} / {r['popular']['time']['p99_ms']:.0f} "
          f"| {r['rare']['time']['p50_ms']:.0f} / {r['rare']['time']['p99_ms']:.0f} "
          f"| {r.get('dht_requests_per_lookup', 0):.1f} "
          f"| {r['popular']['stale_per_lookup']:.2f} "
          f"| {r['calls_answered']}/{r['calls']} ({100 * r['calls_answered'] / max(r['calls'], 1):.2f}%) "
          f"| {r['records_mean']:.0f} | {msgs:.0f} | {kb:.0f} |")
