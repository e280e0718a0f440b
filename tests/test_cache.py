"""Teacher-output cache: same outputs as the live teacher, keyed so a stale cache is never used."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import fkd.cache
from fkd import cli
from fkd.cache import build_cache, cache_key
from fkd.checkpoint import load_checkpoint
from fkd.build import load_config
from fkd.data import load_data
from fkd.models.from_config import build_teacher
from fkd.teacher import save_teacher


@pytest.fixture
def setup(tiny_config, tmp_path):
    cfg = load_config(tiny_config("feature"))
    data = load_data(cfg.data)
    model, params, buffers = build_teacher(cfg, data.num_classes, ("block2",))
    path = tmp_path / "t.pt"
    save_teacher(path, cfg, model, params, buffers, 0.5)
    return cfg, data, model, {"params": params, "buffers": buffers}, path


def test_cached_outputs_equal_live_teacher(setup, tmp_path):
    cfg, data, model, variables, path = setup
    key = cache_key(path, data.fingerprint, model.feature_names, "fp32")
    cache = build_cache(model, variables, data.train, mode="memory", key=key, cache_dir=tmp_path / "c",
                        batch_size=32, precision="fp32", device="cpu")
    assert cache.where == "memory"
    x, _, idx = next(data.train.batches(16, shuffle=True, seed=3))
    live_logits, live_feats, _ = model.apply(variables["params"], variables["buffers"], x, train=False)
    got = cache.lookup(idx)
    torch.testing.assert_close(got["teacher_logits"], live_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["teacher_features"]["block2"], live_feats["block2"], rtol=1e-5, atol=1e-5)


def test_disk_cache_is_float16_and_reused(setup, tmp_path, monkeypatch):
    cfg, data, model, variables, path = setup
    key = cache_key(path, data.fingerprint, model.feature_names, "fp32")
    first = build_cache(model, variables, data.train, mode="disk", key=key, cache_dir=tmp_path / "c",
                        batch_size=32, precision="fp32", device="cpu")
    stored = load_checkpoint(first.where, "teacher_cache")
    assert stored["logits"].dtype == torch.float16 and stored["logits"].shape[0] == len(data.train)

    def must_not_recompute(*a, **k):
        raise AssertionError("a valid disk cache must be reused")

    monkeypatch.setattr(fkd.cache, "compute_outputs", must_not_recompute)
    again = build_cache(model, variables, data.train, mode="auto", key=key, cache_dir=tmp_path / "c",
                        batch_size=32, precision="fp32", device="cpu")
    idx = torch.arange(5)
    torch.testing.assert_close(again.lookup(idx)["teacher_logits"], first.lookup(idx)["teacher_logits"])


def test_key_changes_with_teacher_data_features_and_precision(setup, tmp_path):
    cfg, data, model, variables, path = setup
    base = cache_key(path, data.fingerprint, ("block2",), "fp32")
    assert cache_key(path, data.fingerprint, ("block2",), "fp32") == base
    assert cache_key(path, data.fingerprint, ("block1",), "fp32") != base
    assert cache_key(path, data.fingerprint, ("block2",), "bf16") != base
    other = load_data(load_config(None, ['data.name="synthetic"', "data.image_size=16", "data.synthetic_size=64"]).data)
    assert cache_key(path, other.fingerprint, ("block2",), "fp32") != base
    retrained = {k: v + 1 for k, v in variables["params"].items()}
    save_teacher(path, cfg, model, retrained, variables["buffers"], 0.5)  # same path, new weights
    assert cache_key(path, data.fingerprint, ("block2",), "fp32") != base


def _distill(cfg_path, out, *sets):
    args = ["distill", "--config", str(cfg_path), "--out", str(out), "--quiet"]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(cli.main, args)


def test_training_with_cache_matches_live_teacher(tiny_config, tmp_path):
    cfg = tiny_config("feature")
    cached = _distill(cfg, tmp_path / "cached")
    live = _distill(cfg, tmp_path / "live", 'teacher.cache="off"')
    assert cached.exit_code == 0 and live.exit_code == 0, cached.output + live.output
    assert "teacher cache: memory" in cached.output and "teacher cache: off" in live.output
    a = load_checkpoint(tmp_path / "cached" / "checkpoints" / "latest.pt")["state"]["params"]
    b = load_checkpoint(tmp_path / "live" / "checkpoints" / "latest.pt")["state"]["params"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)


def test_random_augmentation_runs_the_teacher_live(tiny_config, tmp_path):
    result = _distill(tiny_config("logit"), tmp_path / "aug", "data.flip=true")
    assert result.exit_code == 0, result.output
    assert "teacher cache: off" in result.output
