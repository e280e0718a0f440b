"""configs/methods/: one digits config per method, equal in everything but [distill], each one trainable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fkd import objective as objective_lib
from fkd.clone_files import load_clone_module
from fkd.build import load_config
from fkd.config_files import read_config_file
from fkd.models.from_config import build_student, build_teacher
from fkd.models.functional import feature_shapes
from fkd.models.zoo import head_prefix
from fkd.terms import Shapes, TermInputs

ROOT = Path(__file__).resolve().parents[1]
METHOD_FILES = sorted((ROOT / "configs" / "methods").glob("[!_]*.toml"))  # _base.toml is what they extend

pytestmark = pytest.mark.usefixtures("one_thread")


def _method_table():
    return load_clone_module("bench/method_table.py", "the method-table script")


def test_the_table_covers_every_method_config_and_every_term():
    table = _method_table()
    assert sorted(table.METHODS) == sorted(p.stem for p in METHOD_FILES)
    terms = {table.method_term(p)[0] for p in METHOD_FILES if table.method_term(p)}
    from fkd.terms import TERMS

    built_in = {n for n in TERMS.names() if TERMS.get(n).__module__.startswith("fkd.terms.")}
    cohort_only = {n for n in built_in if "cohort_logits" in TERMS.get(n).consumes}  # mutual: docs/paradigms.md
    # every built-in method, once (other tests register their own); ce_strong is MLKD's second cross-entropy
    assert terms == built_in - {"ce", "ce_strong"} - cohort_only


def test_method_configs_differ_only_in_distill_and_name():
    raw = {p.stem: read_config_file(p) for p in METHOD_FILES}
    reference = {k: v for k, v in raw["baseline"].items() if k not in ("distill", "name")}
    for method, cfg in raw.items():
        assert {k: v for k, v in cfg.items() if k not in ("distill", "name")} == reference, method
        assert cfg["distill"]["terms"]["ce"] == {"weight": 1.0}, method  # CE weighs 1 everywhere


def test_grid_is_the_default_weight_times_a_tenth_one_and_ten():
    table = _method_table()
    assert table.grid_values(9.0) == [0.9, 9.0, 90.0]
    assert table.grid_values(0.02) == [0.002, 0.02, 0.2]


def test_run_skips_finished_methods_and_resumes_a_stopped_one(tmp_path, monkeypatch):
    """An interrupted ``run`` repeated with the same command: a method with a summary is not swept again, one
    with only a checkpoint goes on from it (``sweep --resume``), one not started starts afresh."""
    table = _method_table()
    calls = {}
    monkeypatch.setattr(table, "run_cli", lambda name, args: calls.setdefault(name, args))
    (tmp_path / "kd").mkdir()
    (tmp_path / "kd" / "sweep_summary.json").write_text("{}")
    (tmp_path / "dkd" / "checkpoints").mkdir(parents=True)
    (tmp_path / "dkd" / "checkpoints" / "latest.pt").write_bytes(b"")
    table.run.main(["--out", str(tmp_path), "--only", "kd,dkd,dist", "--seeds", "2"], standalone_mode=False)
    assert sorted(calls) == ["dist", "dkd"]
    assert "--resume" in calls["dkd"] and "--resume" not in calls["dist"]
    assert calls["dist"][calls["dist"].index("--grid") + 1] == "distill.terms.dist.weight=0.2,2.0,20.0"


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: p.stem)
def test_method_config_gives_a_finite_loss_and_gradient(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(path.relative_to(ROOT).as_posix())
    obj = objective_lib.from_config(cfg.distill)
    k, side, batch = 10, cfg.data.image_size, 4
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, side, side, generator=gen), torch.randint(0, k, (batch,), generator=gen)
    student, sp, sb = build_student(cfg, k, obj.student_feature_names)
    teacher, tp, tb = build_teacher(cfg, k, obj.teacher_feature_names, seed=1)
    shapes = Shapes(feature_shapes(student, sp, sb, side, "cpu"), feature_shapes(teacher, tp, tb, side, "cpu"), k, 50,
                    teacher_params=tp, teacher_head=head_prefix(teacher.eval_template))
    params, state = obj.init(shapes, seed=0)
    x_strong = x.flip(-1)  # a stand-in second view for terms that read one (mlkd)
    with torch.no_grad():
        t_logits, t_feats, _ = teacher.apply(tp, tb, x, train=False)
        t_strong = teacher.apply(tp, tb, x_strong, train=False)[0] if obj.needs_strong_view else None

    def loss(sp):
        s_logits, s_feats, _ = student.apply(sp, sb, x, train=True)
        s_strong = student.apply(sp, sb, x_strong, train=True)[0] if obj.needs_strong_view else None
        inputs = TermInputs(s_logits, s_feats, y, t_logits, t_feats, torch.arange(batch),
                            torch.zeros((), dtype=torch.int64), torch.tensor(1.0), student_logits_strong=s_strong,
                            teacher_logits_strong=t_strong)
        return obj(params, state, inputs)[0]

    grads = torch.func.grad(loss)(sp)
    assert torch.isfinite(loss(sp))
    assert all(torch.isfinite(g).all() for g in grads.values())


def _docs_method_tables() -> list[tuple[str, list[list[str]]]]:
    """``(results file, rows)`` for each method table in docs/performance.md: the file its text names ("summaries
    are in `bench/results/....jsonl`") and the cells of the markdown table that follows."""
    import re

    text = (ROOT / "docs" / "performance.md").read_text()
    tables = []
    for match in re.finditer(r"summaries are in\s+`(bench/results/[^`]+\.jsonl)`", text):
        lines = text[match.end():].splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
        rows = []
        for line in lines[start + 2:]:
            if not line.startswith("|"):
                break
            rows.append([cell.strip().strip("*`") for cell in line.strip("|").split("|")])
        tables.append((match.group(1), rows))
    return tables


def test_docs_method_tables_are_their_results_files(capsys):
    """Every figure of docs/performance.md's method tables is what ``method_table.py table`` computes from the
    results file the text names; a row not measured yet has no summary there."""
    import json

    table = _method_table()
    tables = _docs_method_tables()
    assert len(tables) == 2  # the H200 table and the CPU table of the newer methods
    for results, rows in tables:
        table.table.main([str(ROOT / results), "--json"], standalone_mode=False)
        computed = {(r["term"] or "ce"): r for r in json.loads(capsys.readouterr().out)}
        assert rows and {row[1] for row in rows} >= set(computed), results
        for label, term, default_weight, default, best_weight, best in rows:
            if default == "not yet measured":
                assert term not in computed, (results, term)
                continue
            r = computed[term]
            d, b = r["default"], r["best"]
            weights = ["—", "—"] if r["term"] is None else [f"{table._weight(p):g}" for p in (d, b)]
            assert [default_weight, default, best_weight, best] == [
                weights[0], table._fmt(d), weights[1], table._fmt(b)], (results, label)
