"""``sweep.png``: test accuracy against the swept values, with 95% intervals over seeds.

One grid axis: accuracy against its values with error bars. Two axes: a heat map of the mean. Otherwise
(or no axis): one bar per grid point. Needs matplotlib (``pip install fkd[plot]``); without it nothing is
drawn.
"""

from __future__ import annotations

import math
from pathlib import Path

from fkd.atomic import atomic_write


def plot_sweep(plan, rows: list[dict], path: Path) -> bool:
    """Draw ``rows`` (from :func:`fkd.sweep.stats.summarize`) into ``path``; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_point = {r["point"]: r for r in rows}
    axes = plan.axes
    fig, ax = plt.subplots(figsize=(6, 4.5))

    def point(*pairs) -> dict | None:
        return by_point.get(", ".join(f"{k}={v}" for k, v in pairs) or "base")

    def err(r):
        return 0.0 if r is None or r["ci95"] is None or math.isnan(r["ci95"]) else 100 * r["ci95"]

    if len(axes) == 1:
        (key, values), = axes
        found = [(v, point((key, v))) for v in values]
        found = [(v, r) for v, r in found if r is not None and r["mean"] is not None]
        xs = list(range(len(found)))
        ax.errorbar(xs, [100 * r["mean"] for _, r in found], yerr=[err(r) for _, r in found], marker="o", capsize=4)
        ax.set_xticks(xs, [str(v) for v, _ in found])
        ax.set_xlabel(key)
        ax.set_ylabel("test accuracy (%)")
    elif len(axes) == 2:
        (k1, v1), (k2, v2) = axes
        grid = [[(point((k1, a), (k2, b)) or {}).get("mean") for b in v2] for a in v1]
        values = [[float("nan") if m is None else 100 * m for m in row] for row in grid]
        image = ax.imshow(values, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(v1)), [str(a) for a in v1])
        ax.set_xticks(range(len(v2)), [str(b) for b in v2])
        ax.set_ylabel(k1)
        ax.set_xlabel(k2)
        for i, row in enumerate(values):
            for j, m in enumerate(row):
                if not math.isnan(m):
                    ax.text(j, i, f"{m:.1f}", ha="center", va="center", color="white", fontsize=8)
        fig.colorbar(image, ax=ax, label="mean test accuracy (%)")
    else:
        ok = [r for r in rows if r["mean"] is not None]
        ax.barh(range(len(ok)), [100 * r["mean"] for r in ok], xerr=[err(r) for r in ok], capsize=3)
        ax.set_yticks(range(len(ok)), [r["point"] for r in ok], fontsize=7)
        ax.set_xlabel("test accuracy (%)")
    what = "mean" if len(axes) == 2 else "mean and 95% interval"
    ax.set_title(f"test accuracy, {what} over seeds {', '.join(map(str, plan.seeds))}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True
