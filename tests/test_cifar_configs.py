"""configs/cifar100/: the CIFAR-100 benchmark grid (two teacher -> student pairs x 22 methods and the student alone,
two teachers).

The real runs need the CIFAR-100 download and a GPU. Here every config loads, keeps the benchmark protocol,
preflights against the real architectures, and takes one training step on a stand-in CIFAR-100 folder
written in torchvision's format (a few random images; no network).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision.datasets

from fkd.build import load_config
from fkd.config_files import read_config_file
from fkd.data import load_data
from fkd.data.strong import strong_view_for
from fkd.data.transforms import augments, normalize
from fkd.distill_setup import preflight
from fkd.loop import steps_per_epoch
from fkd.models.from_config import build_teacher
from fkd.objective import from_weights
from fkd.run_setup import build_training
from fkd.terms import TERMS
from tests.test_data import write_cifar

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "configs" / "cifar100"
PAIRS = {"resnet32x4": "resnet8x4", "wrn_40_2": "wrn_16_2"}
METHODS = ("baseline", "kd", "fitnets", "at", "sp", "rkd", "pkt", "crd", "dkd", "dist",
           "reviewkd", "fsp", "ab", "ofd", "srrl", "kdsvd",  # issue 20: the feature methods
           "skd", "mlkd", "ctkd", "tf_kd", "pad", "ickd", "ft")
TEACHER_FREE = ("baseline", "tf_kd")  # no teacher network: tf_kd's virtual teacher is built from the label
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in FOLDER.rglob("[!_]*.toml"))  # not the _base.toml files
TEACHERS = [c for c in CONFIGS if Path(c).name.startswith("teacher_")]
STUDENTS = [c for c in CONFIGS if c not in TEACHERS]
BATCH = 4

pytestmark = pytest.mark.usefixtures("one_thread")


def load(name: str, *overrides: str):
    """The config ``name``; a term it names that fkd does not register yet fails with that term's name."""
    raw = read_config_file(ROOT / name)
    missing = sorted(set(raw.get("distill", {}).get("terms", {})) - set(TERMS.names()))
    if missing:
        pytest.fail(f"{name} uses loss term(s) {', '.join(missing)}, not registered in fkd.terms "
                    f"(registered: {', '.join(TERMS.names())})")
    return load_config(ROOT / name, list(overrides))


