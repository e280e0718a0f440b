"""docs/paradigms.md's table: the student alone, from each single teacher, from their ensemble, in a cohort,
and from its own moving average -- each swept over the same seeds with the same 8-epoch budget on digits.

Run from the repository root::

    python bench/paradigm_table.py run --seeds 5 --out runs/paradigms     # every sweep, one after another
    python bench/paradigm_table.py table runs/paradigms                    # the markdown table

Every row is ``python cli.py sweep --config <config> --seeds N`` with the ``--set``s listed in ROWS, and each
pipeline in PIPELINES is swept the same way, one row per stage (the
single-teacher rows point configs/methods/kd.toml at each of configs/paradigms/ensemble.toml's teachers;
the ensemble run fits the teachers that are missing, so it runs first). ``table`` reads each
``sweep_summary.json`` and each teacher's recorded accuracy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.method_table import run_cli  # noqa: E402 -- after the clone is on the path

C = "configs"
TEACHER_B = ["teacher.arch=small_cnn", "teacher.widths=[32, 64]", "teacher.checkpoint=runs/digits-teacher-b/teacher.pt"]
TEACHER_C = ["teacher.arch=small_cnn", "teacher.widths=[32, 64, 128]", "teacher.checkpoint=runs/digits-teacher-c/teacher.pt"]
#: (row name, what it is, config, --set overrides), in the order they run
ROWS = (  # the comparisons the docs draw first; then the variants
    ("ensemble", "KD from the ensemble of a, b, c (weighted)", f"{C}/paradigms/ensemble.toml", []),
    ("baseline", "student alone (CE)", f"{C}/methods/baseline.toml", []),
    ("kd-c", "KD from teacher c (small_cnn 32-64-128, the best single teacher)", f"{C}/methods/kd.toml", TEACHER_C),
    ("ema", "KD from its own moving average (decay 0.99)", f"{C}/paradigms/ema.toml", []),
    ("dml-2", "deep mutual learning, cohort of 2 (member mean)", f"{C}/paradigms/dml.toml", []),
    ("kd-a", "KD from teacher a (resnet18)", f"{C}/methods/kd.toml", []),
    ("ensemble-confidence", "KD from the ensemble, CA-MKD confidence weights", f"{C}/paradigms/ensemble.toml",
     ["distill.ensemble=confidence"]),
    ("kd-b", "KD from teacher b (small_cnn 32-64)", f"{C}/methods/kd.toml", TEACHER_B),
    ("dml-4", "deep mutual learning, cohort of 4 (member mean)", f"{C}/paradigms/dml.toml", ["cohort.size=4"]),
)
#: (folder, config): the pipelines, each swept over the same seeds (`sweep --config PIPELINE --seeds N`), one row per
#: stage in the table
PIPELINES = (
    ("born-again", f"{C}/paradigms/born_again.toml"),
    ("teacher-assistant", f"{C}/paradigms/teacher_assistant.toml"),
)
TEACHERS = {"a": "runs/digits-teacher/teacher.pt", "b": "runs/digits-teacher-b/teacher.pt",
            "c": "runs/digits-teacher-c/teacher.pt"}


@click.group()
def main():
    """Sweep every paradigm row over seeds and tabulate the results."""


@main.command()
@click.option("--seeds", default="5", show_default=True, help="passed to sweep --seeds")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/paradigms"), show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--only", default="", help="comma-separated subset of the rows")
def run(seeds, out, device, only):
    """Run the sweeps, one per row (a row with a sweep_summary.json is skipped)."""
    for name, _, config, sets in ROWS:
        if only and name not in only.split(","):
            continue
        args = ["sweep", "--config", config, "--seeds", seeds, "--out", str(out / name), "--device", device, "--quiet"]
        if (out / name / "sweep_summary.json").exists():
            print(f"{name}: done before", flush=True)
            continue
        if (out / name / "checkpoints" / "latest.pt").exists():
            args.append("--resume")  # an interrupted row goes on where it stopped
        for s in sets:
            args += ["--set", s]
        run_cli(name, args)
    for name, config in PIPELINES:  # a re-run skips every finished stage of every seed
        if only and name not in only.split(","):
            continue
        run_cli(name, ["sweep", "--config", config, "--seeds", seeds, "--out", str(out / name), "--device", device,
                       "--quiet"])


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
def table(source):
    """Print the markdown table of a finished `run` (its --out folder)."""
    import torch

    click.echo("| row | student | test acc % (mean ± std) | seeds |")
    click.echo("|---|---|---|---|")
    for name, what, _, _ in ROWS:
        path = source / name / "sweep_summary.json"
        if not path.exists():
            continue
        point = json.loads(path.read_text())["points"][0]
        click.echo(f"| {name} | {what} | {100 * point['mean']:.2f} ± {100 * point['std']:.2f} | {point['n']} |")
    for name, _ in PIPELINES:
        path = source / name / "pipeline_sweep.json"
        if not path.exists():
            continue
        for stage in json.loads(path.read_text())["stages"]:
            teacher = f"from {stage['teacher']}" if stage["teacher"] else _base_teacher(source / name, stage["stage"])
            click.echo(f"| {name}/{stage['stage']} | {stage['model']}, {teacher} | "
                       f"{100 * stage['mean']:.2f} ± {100 * stage['std']:.2f} | {stage['n']} |")
    accs = {}
    for t, p in TEACHERS.items():
        if Path(p).exists():
            accs[t] = torch.load(p, map_location="cpu", weights_only=False).get("test_acc")
    if accs:
        click.echo("\nteachers' test accuracy: " + ", ".join(f"{t} {100 * a:.2f}%" for t, a in accs.items()))
    if len(accs) == len(TEACHERS):
        click.echo(f"their weighted ensemble (T = 1): {100 * _ensemble_accuracy():.2f}%")


def _base_teacher(folder: Path, stage: str) -> str:
    """What a stage without an earlier stage as teacher learned from: its config's [teacher], or the labels
    alone (read from seed 0's summary.json)."""
    summary = json.loads((folder / "seed-0" / stage / "summary.json").read_text())
    return "labels only" if set(summary.get("terms", {})) <= {"ce"} else f"from {summary.get('teacher_arch', '[teacher]')}"


def _ensemble_accuracy() -> float:
    """configs/paradigms/ensemble.toml's teachers, mixed with their weights at T = 1, on the test split."""
    from fkd.build import load
    from fkd.data import load_data
    from fkd.distill import ensemble_accuracy
    from fkd.distill_setup import load_teacher_for

    resolved = load(ROOT / C / "paradigms" / "ensemble.toml", device="cpu")
    cfg, obj = resolved.config, resolved.objective
    data = load_data(cfg.data, device="cpu")
    teacher = load_teacher_for(cfg, data, obj, "cpu", quiet=True, echo=lambda *_: None)
    return ensemble_accuracy(teacher, obj, data, cfg)


if __name__ == "__main__":
    main()
