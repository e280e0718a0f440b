"""Transfer sets and function matching: unlabeled examples (label -1), label masking, labeled fractions,
batch mixing, mixup / cutmix from the step's key, the logits-only cache, memory-mapped STL-10, and the
shipped configs/transfer/ configs from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets
from click.testing import CliRunner

import fkd.teacher
from fkd import cli, losses, optim, prng
from fkd.cache import build_cache, cache_key
from fkd.config import DataConfig
from fkd.build import load_config
from fkd.data import load_data
from fkd.data.datasets import Split, TensorViews
from fkd.data.transfer import labeled_mask, labeled_per_batch, training_split
from fkd.errors import ConfigError, DataError
from fkd.mixup import cutmix, make_mixer, mixup, partner_order
from fkd.models import build_model
from fkd.models.from_config import build_teacher
from fkd.objective import from_weights
from fkd.step import MIX_STREAM, init_train_state, make_train_step
from fkd.teacher import save_teacher

ROOT = Path(__file__).resolve().parents[1]


def data_config(**overrides) -> DataConfig:
    return DataConfig(**{"num_workers": 0, "download": False, **overrides})


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


# --- label masking ------------------------------------------------------------------------------------


def test_cross_entropy_with_unlabeled_examples_is_the_mean_over_the_labeled_ones():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g, requires_grad=True)
    labels = torch.tensor([3, -1, 0, -1, -1, 4, 1, -1])
    labeled = labels >= 0
    got = losses.cross_entropy(logits, labels)
    torch.testing.assert_close(got, F.cross_entropy(logits[labeled], labels[labeled]))
    (grad,) = torch.autograd.grad(got, logits)
    assert torch.all(grad[~labeled] == 0) and torch.all(grad[labeled].abs().sum(1) > 0)
    every = torch.tensor([3, 2, 0, 1, 1, 4, 1, 0])  # nothing masked: plain cross-entropy
    torch.testing.assert_close(losses.cross_entropy(logits, every), F.cross_entropy(logits, every))


def test_an_all_unlabeled_batch_gives_zero_and_finite_zero_gradients():
    logits = torch.randn(4, 3, requires_grad=True)
    loss = losses.cross_entropy(logits, torch.full((4,), -1))
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and torch.isfinite(grad).all() and torch.all(grad == 0)


def test_step_counts_labeled_examples_only_and_ce_ignores_the_rest():
    model, params, buffers = build_model("small_cnn", 4, 16, (), widths=(4,))
    opt = optim.sgd(0.1)
    state = init_train_state(params, buffers, opt)
    step = make_train_step(model, from_weights({"ce": 1.0}), opt, compile="off")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 16, 16, generator=g)
    y = torch.tensor([0, -1, 2, -1, 3, -1])
    _, metrics = step(state, {"x": x, "y": y})
    assert metrics["count"] == 3 and 0 <= metrics["correct"] <= 3
    # all unlabeled: the CE term is 0, the step finite, and nothing learns from it
    new, metrics = step(state, {"x": x, "y": torch.full((6,), -1)})
    assert metrics["count"] == 0 and metrics["ce"] == 0 and metrics["finite"]
    assert torch.equal(new["params"]["model"]["fc.weight"], state["params"]["model"]["fc.weight"])


# --- label_fraction, the transfer set, batch mixing ----------------------------------------------------


def test_label_fraction_is_deterministic_and_class_balanced():
    labels = load_data(data_config()).train.labels
    keep = labeled_mask(labels, 0.1)
    assert torch.equal(keep, labeled_mask(labels.clone(), 0.1))  # a function of the labels alone
    for c in range(10):
        n = int((labels == c).sum())
        assert int((keep & (labels == c)).sum()) == int(0.1 * n + 0.5)
    # a run's seed plays no part: two loads give the same labeled examples
    a = load_data(data_config(label_fraction=0.1, transfer="unlabeled")).train.labels
    b = load_data(data_config(label_fraction=0.1, transfer="unlabeled")).train.labels
    assert torch.equal(a, b) and torch.equal(a >= 0, keep) and torch.equal(a[keep], labels[keep])


def test_label_fraction_drops_the_rest_without_a_transfer_set():
    full = load_data(data_config())
    kept = load_data(data_config(label_fraction=0.1))
    keep = labeled_mask(full.train.labels, 0.1)
    assert len(kept.train) == int(keep.sum()) and bool((kept.train.labels >= 0).all())
    assert torch.equal(kept.train.views, full.train.views[keep])
    assert kept.fingerprint != full.fingerprint


def test_transfer_without_unlabeled_images_is_a_data_error():
    with pytest.raises(DataError, match="no unlabeled images.*label_fraction"):
        load_data(data_config(transfer="unlabeled"))
    with pytest.raises(ConfigError, match="data.labeled_share .* data.transfer"):
        data_config(labeled_share=0.5)


def test_batches_hold_the_configured_share_of_labeled_examples():
    data = load_data(data_config(label_fraction=0.1, transfer="unlabeled", labeled_share=0.25))
    source = data.train
    assert len(source) == 1437 and int((source.labels >= 0).sum()) == 145
    batches = list(source.batches(64, shuffle=True, seed=3, epoch=2, drop_last=True))
    assert len(batches) == source.num_batches(64, drop_last=True) == 1437 // 64
    for _, y, idx in batches:
        assert y.shape == (64,) and int((y >= 0).sum()) == labeled_per_batch(64, 0.25) == 16
        assert torch.equal(y, source.labels[idx])
    labeled_seen = torch.cat([idx[y >= 0] for _, y, idx in batches])
    counts = torch.bincount(labeled_seen, minlength=len(source))[source.labels >= 0]
    assert counts.max() - counts.min() <= 1  # the labeled set is cycled evenly: 352 draws of 145
    # a pure function of (seed, epoch): the same again, another epoch differs, a resume skips exactly
    again = list(source.batches(64, shuffle=True, seed=3, epoch=2, drop_last=True))
    assert all(torch.equal(a[2], b[2]) for a, b in zip(batches, again))
    other = next(source.batches(64, shuffle=True, seed=3, epoch=3, drop_last=True))
    assert not torch.equal(other[2], batches[0][2])
    resumed = list(source.batches(64, shuffle=True, seed=3, epoch=2, start=5, drop_last=True))
    assert all(torch.equal(a[2], b[2]) for a, b in zip(batches[5:], resumed))


def test_share_zero_shuffles_labeled_and_unlabeled_together():
    source = load_data(data_config(label_fraction=0.1, transfer="unlabeled")).train
    idx = torch.cat([i for _, _, i in source.batches(64, shuffle=True, seed=0)])
    assert torch.equal(idx.sort().values, torch.arange(len(source)))  # one pass over every image


def test_training_split_appends_the_data_sets_own_unlabeled_images():
    views = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    train = Split(TensorViews(views, torch.tensor([0, 1, 0, 1])), torch.tensor([0, 1, 0, 1]))
    extra = Split(TensorViews(views[:3] + 7, torch.full((3,), -1)), torch.full((3,), -1))
    got = training_split(data_config(transfer="unlabeled"), train, extra)
    assert got.labels.tolist() == [0, 1, 0, 1, -1, -1, -1] and got.dataset.views.shape[0] == 7
    assert training_split(data_config(), train, extra) is train


# --- function matching: mixup / cutmix from the step's key ---------------------------------------------


def test_mixup_and_cutmix_are_reproducible_from_the_key_and_differ_across_keys():
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    key = prng.fold_in(prng.key_from_seed(0), 5)
    for mix in (make_mixer(1.0, 0.0), make_mixer(0.0, 1.0), make_mixer(0.5, 1.0)):
        assert torch.equal(mix(x, key), mix(x, key))
        assert not torch.equal(mix(x, key), mix(x, prng.fold_in(prng.key_from_seed(0), 6)))
    assert make_mixer(0.0, 0.0) is None
    # mixup is one convex combination of each image with a partner; cutmix takes each pixel from one of them
    m = mixup(x, key, 1.0)
    partner = x[partner_order(prng.fold_in(key, 1), 6, "cpu")]
    lam = prng.beta(prng.fold_in(key, 0), 1.0)
    torch.testing.assert_close(m, lam * x + (1 - lam) * partner)
    c = cutmix(x, key, 1.0)
    assert bool(((c == x) | (c == partner)).all())


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_beta_from_keys_has_the_right_moments(alpha):
    draws = prng.beta(prng.key_from_seed(3), alpha, (20000,))
    assert bool(((draws >= 0) & (draws <= 1)).all())
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); 20,000 draws put both well within these bounds
    assert abs(draws.mean().item() - 0.5) < 0.01
    assert abs(draws.var().item() / (1 / (4 * (2 * alpha + 1))) - 1) < 0.05
    assert torch.equal(draws, prng.beta(prng.key_from_seed(3), alpha, (20000,)))


def test_vmapped_keys_give_each_student_its_own_mix():
    x = torch.randn(4, 3, 8, 8)
    keys = prng.fold_in(prng.key_from_seed(0), torch.arange(3))
    mixed = torch.func.vmap(lambda k: mixup(x, k, 1.0))(keys)
    for i in range(3):
        torch.testing.assert_close(mixed[i], mixup(x, keys[i], 1.0))
    assert not torch.equal(mixed[0], mixed[1])


@pytest.fixture(scope="module")
def kd_setup():
    student, sp, sb = build_model("small_cnn", 4, 16, (), widths=(4,))
    teacher, tp, tb = build_model("small_cnn", 4, 16, (), widths=(8,), seed=1)
    objective = from_weights({"logit": 1.0}, temperature=2.0)
    opt = optim.sgd(0.1)
    return student, teacher, objective, opt, init_train_state(sp, sb, opt, seed=7), {"params": tp, "buffers": tb}


def test_student_and_teacher_see_the_same_mixed_images(kd_setup):
    student, teacher, objective, opt, state, tv = kd_setup
    mix = make_mixer(1.0, 0.0)
    step = make_train_step(student, objective, opt, teacher=teacher, compile="off", mix=mix)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    batch = {"x": x, "y": torch.full((8,), -1)}
    for n in range(2):  # two steps: the mix comes from fold_in(key, step), and differs between them
        st = {**state, "step": torch.tensor(n)}
        _, metrics = step(st, batch, tv)
        mixed = mix(x, prng.fold_in(prng.fold_in(state["key"], n), MIX_STREAM))
        with torch.no_grad():
            s_logits, _, _ = student.apply(state["params"]["model"], state["buffers"], mixed, train=True)
            t_logits, _, _ = teacher.apply(tv["params"], tv["buffers"], mixed, train=False)
        torch.testing.assert_close(metrics["logit"], losses.soft_target_kl(s_logits, t_logits, 2.0))
    plain = make_train_step(student, objective, opt, teacher=teacher, compile="off")
    assert not torch.allclose(plain(state, batch, tv)[1]["logit"], step(state, batch, tv)[1]["logit"])
    with pytest.raises(ValueError, match="mixed view"):
        step(state, {**batch, "teacher_logits": torch.zeros(8, 4)}, tv)


def test_mixing_with_a_label_term_or_without_a_teacher_term_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'ce' term reads labels"):
        load_config(None, ["data.mixup=1.0", "distill.method=logit"])
    with pytest.raises(ConfigError, match="needs a teacher term"):
        load_config(None, ["data.cutmix=1.0", "distill.method=none"])


# --- the cache: the transfer set, logits only when features do not fit ------------------------------


def test_cache_keeps_logits_only_when_features_exceed_the_budget(tiny_config, tmp_path):
    cfg = load_config(tiny_config("feature"))
    data = load_data(cfg.data)
    model, params, buffers = build_teacher(cfg, data.num_classes, ("block2",))
    tv = {"params": params, "buffers": buffers}
    path = tmp_path / "t.pt"
    save_teacher(path, cfg, model, params, buffers, 0.5)
    key = cache_key(path, data.fingerprint, model.feature_names, "fp32")
    said = []
    small = build_cache(model, tv, data.train, mode="disk", key=key, cache_dir=tmp_path / "c", batch_size=32,
                        precision="fp32", device="cpu", echo=said.append, max_bytes=1000)
    assert small.logits_only and "caching the logits only" in said[0] and small.where.endswith("-logits.pt")
    full = build_cache(model, tv, data.train, mode="disk", key=key, cache_dir=tmp_path / "c", batch_size=32,
                       precision="fp32", device="cpu")
    assert not full.logits_only
    idx = torch.arange(16)
    assert set(small.lookup(idx)) == {"teacher_logits"}
    torch.testing.assert_close(small.lookup(idx)["teacher_logits"], full.lookup(idx)["teacher_logits"])
    # the step computes the features live for a logits-only cache: the same loss as the full cache
    from fkd.distill_setup import preflight

    pre = preflight(cfg, data.num_classes, len(data.train), "cpu")
    obj_params, obj_state = pre.objective.init(pre.shapes)
    opt = optim.adam(1e-3)
    state = init_train_state(pre.params, pre.buffers, opt, objective_params=obj_params, objective_state=obj_state)
    step = make_train_step(pre.student, pre.objective, opt, teacher=model, compile="off")
    x, y, idx = next(data.train.batches(16, shuffle=False))
    _, with_features = step(state, {"x": x, "y": y, "idx": idx, **full.lookup(idx)}, tv)
    _, logits_only = step(state, {"x": x, "y": y, "idx": idx, **small.lookup(idx)}, tv)
    torch.testing.assert_close(logits_only["loss"], with_features["loss"], rtol=2e-3, atol=2e-3)


# --- STL-10 memory-mapped ---------------------------------------------------------------------------


def write_stl10(root: Path, n_train=5, n_test=3, n_unlabeled=7):
    """STL-10 stand-in binaries (column-major per channel, 1-based labels), the unlabeled file included."""
    rng = np.random.default_rng(4)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        images[:, 0, :, :48] = 0  # orientation mistakes show
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
        labels = rng.integers(0, 10, n)
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        out[split] = (torch.from_numpy(images), torch.from_numpy(labels))
    return out


@pytest.fixture
def no_torchvision_stl10(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torchvision's STL10 (md5 of every file, whole-file reads) must not run")

    monkeypatch.setattr(torchvision.datasets, "STL10", refuse)


def test_stl10_unlabeled_split_is_memory_mapped(tmp_path, no_torchvision_stl10, monkeypatch):
    written = write_stl10(tmp_path)
    read_whole = []
    real_fromfile = np.fromfile
    monkeypatch.setattr(np, "fromfile", lambda f, *a, **k: read_whole.append(str(f)) or real_fromfile(f, *a, **k))
    data = load_data(data_config(name="stl10", root=str(tmp_path), image_size=96, transfer="unlabeled",
                                 in_memory="never"))
    assert not any(name.endswith("_X.bin") for name in read_whole)  # only the small label files are read whole
    train_x, train_y = written["train"]
    assert len(data.train) == 5 + 7 and data.train.labels.tolist() == train_y.tolist() + [-1] * 7
    assert torch.equal(data.train.dataset[6][0], written["unlabeled"][0][1])  # the orientation is STL-10's
    assert torch.equal(data.train.dataset[2][0], train_x[2])
    x, y, idx = next(data.train.batches(12, shuffle=False))
    assert y.tolist() == data.train.labels.tolist()
    # without a transfer set the unlabeled file is never touched
    (tmp_path / "stl10_binary" / "unlabeled_X.bin").unlink()
    assert len(load_data(data_config(name="stl10", root=str(tmp_path), image_size=96)).train) == 5


def test_stl10_truncated_unlabeled_file_is_a_data_error(tmp_path, no_torchvision_stl10):
    write_stl10(tmp_path)
    path = tmp_path / "stl10_binary" / "unlabeled_X.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="unlabeled_X.bin.*not a whole number"):
        load_data(data_config(name="stl10", root=str(tmp_path), image_size=96, transfer="unlabeled"))


def test_stl10_first_download_goes_through_torchvision(tmp_path, monkeypatch):
    calls = []

    def fake_stl10(root, split, download):
        calls.append((root, split, download))
        write_stl10(Path(root))

    monkeypatch.setattr(torchvision.datasets, "STL10", fake_stl10)
    data = load_data(data_config(name="stl10", root=str(tmp_path), image_size=32, transfer="unlabeled",
                                 download=True))
    assert calls == [(str(tmp_path), "test", True)] and len(data.train) == 12
    load_data(data_config(name="stl10", root=str(tmp_path), image_size=32, transfer="unlabeled", download=True))
    assert len(calls) == 1  # present files: no download, no md5


def test_image_folder_unlabeled_folder(tmp_path):
    from tests.test_data import write_image_folder

    write_image_folder(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    (tmp_path / "unlabeled" / "sub").mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (9, 7), (i * 40, 0, 0)).save(tmp_path / "unlabeled" / "sub" / f"{i}.png")
    data = load_data(data_config(name="imagefolder", root=str(tmp_path), image_size=8, transfer="unlabeled"))
    assert data.train.labels.tolist() == [0, 0, 1, 1, -1, -1, -1]
    with pytest.raises(DataError, match="unlabeled"):
        load_data(data_config(name="imagefolder", root=str(tmp_path / "missing"), image_size=8, transfer="unlabeled"))


# --- the teacher fit and the shipped configs ------------------------------------------------------------


def test_teacher_fit_uses_labeled_examples_only(tiny_config, tmp_path, monkeypatch):
    seen = {}
    real_fit = fkd.teacher.fit

    def spy(start, *, source, **kwargs):
        seen["labels"] = source.labels.clone()
        return real_fit(start, source=source, **kwargs)

    monkeypatch.setattr(fkd.teacher, "fit", spy)
    cfg = tiny_config("logit", name="t.toml")
    result = invoke("teacher", "--config", cfg, "--set", "data.label_fraction=0.5", "--set", "data.transfer=unlabeled",
                    "--set", "teacher.train.epochs=1", "--out", tmp_path / "t", "--quiet")
    assert result.exit_code == 0, result.output
    assert "labeled training images only" in result.output
    assert bool((seen["labels"] >= 0).all()) and len(seen["labels"]) == 48  # half of 96, class-balanced


TEACHER_SETS = ["--set", "teacher.arch=small_cnn", "--set", "teacher.widths=[8, 16]"]


def test_each_transfer_config_runs_from_the_cli(tmp_path):
    ckpt = tmp_path / "teacher.pt"
    common = [*TEACHER_SETS, "--set", f"teacher.checkpoint={ckpt.as_posix()}", "--set",
              f"teacher.cache_dir={(tmp_path / 'cache').as_posix()}", "--set", "data.train_limit=480"]
    result = invoke("teacher", "--config", ROOT / "configs/teacher.toml", *common,
                    "--set", "teacher.train.epochs=1", "--out", tmp_path / "teacher-run", "--quiet")
    assert result.exit_code == 0, result.output
    notes = {"alone": [], "kd_labeled": [], "kd_transfer": ["48 labeled + 432 unlabeled", "16 labeled + 48"],
             "kd_transfer_mixup": ["function matching: mixup alpha 1", "runs live"]}
    for name, expected in notes.items():
        out = tmp_path / name
        result = invoke("distill", "--config", ROOT / f"configs/transfer/{name}.toml", *common,
                        "--set", "train.epochs=1", "--out", out, "--quiet")
        assert result.exit_code == 0, (name, result.output)
        for text in expected:
            assert text in result.output, (name, text)
        summary = json.loads((out / "summary.json").read_text())
        assert 0.0 <= summary["student_test_acc"] <= 1.0
        metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert 0.0 <= metrics["train_acc"] <= 1.0
    result = invoke("sweep", "--config", ROOT / "configs/transfer/kd_transfer_mixup.toml", *common,
                    "--set", "train.epochs=1", "--seeds", "2", "--out", tmp_path / "sweep", "--quiet")
    assert result.exit_code == 0, result.output
    assert "function matching" in result.output


def test_student_configs_never_fit_their_own_teacher(tmp_path):
    for name in ("kd_labeled", "kd_transfer", "kd_transfer_mixup"):
        cfg = load_config(ROOT / f"configs/transfer/{name}.toml")
        assert cfg.teacher.fit_if_missing is False
        assert cfg.teacher.checkpoint == load_config(ROOT / "configs/teacher.toml").teacher.checkpoint
        assert cfg.data.label_fraction == 0.1
    teacher = load_config(ROOT / "configs/teacher.toml").data  # fitted on every training label
    assert (teacher.name, teacher.label_fraction, teacher.transfer) == ("digits", 1.0, "none")