@pytest.fixture(scope="module")
def standin_root(tmp_path_factory):
    """A CIFAR-100 folder in torchvision's format: 10 training and 4 test images, md5 checks skipped."""
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar(root, hundred=True, per_file=2, n_test=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
        mp.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
        yield root


def on_standin(name: str, root: Path):
    return load(name, f'data.root="{root}"', "data.download=false", f"data.batch_size={BATCH}",
                f"data.eval_batch_size={BATCH}", "data.num_workers=0")


# --- the grid and its protocol --------------------------------------------------------------------------


def test_the_grid_is_complete():
    expected = {f"teacher_{t}.toml" for t in PAIRS} | {f"{t}_{s}/{m}.toml" for t, s in PAIRS.items() for m in METHODS}
    assert {Path(c).relative_to("configs/cifar100").as_posix() for c in CONFIGS} == expected


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_keeps_the_benchmark_protocol(name):
    cfg = load(name)
    d = cfg.data
    assert (d.name, d.image_size, d.crop, d.pad, d.flip, d.normalize, d.batch_size) == (
        "cifar100", 32, "random", 4, True, "cifar100", 64)
    train = cfg.teacher.train if name in TEACHERS else cfg.train
    opt = train.optimizer
    assert (train.epochs, opt.name, opt.learning_rate, opt.momentum, opt.weight_decay) == (240, "sgd", 0.05, 0.9, 5e-4)
    assert (opt.schedule, opt.milestones, opt.gamma) == ("multistep", [150, 180, 210], 0.1)
    teacher = cfg.teacher.arch
    assert cfg.teacher.checkpoint == f"runs/cifar100-teacher-{teacher}/teacher.pt"  # what its teacher config writes
    if name in TEACHERS:
        assert Path(name).name == f"teacher_{teacher}.toml" and cfg.teacher.mode == "scratch"
    else:
        assert Path(name).parent.name == f"{teacher}_{cfg.student.arch}" and PAIRS[teacher] == cfg.student.arch
        assert cfg.distill.method == "terms"
        assert cfg.distill.terms["ce"]["weight"] > 0  # every method keeps the labels' cross-entropy


def test_the_published_weights():
    def terms(pair, method):
        return load(f"configs/cifar100/{pair}/{method}.toml").distill.terms

    for pair in ("resnet32x4_resnet8x4", "wrn_40_2_wrn_16_2"):
        assert terms(pair, "kd") == {"ce": {"weight": 0.1}, "logit": {"weight": 0.9, "temperature": 4.0}}
        assert terms(pair, "fitnets")["feature"]["weight"] == 100.0
        assert terms(pair, "at")["attention"] == {"weight": 1000.0, "p": 2.0}
        assert terms(pair, "sp")["sp"]["weight"] == 3000.0
        assert terms(pair, "pkt")["pkt"]["weight"] == 30000.0
        assert terms(pair, "crd")["crd"]["weight"] == 0.8
        assert terms(pair, "dist")["dist"] == {"weight": 2.0, "beta": 1.0, "gamma": 1.0, "temperature": 4.0}
        assert terms(pair, "mlkd") == {"ce": {"weight": 0.1}, "mlkd": {"weight": 0.9, "temperature": 4.0},
                                       "ce_strong": {"weight": 0.1}}
        assert terms(pair, "ctkd")["ctkd"]["weight"] == 0.9 and terms(pair, "ctkd")["ce"]["weight"] == 0.1
        assert terms(pair, "tf_kd") == {"ce": {"weight": 0.9}, "tf_kd": {"weight": 10.0, "temperature": 20.0,
                                                                           "correct_prob": 0.99}}
        assert terms(pair, "pad")["pad"]["weight"] == 1.0
        assert terms(pair, "ickd")["ickd"]["weight"] == 2.5
        assert terms(pair, "ft")["ft"] == {"weight": 500.0, "rate": 0.5, "pretrain_epochs": 6}
    # SKD's authors: ce 0.5 / kd 0.5 for resnet32x4 -> resnet8x4, their defaults 0.1 / 0.9 otherwise
    assert terms("resnet32x4_resnet8x4", "skd")["skd"]["weight"] == 0.5
    assert terms("wrn_40_2_wrn_16_2", "skd")["skd"]["weight"] == 0.9
    # mdistiller: BETA 8 by default, 6 in its wrn40_2 -> wrn_16_2 config
    assert terms("resnet32x4_resnet8x4", "dkd")["dkd"]["beta"] == 8.0
    assert terms("wrn_40_2_wrn_16_2", "dkd")["dkd"]["beta"] == 6.0


def test_cifar100_normalisation_uses_its_channel_statistics():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean = torch.tensor([0.5071, 0.4867, 0.4408]).view(3, 1, 1)
    std = torch.tensor([0.2675, 0.2565, 0.2761]).view(3, 1, 1)
    torch.testing.assert_close(normalize(x, "cifar100"), (x.float() / 255 - mean) / std)


# --- one step on stand-in data --------------------------------------------------------------------------


def one_step(model, objective, train_cfg, cfg, data, params, buffers, teacher_vars=None, **kwargs):
    training = build_training(model, objective, train_cfg, params=params, buffers=buffers,
                              steps_per_epoch=steps_per_epoch(len(data.train), BATCH), batch_size=BATCH,
                              seed=cfg.seed, augment=augments(cfg.data), device=torch.device("cpu"),
                              strong_view=strong_view_for(cfg.data, objective), **kwargs)
    x, y, idx = next(data.train.batches(BATCH, shuffle=True, seed=cfg.seed, augment=True))
    assert x.shape == (BATCH, 3, 32, 32)
    state, metrics = training.step(training.state, {"x": x, "y": y, "idx": idx},
                                   *(() if teacher_vars is None else (teacher_vars,)))
    assert bool(metrics["finite"]) and int(state["step"]) == 1
    for name in objective.weights:
        assert torch.isfinite(metrics[name]), name
    moved = [k for k, v in state["params"]["model"].items() if not torch.equal(v, training.state["params"]["model"][k])]
    assert moved, "one step changed no weight"
    return metrics


@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_config_takes_a_step_on_standin_data(name, standin_root):
    cfg = on_standin(name, standin_root)
    data = load_data(cfg.data)
    assert data.num_classes == 100
    model, params, buffers = build_teacher(cfg, data.num_classes)
    one_step(model, from_weights({"ce": 1.0}), cfg.teacher.train, cfg, data, params, buffers)


@pytest.mark.parametrize("name", STUDENTS)
def test_student_config_preflights_and_takes_a_step_on_standin_data(name, standin_root):
    cfg = on_standin(name, standin_root)
    data = load_data(cfg.data)
    pre = preflight(cfg, data.num_classes, len(data.train), "cpu")  # every term checked against the real shapes
    obj = pre.objective
    objective_params, objective_state = obj.init(pre.shapes, seed=cfg.seed)
    teacher = teacher_vars = None
    if obj.needs_teacher:  # random weights: a fitted teacher would change the numbers, not the step
        teacher, t_params, t_buffers = build_teacher(cfg, data.num_classes, obj.teacher_feature_names,
                                                     seed=cfg.seed + 1)
        teacher_vars = {"params": t_params, "buffers": t_buffers}
    assert obj.needs_teacher == (Path(name).stem not in TEACHER_FREE)
    metrics = one_step(pre.student, obj, cfg.train, cfg, data, pre.params, pre.buffers, teacher=teacher,
                       objective_params=objective_params, objective_state=objective_state, teacher_vars=teacher_vars)
    assert set(obj.weights) == set(cfg.distill.terms) and set(obj.weights) <= set(metrics)


# --- CUDA: the compiled step (compile = "auto" compiles on CUDA) -------------------------------------------


def first_step_metrics(name: str, root: Path, device: str, compile: str) -> dict:
    """The metrics of the first training step of config ``name`` on the stand-in data, on ``device``."""
    cfg = on_standin(name, root)
    data = load_data(cfg.data, device=device)
    pre = preflight(cfg, data.num_classes, len(data.train), device)
    obj = pre.objective
    objective_params, objective_state = obj.init(pre.shapes, seed=cfg.seed, device=device)
    teacher, t_params, t_buffers = build_teacher(cfg, data.num_classes, obj.teacher_feature_names, seed=cfg.seed + 1,
                                                 device=device)
    training = build_training(pre.student, obj, cfg.train, params=pre.params, buffers=pre.buffers,
                              objective_params=objective_params, objective_state=objective_state, teacher=teacher,
                              steps_per_epoch=steps_per_epoch(len(data.train), BATCH), batch_size=BATCH,
                              seed=cfg.seed, augment=augments(cfg.data), device=torch.device(device), compile=compile,
                              strong_view=strong_view_for(cfg.data, obj))
    x, y, idx = next(data.train.batches(BATCH, shuffle=True, seed=cfg.seed, augment=True))
    _, metrics = training.step(training.state, {"x": x, "y": y, "idx": idx}, {"params": t_params, "buffers": t_buffers})
    return {k: v.float().cpu() for k, v in metrics.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["configs/cifar100/resnet32x4_resnet8x4/kd.toml",
                                  "configs/cifar100/wrn_40_2_wrn_16_2/crd.toml"])
def test_compiled_cuda_step_matches_the_eager_one(name, standin_root):
    eager = first_step_metrics(name, standin_root, "cuda", "off")
    compiled = first_step_metrics(name, standin_root, "cuda", "on")
    assert bool(compiled["finite"])
    for k in ("loss", *load(name).distill.terms):
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-4, msg=k)
