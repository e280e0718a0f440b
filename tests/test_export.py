"""fkd export: .pt2 and ONNX files that load back and compute fkd's logits, int8, the report, errors,
and fkd evaluate on exported files. One short digits run per student architecture, made once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fkd import cli
from fkd.checkpoint import save_checkpoint
from fkd.export.exported_file import load_exported
from fkd.export.pipeline import export_model
from fkd.export.saved_model import load_saved_model
from fkd.export.verify import fkd_logits
from tests.conftest import tiny_config_text


def run_config(root: Path, arch: str, epochs: int, lr: float, train_limit: int, method: str) -> str:
    """A short digits run of ``arch`` (student widths 16, 32 where it has them), its teacher fitted in one epoch."""
    return tiny_config_text(
        root, method, dataset="digits", name=f"export-{arch}", student={"arch": arch, "widths": [16, 32]},
        data={"batch_size": 64, "eval_batch_size": 180, "train_limit": train_limit},
        teacher={"train": {"epochs": 1, "log_every": None}},
        train={"epochs": epochs, "log_every": None, "optimizer": {"learning_rate": lr}},
        distill={"student_features": None, "teacher_features": None})


# small_cnn is trained enough to judge int8 (about 80% on digits), and its teacher is fitted too (for the
# --teacher tests); the others only need weights that are not the initial ones.
RUNS = {
    "small_cnn": dict(epochs=3, lr=1e-2, train_limit=0, method="none"),
    "seed_cnn": dict(epochs=1, lr=1e-3, train_limit=128, method="none"),
    "mobilenet_v3_small": dict(epochs=1, lr=1e-3, train_limit=128, method="none"),
}


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """``run(arch) -> (run directory, config file)``: a short digits run of ``arch``, made once per module."""
    root = tmp_path_factory.mktemp("export-runs")
    made = {}

    def run(arch: str):
        if arch not in made:
            config = root / f"{arch}.toml"
            config.write_text(run_config(root, arch, **RUNS[arch]))
            out = root / arch
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # nothing here is timed; one thread is faster on a busy machine
            try:
                if arch == "small_cnn":
                    fitted = invoke("teacher", "--config", config, "--out", root / "teacher-run", "--quiet")
                    assert fitted.exit_code == 0, fitted.output
                result = invoke("distill", "--config", config, "--out", out, "--quiet")
            finally:
                torch.set_num_threads(threads)
            assert result.exit_code == 0, result.output
            made[arch] = (out, config)
        return made[arch]

    return run


def _needs_onnx(fmt: str) -> None:
    if fmt == "onnx":
        for name in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(name, reason="the [export] extra (pip install -e '.[export]') is not installed")


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("arch", ["seed_cnn", "small_cnn", "mobilenet_v3_small"])
def test_exported_file_loads_back_and_matches_fkd(digits_run, tmp_path, one_thread, arch, fmt):
    _needs_onnx(fmt)
    run_dir, _ = digits_run(arch)
    out = tmp_path / f"student.{fmt}"
    entry = export_model(run_dir, fmt=fmt, out=out, latency_repeats=0)
    assert entry["file"] == str(out) and out.is_file()
    saved = load_saved_model(run_dir)
    run, metadata = load_exported(out, threads=1)
    assert metadata["arch"] == arch and metadata["role"] == "student" and metadata["num_classes"] == 10
    # inputs as the file takes them: pixels / 255, any batch size (the batch dimension is dynamic)
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 5):
        pixels = torch.randint(0, 256, (batch, 3, 16, 16), generator=generator, dtype=torch.uint8)
        x = pixels.float() / 255
        torch.testing.assert_close(run(x), fkd_logits(saved, x), atol=1e-4, rtol=1e-4)
    report = json.loads((tmp_path / "export.json").read_text())[out.name]
    assert report["format"] == fmt and report["quantization"] is None
    assert report["input"]["shape"] == ["batch", 3, 16, 16] and report["input"]["value_range"] == [0.0, 1.0]
    assert report["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert report["file_size_bytes"] == out.stat().st_size
    assert report["params"] == sum(p.numel() for p in saved.params.values())
    assert report["opset"] == (18 if fmt == "onnx" else None)
    assert report["verification"]["max_abs_logit_diff"] <= 1e-4
    assert report["test_acc"] == pytest.approx(report["fkd_test_acc"], abs=1 / report["test_images"])
    assert report["latency_ms_per_image"] is None  # --latency-repeats 0


def test_int8_onnx_is_quantized_timed_and_within_two_points(digits_run, tmp_path, one_thread):
    _needs_onnx("onnx")
    import onnx

    run_dir, config = digits_run("small_cnn")
    out = tmp_path / "student-int8.onnx"
    result = invoke("export", run_dir, "--format", "onnx", "--quantize", "int8", "--out", out,
                    "--latency-repeats", "1", "--json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output.splitlines()[-1])
    assert entry["quantization"]["scheme"] == "int8"
    assert entry["fkd_test_acc"] > 0.6  # trained: the comparison below means something
    assert abs(entry["test_acc"] - entry["fkd_test_acc"]) <= 0.02
    graph = onnx.load(str(out)).graph  # really quantized: int8 weights and quantize / dequantize pairs
    assert any(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    latency = entry["latency_ms_per_image"]
    for who in ("fkd", "exported", "teacher"):
        assert latency[who]["batch_1"] > 0 and latency[who]["batch_64"] > 0
    assert latency["teacher"]["arch"] == "small_cnn" and latency["threads"] == 1  # timed with one thread by default
    assert "busy" in latency and latency["cores"] >= 1
    evaluated = invoke("evaluate", out, "--config", config, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output.splitlines()[-1])
    assert report["test_acc"] == pytest.approx(entry["test_acc"]) and report["quantization"] == "int8"
    assert report["size_bytes"] == out.stat().st_size and report["cpu_latency_ms"] > 0


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_evaluate_exported_file(digits_run, tmp_path, one_thread, fmt):
    _needs_onnx(fmt)
    run_dir, config = digits_run("small_cnn")
    out = tmp_path / f"student.{fmt}"
    entry = export_model(run_dir, fmt=fmt, out=out, latency_repeats=0)
    for extra in ([], ["--config", config]):  # the config stored in the file, or a given one
        result = invoke("evaluate", out, *extra, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.output.splitlines()[-1])
        assert report["test_acc"] == pytest.approx(entry["test_acc"]) and report["format"] == fmt
        assert report["test_images"] == entry["test_images"] and report["params"] == entry["params"]
    printed = invoke("evaluate", out)
    assert printed.exit_code == 0 and "test accuracy" in printed.output and "per class" in printed.output
    wrong_size = invoke("evaluate", out, "--config", config, "--set", "data.image_size=32")
    assert wrong_size.exit_code == 2 and "data.image_size" in wrong_size.output
    assert "Traceback" not in wrong_size.output


def test_teacher_where_a_student_is_expected(digits_run, tmp_path, one_thread):
    run_dir, _ = digits_run("small_cnn")
    teacher_ckpt = run_dir.parent / "teacher" / "teacher.pt"
    refused = invoke("export", teacher_ckpt, "--format", "pt2", "--out", tmp_path / "t.pt2")
    assert refused.exit_code == 2 and "holds a teacher, but export expects a student" in refused.output
    assert "--teacher" in refused.output and not (tmp_path / "t.pt2").exists()
    # asked for, the teacher exports -- from its checkpoint, or as the teacher a student run was distilled from
    for source in (teacher_ckpt, run_dir):
        out = tmp_path / f"teacher-{source.name}.pt2"
        result = invoke("export", source, "--teacher", "--format", "pt2", "--out", out, "--latency-repeats", "0")
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "export.json").read_text())[out.name]["role"] == "teacher"


def test_files_that_are_not_fkd_model_checkpoints(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    cache = save_checkpoint(tmp_path / "cache.pt", {"rows": torch.zeros(2)}, "teacher_cache")
    for path, message in ((foreign, "is not an fkd checkpoint"), (garbage, "not a readable checkpoint"),
                          (tmp_path / "missing", "does not exist"), (cache, "not a model checkpoint")):
        result = invoke("export", path, "--format", "pt2")
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    bad_export = tmp_path / "broken.pt2"
    bad_export.write_bytes(b"not a model")
    result = invoke("evaluate", bad_export, "--config", "configs/baseline.toml")
    assert result.exit_code == 2 and "could not be read" in result.output


def test_a_mismatch_is_an_error_and_leaves_nothing(digits_run, tmp_path, one_thread, monkeypatch):
    import fkd.export.pipeline

    run_dir, _ = digits_run("small_cnn")
    out = tmp_path / "student.pt2"
    out.write_bytes(b"the file exported before")
    real = fkd.export.pipeline.fkd_logits
    monkeypatch.setattr(fkd.export.pipeline, "fkd_logits", lambda saved, x: real(saved, x) + 1e-3)
    result = invoke("export", run_dir, "--format", "pt2", "--out", out, "--latency-repeats", "0", "--overwrite")
    assert result.exit_code == 2 and "differs from fkd's model" in result.output and "was not kept" in result.output
    assert out.read_bytes() == b"the file exported before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pt2"]  # no temporary files, no report


def test_impossible_requests_are_refused_before_any_work(digits_run, tmp_path, monkeypatch):
    run_dir, _ = digits_run("small_cnn")
    pt2_int8 = invoke("export", run_dir, "--format", "pt2", "--quantize", "int8", "--out", tmp_path / "q.pt2")
    assert pt2_int8.exit_code == 2 and "needs --format onnx" in pt2_int8.output
    suffix = invoke("export", run_dir, "--format", "onnx", "--out", tmp_path / "model.pt2")
    assert suffix.exit_code == 2 and "must end in .onnx" in suffix.output
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the [export] extra were not installed
    missing = invoke("export", run_dir, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert missing.exit_code == 2 and '.[export]' in missing.output and "onnxruntime" in missing.output
    assert list(tmp_path.iterdir()) == []


def test_readme_table_script_runs(digits_run, tmp_path, one_thread):
    from fkd.clone_files import load_clone_module

    _needs_onnx("onnx")
    table = load_clone_module("bench/export_table.py", "the export table script")
    run_dir, _ = digits_run("small_cnn")
    rows = table.export_rows(run_dir, tmp_path, fmt="onnx", latency_repeats=1)
    assert [(r["label"], r["role"]) for r in rows] == [
        ("teacher", "teacher"), ("student", "student"), ("student int8", "student")]
    text = table.markdown_table(rows)
    assert text.count("\n| ") == 3 and "student int8 (small_cnn)" in text and "teacher.onnx" in text
    assert set(json.loads((tmp_path / "export.json").read_text())) == {"teacher.onnx", "student.onnx",
                                                                       "student-int8.onnx"}


def test_cli_choices_are_the_registries():
    from fkd.export.exported_file import FORMATS
    from fkd.export.quantize import SCHEMES

    choices = {p.name: list(p.type.choices) for p in cli.export.params if hasattr(p.type, "choices")}
    assert choices == {"fmt": list(FORMATS), "quantize": list(SCHEMES)}
