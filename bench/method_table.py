"""README's method table: every configs/methods/ file swept over seeds and a grid of its term weight.

Each method gets the same treatment: its paper's default weight (the config as shipped) and that weight
times 0.1 and 10, each over the same seeds -- so no method is tuned more than another. Run from the
repository root::

    python bench/method_table.py run --seeds 5 --out runs/methods        # every sweep, one after another
    python bench/method_table.py table runs/methods                        # the markdown table

``run`` calls ``python cli.py sweep`` once per method, in this process (one start-up, one import of
torch); any ``--set`` is passed to every sweep. A method whose sweep has finished (its ``sweep_summary.json``
exists) is skipped, and one that was stopped part-way goes on from its checkpoint (``sweep --resume``), so
an interrupted ``run`` is repeated with the same command. ``table`` reads each ``sweep_summary.json``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fkd.config_files import read_config_file  # noqa: E402 -- after the clone is on the path

METHODS = ("baseline", "kd", "fitnets", "at", "nst", "vid", "sp", "rkd", "pkt", "cc", "crd", "dkd", "dist", "lskd",
           "reviewkd", "fsp", "ab", "ofd", "srrl", "kdsvd",  # issue 20, feature methods
           "skd", "mlkd", "ctkd", "tf_kd", "pad", "ickd", "ft", "hard_kd")
SCALES = (0.1, 1.0, 10.0)


def method_term(config: Path) -> tuple[str, float] | None:
    """``(term, default weight)`` of a method config's distillation term (the one that is not ``ce``)."""
    terms = read_config_file(config)["distill"]["terms"]  # extends resolved (configs/methods/_base.toml)
    others = [(name, float(table.get("weight", 1.0))) for name, table in terms.items() if name != "ce"]
    return others[0] if others else None


def grid_values(weight: float) -> list[float]:
    return [float(f"{weight * s:.6g}") for s in SCALES]


def run_cli(name: str, args: list[str]) -> None:
    """``python cli.py *args`` in this process; prints ``name``'s exit code and time, and goes on after a failure."""
    from fkd.cli import main as fkd_main

    start = time.perf_counter()
    try:
        fkd_main.main(args, standalone_mode=False)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except Exception:  # noqa: BLE001 -- report it and go on with the next one
        traceback.print_exc()
        code = "error"
    print(f"{name}: exit {code}, {time.perf_counter() - start:.1f} s", flush=True)
    if isinstance(code, int) and code >= 128:  # stopped by a signal (Ctrl-C, SIGTERM): stop here too
        raise SystemExit(code)


@click.group()
def main():
    """Sweep every method of configs/methods/ and tabulate the results."""


@main.command()
@click.option("--seeds", default="5", show_default=True, help="passed to sweep --seeds")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/methods"), show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--only", default="", help="comma-separated subset of the methods")
@click.option("--set", "overrides", multiple=True, help="KEY=VALUE passed to every sweep")
@click.option("--collect", type=click.Path(path_type=Path), default=None,
              help="also append each method's summary to this JSON-lines file as soon as it is done")
def run(seeds, out, device, only, overrides, collect):
    """Run the sweeps, one per method."""
    chosen = [m for m in METHODS if not only or m in only.split(",")]
    for method in chosen:
        config = ROOT / "configs" / "methods" / f"{method}.toml"
        summary = out / method / "sweep_summary.json"
        if summary.exists():
            print(f"{method}: finished already ({summary}), skipped", flush=True)
            continue
        args = ["sweep", "--config", str(config), "--seeds", seeds, "--out", str(out / method), "--device", device,
                "--quiet"]
        if (out / method / "checkpoints" / "latest.pt").exists():  # stopped part-way: go on from there
            args.append("--resume")
        term = method_term(config)
        if term:
            args += ["--grid", f"distill.terms.{term[0]}.weight=" + ",".join(map(str, grid_values(term[1])))]
        for o in overrides:
            args += ["--set", o]
        run_cli(method, args)
        if collect and summary.exists():
            with open(collect, "a") as f:
                f.write(json.dumps({"method": method, "summary": json.loads(summary.read_text())}) + "\n")


def _summaries(source: Path) -> dict[str, dict]:
    """``{method: sweep summary}`` from a run's folder or its --collect file (the last line per method wins)."""
    if source.is_file():
        lines = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        return {line["method"]: line["summary"] for line in lines}
    return {m: json.loads((source / m / "sweep_summary.json").read_text())
            for m in METHODS if (source / m / "sweep_summary.json").exists()}


def _fmt(point: dict) -> str:
    return f"{100 * point['mean']:.2f} ± {100 * point['std']:.2f}"


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of markdown")
def table(source, as_json):
    """Print the markdown table of a finished `run`: its --out folder or its --collect file."""
    rows = []
    summaries = _summaries(source)
    for method in METHODS:
        if method not in summaries:
            continue
        summary = summaries[method]
        term = method_term(ROOT / "configs" / "methods" / f"{method}.toml")
        points = summary["points"]
        if term is None:
            rows.append({"method": method, "term": None, "default": points[0], "best": points[0]})
            continue
        default_value = grid_values(term[1])[1]
        by_weight = {_weight(p): p for p in points}
        default = by_weight.get(default_value) or min(points, key=lambda p: abs(_weight(p) - default_value))
        best = max(points, key=lambda p: p["mean"])
        rows.append({"method": method, "term": term[0], "default": default, "best": best,
                     "weights": sorted(by_weight)})
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo("| method | term | paper default: weight | test acc % | best of grid: weight | test acc % | seeds |")
    click.echo("|---|---|---|---|---|---|---|")
    for r in rows:
        d, b = r["default"], r["best"]
        dw = "-" if r["term"] is None else f"{_weight(d):g}"
        bw = "-" if r["term"] is None else f"{_weight(b):g}"
        diverged = sum(p.get("diverged", 0) for p in (d, b))
        note = f" ({diverged} diverged)" if diverged else ""
        click.echo(f"| {r['method']} | {r['term'] or 'ce only'} | {dw} | {_fmt(d)} | {bw} | {_fmt(b)} | "
                   f"{d['n']}{note} |")


def _weight(point: dict) -> float:
    """The swept weight of a summary point (its name is ``key=value``)."""
    name = point["point"]
    return float(name.rpartition("=")[2]) if "=" in name else float("nan")


if __name__ == "__main__":
    main()
