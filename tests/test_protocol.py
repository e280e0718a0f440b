"""``bench/protocol.py``: the CIFAR-100 protocol timed on synthetic data, run on a CPU with a few steps.

The shipped resnet32x4 -> resnet8x4 KD config, shrunk with ``--set`` (resnet8 for both, batch 8) and a
few hundred synthetic images, so the whole script runs in seconds; the CUDA-only variants are skipped
with their reason."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from fkd.build import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/cifar100/resnet32x4_resnet8x4/kd.toml"
SMALL = ["--set", "teacher.arch=resnet8", "--set", "student.arch=resnet8", "--set", "data.batch_size=8",
         "--set", "data.eval_batch_size=16"]


def protocol_module():
    spec = importlib.util.spec_from_file_location("bench_protocol", ROOT / "bench" / "protocol.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def protocol():
    return protocol_module()


def test_protocol_runs_on_a_cpu_and_prints_one_json_object_per_variant(protocol, capsys, one_thread):
    code = protocol.main(["--config", str(CONFIG), "--device", "cpu", "--images", "64", "--test-images", "20",
                          "--steps", "2", "--windows", "2", "--warmup", "1", "--members", "2", "--json",
                          "--variants", "imperative,eager,cudagraphs,tf32,bf16_channels_last,population", *SMALL])
    out = capsys.readouterr().out
    assert code == 0
    rows = {r["variant"]: r for r in map(json.loads, out.strip().splitlines())}
    assert list(rows) == ["imperative", "eager", "cudagraphs", "tf32", "bf16_channels_last", "population"]
    for row in rows.values():
        assert row["device"] == "cpu" and row["precision"] in ("fp32", "tf32", "bf16")
    for name in ("cudagraphs", "tf32", "bf16_channels_last"):
        assert "CUDA" in rows[name]["skipped"] and "images_per_s" not in rows[name]
    imperative, eager, population = rows["imperative"], rows["eager"], rows["population"]
    assert imperative["x_imperative"] == 1.0 and not eager["compiled"] and eager["teacher"] == "live"
    assert population["members"] == 2 and not population["compiled"]  # a CPU: eager, as fkd sweep runs it
    cfg = load_config(CONFIG, ["data.batch_size=8"])
    steps = 50_000 // 8
    for row in (imperative, eager, population):
        assert len(row["window_images_per_s"]) == 2 and row["images_per_s"] > 0
        assert math.isclose(row["images_per_s"], statistics.median(row["window_images_per_s"]))
        assert math.isclose(row["epoch_s"], steps * 8 * row["members"] / row["images_per_s"])
        assert math.isclose(row["eval_s"], 10_000 * row["members"] / row["eval_images_per_s"])
        total = cfg.train.epochs * (row["epoch_s"] + row["eval_s"])
        assert math.isclose(row["protocol_seeds_s"], total * (2 if row["members"] == 1 else 1))
    assert math.isclose(eager["protocol_one_s"], cfg.train.epochs * (eager["epoch_s"] + eager["eval_s"]))
    assert population["protocol_one_s"] is None
    assert math.isclose(eager["x_imperative"], eager["images_per_s"] / imperative["images_per_s"])


def test_protocol_table_names_the_device_and_the_skipped_variants(protocol, capsys, one_thread):
    code = protocol.main(["--config", str(CONFIG), "--device", "cpu", "--images", "32", "--test-images", "16",
                          "--steps", "1", "--windows", "1", "--warmup", "1", "--members", "2",
                          "--variants", "eager,cudagraphs", *SMALL])
    out = capsys.readouterr().out
    assert code == 0
    assert "device cpu" in out and "random crop + flip (teacher live)" in out
    assert "240 ep, 1 student" in out and "240 ep, 2 seeds" in out
    assert "cudagraphs: skipped (CUDA graphs need a CUDA device)" in out
    assert any(line.startswith("eager ") for line in out.splitlines())


def test_cached_variant_reads_teacher_outputs_from_the_device(protocol, one_thread):
    cfg = load_config(CONFIG, ["teacher.arch=resnet8", "student.arch=resnet8", "data.batch_size=8",
                               "data.eval_batch_size=16"])
    bench = protocol.setup(cfg, torch.device("cpu"), 32, 16)
    cache = protocol.teacher_cache(bench, "fp32")
    assert cache.logits.shape == (32, 100) and cache.where == "memory"
    row = protocol.measure(bench, protocol.Variant("cached", cached=True), 1, warmup=1, steps=1, windows=1,
                           echo=lambda m: None)
    assert row["teacher"] == "cached" and row["images_per_s"] > 0 and not row["compiled"]


def test_protocol_refuses_bad_input_in_one_line(protocol, capsys):
    code = protocol.main(["--config", str(CONFIG), "--device", "cpu", "--variants", "fast", *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: unknown variant 'fast'") and "valid variants: imperative" in err
    code = protocol.main(["--config", str(CONFIG), "--device", "cpu", "--images", "4", *SMALL])
    assert code == 2 and "fewer than one batch" in capsys.readouterr().err
