"""``sweep.png``: test accuracy against the swept values, with 95% intervals over seeds.

One grid axis: accuracy against its values with error bars. Two axes: a heat map of the mean. Otherwise
(or no axis): one bar per grid point. Error bars are the clipped intervals of :mod:`fkd.sweep.stats`;
below its minimum seed count there is no interval, so each seed's value is drawn instead. The title
names the sweep, its models and the seeds per point (:func:`fkd.titles.sweep_title`). Needs matplotlib
(``pip install fkd[plot]``); without it nothing is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path

from fkd.atomic import atomic_write
from fkd.sweep.stats import MIN_SEEDS_FOR_INTERVAL


def _errors(found: list[dict]) -> list[list[float]]:
    """Asymmetric error bars in % (below, above the mean) from the clipped interval; 0 where there is none."""
    below = [0.0 if r["ci95_low"] is None else 100 * (r["mean"] - r["ci95_low"]) for r in found]
    above = [0.0 if r["ci95_high"] is None else 100 * (r["ci95_high"] - r["mean"]) for r in found]
    return [below, above]


def sweep_figure(axes: tuple, rows: list[dict], title: str = ""):
    """The matplotlib figure of ``rows`` (from :func:`fkd.sweep.stats.summarize`) over the grid ``axes``
    (the plan's ``((key, values), ...)``); raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_point = {r["point"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(6.4, 4.8))

    def point(*pairs) -> dict | None:
        return by_point.get(", ".join(f"{k}={v}" for k, v in pairs) or "base")

    def scatter_values(positions, found, horizontal=False):
        """Each seed's value where a point has too few seeds for an interval."""
        for pos, r in zip(positions, found):
            if 0 < r["n"] < MIN_SEEDS_FOR_INTERVAL:
                values = [100 * v for v in r["values"]]
                xy = (values, [pos] * len(values)) if horizontal else ([pos] * len(values), values)
                ax.plot(*xy, linestyle="none", marker="x", color="black", markersize=5)

    if len(axes) == 1:
        (key, values), = axes
        found = [(v, point((key, v))) for v in values]
        found = [(v, r) for v, r in found if r is not None and r["mean"] is not None]
        xs = list(range(len(found)))
        rs = [r for _, r in found]
        ax.errorbar(xs, [100 * r["mean"] for r in rs], yerr=_errors(rs), marker="o", capsize=4)
        scatter_values(xs, rs)
        ax.set_xticks(xs, [str(v) for v, _ in found])
        ax.set_xlabel(f"{key} (swept value)")
        ax.set_ylabel("test accuracy (%)")
    elif len(axes) == 2:
        (k1, v1), (k2, v2) = axes
        grid = [[(point((k1, a), (k2, b)) or {}).get("mean") for b in v2] for a in v1]
        values = [[float("nan") if m is None else 100 * m for m in row] for row in grid]
        image = ax.imshow(values, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(v1)), [str(a) for a in v1])
        ax.set_xticks(range(len(v2)), [str(b) for b in v2])
        ax.set_ylabel(f"{k1} (swept value)")
        ax.set_xlabel(f"{k2} (swept value)")
        for i, row in enumerate(values):
            for j, m in enumerate(row):
                if not math.isnan(m):
                    ax.text(j, i, f"{m:.1f}", ha="center", va="center", color="white", fontsize=8)
        fig.colorbar(image, ax=ax, label="mean test accuracy (%)")
    else:
        ok = [r for r in rows if r["mean"] is not None]
        ys = list(range(len(ok)))
        ax.barh(ys, [100 * r["mean"] for r in ok], xerr=_errors(ok), capsize=3)
        scatter_values(ys, ok, horizontal=True)
        ax.set_yticks(ys, [r["point"] for r in ok], fontsize=7)
        ax.set_xlabel("test accuracy (%)")
        ax.set_ylabel("grid point")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def plot_sweep(plan, rows: list[dict], path: Path, title: str = "") -> bool:
    """Draw ``rows`` for ``plan`` into ``path`` under ``title``; False without matplotlib."""
    try:
        fig = sweep_figure(plan.axes, rows, title)
    except ImportError:
        return False
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True
