#!/usr/bin/env python3
"""Plots the lag distributions written by `cargo bench --bench presence` (benches/lag-*.csv)
into benches/lag.png: presenced against Redis's own expired events, steady churn and mass
expiry, as empirical CDFs on a log time axis."""
import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))


def load(name):
    path = os.path.join(here, f"lag-{name}.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return sorted(max(int(r["lag_ms"]), 1) for r in csv.DictReader(f))


fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
for ax, scenario, title in [
    (axes[0], "steady", "Steady churn: deadlines spread over 30 s"),
    (axes[1], "mass", "Mass expiry: all deadlines at one instant"),
]:
    for who, label, color in [
        ("presenced", "presenced (offline status at a subscriber)", "tab:blue"),
        ("redis", "Redis's own expired event", "tab:red"),
    ]:
        v = load(f"{scenario}-{who}")
        if v:
            ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", label=label, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("lag after the TTL deadline (ms, log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
axes[0].set_ylabel("fraction of devices")
fig.tight_layout()
fig.savefig(os.path.join(here, "lag.png"), dpi=100)
print("wrote", os.path.join(here, "lag.png"))
