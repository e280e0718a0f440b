"""Seeds to error bars: mean, standard deviation, min, max and a 95% confidence interval per grid point.

The interval is Student's t: ``mean ± t_{0.975, n-1} · s / sqrt(n)`` with ``s`` the sample standard
deviation (``ddof = 1``), the usual interval for a mean over a few independent seeds (Student 1908).
Quantiles for ``n - 1 <= 30`` are tabulated (to 3 decimals, as in any statistics table); beyond, the
normal quantile 1.96 is within 2% of t.

No interval is given below :data:`MIN_SEEDS_FOR_INTERVAL` seeds: with two, ``t_{0.975, 1} = 12.71``
and the interval is 12.7 times as wide as the distance between the two values (``2 t s / sqrt(2)`` with
``s = |a - b| / sqrt(2)``; a sweep of two seeds drew one from -70% to 170%); the values themselves are reported instead. An interval is clipped to the range an
accuracy can take, [0, 1] (``ci95_low``, ``ci95_high``); ``ci95`` stays the unclipped half-width.
"""

from __future__ import annotations

import math
import statistics

_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    if df < 1:
        return float("nan")
    return _T975[df - 1] if df <= len(_T975) else 1.96


MIN_SEEDS_FOR_INTERVAL = 3
NO_INTERVAL_WHY = (f"no 95% interval for fewer than {MIN_SEEDS_FOR_INTERVAL} seeds: from 2 the Student-t interval "
                   "(t = 12.71, one degree of freedom) is 12.7 times as wide as the gap between them; the values "
                   f"are shown instead (use --seeds {MIN_SEEDS_FOR_INTERVAL} or more for intervals)")


def describe(values: list[float], bounds: tuple[float, float] = (0.0, 1.0)) -> dict:
    """``{n, mean, std, min, max, values, ci95, ci95_low, ci95_high}`` of ``values``.

    ``std`` is NaN for one value; ``ci95`` (the half-width) and its ends are None below
    :data:`MIN_SEEDS_FOR_INTERVAL` values; the ends are clipped to ``bounds`` (an accuracy's [0, 1]).
    """
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "values": [], "ci95": None,
                "ci95_low": None, "ci95_high": None}
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else float("nan")
    half = low = high = None
    if n >= MIN_SEEDS_FOR_INTERVAL:
        half = t_quantile_975(n - 1) * std / math.sqrt(n)
        low, high = max(bounds[0], mean - half), min(bounds[1], mean + half)
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values), "values": list(values),
            "ci95": half, "ci95_low": low, "ci95_high": high}


def summarize(finals: list[dict], baseline_point: str | None) -> list[dict]:
    """One row per grid point over its seeds, best mean first.

    ``finals``: one dict per student with ``point`` (label), ``seed``, ``test_acc`` and ``diverged``.
    Diverged students are counted, not averaged. ``vs_baseline`` is the difference of means to the
    baseline point (None without one).
    """
    by_point: dict[str, list[dict]] = {}
    for f in finals:
        by_point.setdefault(f["point"], []).append(f)
    rows = []
    for point, students in by_point.items():
        ok = [s["test_acc"] for s in students if not s["diverged"]]
        rows.append({"point": point, **describe(ok), "seeds": [s["seed"] for s in students],
                     "diverged": sum(s["diverged"] for s in students)})
    base = next((r["mean"] for r in rows if r["point"] == baseline_point), None)
    for r in rows:
        r["vs_baseline"] = None if base is None or r["mean"] is None else r["mean"] - base
    return sorted(rows, key=lambda r: -1.0 if r["mean"] is None else r["mean"], reverse=True)


def format_table(rows: list[dict], baseline_point: str | None, *, label: str = "grid point") -> str:
    """The printed sweep table: accuracy over seeds per grid point (``label`` heads that column), in the
    order of ``rows``. Points with fewer than :data:`MIN_SEEDS_FOR_INTERVAL` seeds show their values
    instead of an interval, and a line says why."""
    few = any(0 < r["n"] < MIN_SEEDS_FOR_INTERVAL for r in rows)
    head = (label, "n", "mean", "± std", "95% CI", "min", "max", "vs baseline", "diverged")
    head += ("values",) if few else ()
    body = [head]

    def pct(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"

    for r in rows:
        ci = "-" if r["ci95_low"] is None else f"{pct(r['ci95_low'])}..{pct(r['ci95_high'])}"
        diff = "-" if r["vs_baseline"] is None else f"{100 * r['vs_baseline']:+.2f}"
        name = r["point"] + (" (baseline)" if r["point"] == baseline_point else "")
        row = (name, str(r["n"]), pct(r["mean"]), pct(r["std"]), ci, pct(r["min"]), pct(r["max"]), diff,
               str(r["diverged"]))
        if few:
            row += (", ".join(pct(v) for v in r["values"]) if r["n"] < MIN_SEEDS_FOR_INTERVAL else "",)
        body.append(row)
    widths = [max(len(row[i]) for row in body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in body]
    lines.insert(1, "-" * max(len(line) for line in lines))
    lines.append("test accuracy in %, over seeds (mean, sample std, Student-t 95% interval of the mean, "
                 "clipped to 0..100)")
    if few:
        lines.append(NO_INTERVAL_WHY)
    return "\n".join(lines)
