"""timm models (``timm:<name>``), token features, DeiT's hard-label distillation and distilled students,
and timm's pretrained weights from the local cache only. Tiny timm models with random weights, digits,
a few steps; nothing is downloaded."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from fkd import cli, losses
from fkd.errors import ConfigError
from fkd.terms import Shapes, TERMS
from tests.conftest import tiny_config_text

timm = pytest.importorskip("timm", reason="the [timm] extra (pip install -e '.[timm]') is not installed")

from fkd.models import build_model  # noqa: E402
from fkd.models.functional import feature_shapes  # noqa: E402

#: A ViT small enough for a CPU test: 16 px images, 4 px patches (16 patch tokens + the class token).
TINY_VIT = {"arch": "timm:vit_tiny_patch16_224", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_DEIT = {**TINY_VIT, "arch": "timm:deit_tiny_distilled_patch16_224"}


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def _options(table: dict) -> dict:
    return {k: v for k, v in table.items() if k != "arch"}


# --- models -------------------------------------------------------------------------------------------


def test_timm_vit_builds_with_keyword_options_and_token_features():
    model, params, buffers = build_model(TINY_VIT["arch"], 10, 16, ("blocks.1", "embedding"), **_options(TINY_VIT),
                                         timm_args={"mlp_ratio": 2.0})
    assert feature_shapes(model, params, buffers, 16, "cpu") == {"blocks.1": (17, 32), "embedding": (32,)}
    assert params["blocks.0.mlp.fc1.weight"].shape == (64, 32)  # mlp_ratio 2 from timm_args
    logits, feats, _ = model.apply(params, buffers, torch.randn(3, 3, 16, 16), train=True)
    assert logits.shape == (3, 10) and feats["blocks.1"].shape == (3, 17, 32)


def test_timm_cnn_takes_no_image_size_and_lists_its_features_on_a_wrong_name():
    model, params, buffers = build_model("timm:resnet10t", 10, 16, ("layer1",))
    assert feature_shapes(model, params, buffers, 16, "cpu")["layer1"][0] == 64
    with pytest.raises(ConfigError, match=r"feature 'layer9' is not a node of ResNet; valid names: .*layer1"):
        build_model("timm:resnet10t", 10, 16, ("layer9",))


def test_a_keyword_the_timm_model_does_not_take_is_one_line():
    with pytest.raises(ConfigError, match="the timm model 'resnet10t' takes no keyword 'patch_size'"):
        build_model("timm:resnet10t", 10, 16, patch_size=4)
    with pytest.raises(ConfigError, match="takes no keyword 'bogus'"):
        build_model(TINY_VIT["arch"], 10, 16, **_options(TINY_VIT), timm_args={"bogus": 1})
    with pytest.raises(ConfigError, match="timm_args sets 'depth'"):
        build_model(TINY_VIT["arch"], 10, 16, **_options(TINY_VIT), timm_args={"depth": 3})


def test_unknown_timm_name_suggests_close_ones(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(tiny_config_text(tmp_path, "none", student={"arch": "timm:vit_tiny_patch16_22"}))
    result = invoke("config", "--config", config)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: student.arch = 'timm:vit_tiny_patch16_22' is not a timm model; did you mean "
        "'timm:vit_tiny_patch16_224' or 'timm:deit_tiny_patch16_224' or 'timm:vit_tiny_patch16_384'?"]


def test_timm_keys_are_checked_and_completed_from_the_config(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(tiny_config_text(tmp_path, "none", student={**TINY_VIT, "widths": None}) +
                      "\n[student.timm_args]\nmlp_ratio = 2.0\n")
    from fkd.build import load_config
    student = load_config(config).student
    assert student.options == {**_options(TINY_VIT), "img_size": 0, "drop_rate": 0.0, "drop_path_rate": 0.0,
                               "timm_args": {"mlp_ratio": 2.0}}
    result = invoke("config", "--config", config, "--set", "student.patch_sise=2")
    assert result.exit_code == 2
    assert result.output.strip() == "error: unknown key 'student.patch_sise' in the config; did you mean 'patch_size'?"
    result = invoke("config", "--config", config, "--set", "student.depth=2.5")
    assert result.exit_code == 2 and "student.depth must be an integer (got 2.5)" in result.output


def test_without_timm_a_timm_name_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    config = tmp_path / "c.toml"
    config.write_text(tiny_config_text(tmp_path, "none", student=TINY_VIT))
    result = invoke("config", "--config", config)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: timm models (timm:<name>) need the timm package")
    assert "pip install 'fkd[timm]'" in lines[0]


def test_nothing_imports_timm_unless_a_timm_model_is_named():
    import subprocess

    code = ("import sys; from fkd.build import load_config, help_text; load_config('configs/feature.toml'); "
            "help_text(); print('timm' in sys.modules, 'huggingface_hub' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["False", "False"]


def test_config_keys_document_the_timm_options():
    result = invoke("config", "--keys")
    assert result.exit_code == 0
    for key in ("student.img_size", "student.patch_size", "student.drop_path_rate", "student.timm_args",
                "teacher.embed_dim", "distill.terms.hard_kd.student_head", "distill.terms.hard_kd.label_smoothing"):
        assert key in result.output, key
    assert "model option of timm:<name>" in result.output


# --- DeiT: two heads ------------------------------------------------------------------------------------


def test_distilled_deit_trains_its_class_head_and_evaluates_the_mean_of_both_heads():
    model, params, buffers = build_model(TINY_DEIT["arch"], 10, 16, ("head_dist",), **_options(TINY_DEIT))
    x = torch.randn(4, 3, 16, 16)
    cls_logits, feats, _ = model.apply(params, buffers, x, train=True)
    eval_logits, eval_feats, _ = model.apply(params, buffers, x, train=False)
    # no dropout, no batch norm: the heads compute the same in both modes
    torch.testing.assert_close(eval_feats["head_dist"], feats["head_dist"])
    torch.testing.assert_close(eval_logits, (cls_logits + feats["head_dist"]) / 2)
    assert not torch.allclose(cls_logits, feats["head_dist"])  # two heads, two answers
    # the class head is timm's head on the class token
    module = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=16,
                               **{k: v for k, v in _options(TINY_DEIT).items()})
    module.load_state_dict({**params, **buffers})
    module.eval().set_distilled_training(True)
    module.train()
    with torch.no_grad():
        head, head_dist = module(x)
    torch.testing.assert_close(cls_logits, head)
    torch.testing.assert_close(feats["head_dist"], head_dist)


def test_student_head_must_name_a_head_of_logits():
    term = TERMS.get("hard_kd")(student_head="blocks.1")
    with pytest.raises(ConfigError, match="student_head = 'blocks.1' must name a student output of 10 logits"):
        term.check(Shapes(student_features={"blocks.1": (17, 32)}, num_classes=10))
    TERMS.get("hard_kd")(student_head="head_dist").check(Shapes(student_features={"head_dist": (10,)}, num_classes=10))


# --- hard_kd ------------------------------------------------------------------------------------------------


def test_hard_label_kd_is_cross_entropy_with_the_teachers_argmax_in_float64():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, generator=g, dtype=torch.float64)
    expected = F.cross_entropy(s, t.argmax(-1))
    torch.testing.assert_close(losses.hard_label_kd(s, t), expected, rtol=1e-12, atol=1e-12)
    smoothed = F.cross_entropy(s, t.argmax(-1), label_smoothing=0.1)
    torch.testing.assert_close(losses.hard_label_kd(s, t, 0.1), smoothed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses.hard_label_kd(s, t, torch.tensor(0.1, dtype=torch.float64)), smoothed)
    # by hand: -log softmax(s)[argmax t]
    by_hand = -(s.log_softmax(-1).gather(1, t.argmax(-1, keepdim=True))).mean()
    torch.testing.assert_close(losses.hard_label_kd(s, t), by_hand, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: losses.hard_label_kd(z, t, 0.2), (s,))
    # the teacher gets no gradient; a leading axis is averaged like the batch
    t_req = t.clone().requires_grad_(True)
    losses.hard_label_kd(s, t_req).backward()
    assert t_req.grad is None
    stacked = losses.hard_label_kd(torch.stack([s, 2 * s]), torch.stack([t, t]))
    torch.testing.assert_close(stacked, (losses.hard_label_kd(s, t) + losses.hard_label_kd(2 * s, t)) / 2)


# --- token features -----------------------------------------------------------------------------------------


def test_map_to_tokens_is_raster_order_and_token_pair_drops_prefix_tokens():
    m = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    tokens = losses.map_to_tokens(m)
    assert tokens.shape == (2, 4, 3)
    torch.testing.assert_close(tokens[0, 1], m[0, :, 0, 1])  # position (0, 1) is token 1
    torch.testing.assert_close(tokens[1, 2], m[1, :, 1, 0])
    vit = torch.randn(2, 5, 7)  # class token + 4 patches
    s, t = losses.token_pair(vit, m)
    torch.testing.assert_close(s, vit[:, 1:])
    torch.testing.assert_close(t, tokens)
    torch.testing.assert_close(losses.pool_tokens(vit), vit.mean(1))
    with pytest.raises(ValueError, match="cannot be matched"):
        losses.token_pair(torch.randn(2, 40, 3), m)


def _shapes(student: tuple, teacher: tuple) -> Shapes:
    return Shapes(student_features={"s": student}, teacher_features={"t": teacher}, num_classes=10)


def test_feature_term_takes_tokens_and_maps_and_refuses_what_does_not_pair():
    feature = TERMS.get("feature")(pairs=(("s", "t"),))
    for student, teacher in (((17, 32), (64, 4, 4)), ((17, 32), (18, 48)), ((64, 4, 4), (17, 32))):
        shapes = _shapes(student, teacher)
        feature.check(shapes)
        params, _ = feature.init(shapes, torch.Generator().manual_seed(0))
        width = lambda shape: shape[-1] if len(shape) == 2 else shape[0]  # noqa: E731
        assert params["s->t"]["weight"].shape == (width(teacher), width(student))
    with pytest.raises(ConfigError, match=r"one is a token sequence, the other a vector"):
        feature.check(_shapes((17, 32), (64,)))
    with pytest.raises(ConfigError, match=r"\(65 tokens\) with teacher feature 't' \(64, 4, 4\) \(16 tokens\)"):
        feature.check(_shapes((65, 32), (64, 4, 4)))


@pytest.mark.parametrize("name", ["attention", "nst", "vid"])
def test_terms_not_defined_on_tokens_refuse_them_in_one_line_naming_the_fix(name):
    term = TERMS.get(name)(pairs=(("s", "t"),))
    with pytest.raises(ConfigError) as err:
        term.check(_shapes((17, 32), (64, 4, 4)))
    message = str(err.value)
    assert "'s' (17, 32), a (N, D) token sequence" in message and "use the feature term" in message
    assert "\n" not in message


def test_fitnets_on_tokens_matches_a_linear_map_of_the_patch_tokens():
    feature = TERMS.get("feature")(pairs=(("s", "t"),))
    shapes = _shapes((5, 3), (2, 2, 2))
    params, _ = feature.init(shapes, torch.Generator().manual_seed(0))
    s, t = torch.randn(4, 5, 3), torch.randn(4, 2, 2, 2)
    from fkd.terms import TermInputs
    loss, _ = feature.apply(params, {}, TermInputs(student_logits=None, student_features={"s": s}, labels=None,
                                                   teacher_logits=None, teacher_features={"t": t}, idx=None,
                                                   key=torch.tensor(0)))
    w, b = params["s->t"]["weight"], params["s->t"]["bias"]
    expected = ((s[:, 1:] @ w.T + b - t.flatten(2).transpose(1, 2)) ** 2).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("name", ["rkd", "pkt", "sp", "cc"])
def test_relation_terms_read_the_mean_token(name):
    term = TERMS.get(name)(student_feature="s", teacher_feature="t")
    tokens, vectors = torch.randn(6, 5, 3), torch.randn(6, 4)
    from fkd.terms import TermInputs
    inputs = lambda s: TermInputs(student_logits=None, student_features={"s": s}, labels=None,  # noqa: E731
                                  teacher_logits=None, teacher_features={"t": vectors}, idx=None, key=torch.tensor(0))
    term.check(_shapes((5, 3), (4,)))
    torch.testing.assert_close(term.apply({}, {}, inputs(tokens))[0], term.apply({}, {}, inputs(tokens.mean(1)))[0])


# --- end to end on digits -------------------------------------------------------------------------------------


def _run_config(root, name: str, *, teacher: dict, student: dict, distill: dict, terms: str) -> str:
    return tiny_config_text(
        root, "terms", extra=terms, dataset="digits", name=name, student=student,
        teacher={"train": {"epochs": 1, "log_every": None}, **teacher},
        data={"batch_size": 32, "eval_batch_size": 180, "train_limit": 64},
        train={"epochs": 1, "log_every": None, "optimizer": {"learning_rate": 2e-3}},
        distill={"method": "terms", **distill})


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """``run(kind) -> run directory``: short digits runs, each made once per module; the torchvision teacher
    (resnet18, fitted in one epoch) is shared."""
    root = tmp_path_factory.mktemp("timm-runs")
    resnet = {"arch": "resnet18", "checkpoint": f"{root.as_posix()}/teacher-resnet18/teacher.pt"}
    configs = {
        # a torchvision teacher -> a timm ViT student: soft targets and FitNets from layer1's map (64, 4, 4)
        # onto the ViT's tokens (17, 32)
        "vit": dict(teacher=resnet, student=TINY_VIT,
                    distill={"student_features": ["blocks.1"], "teacher_features": ["layer1"]},
                    terms="[distill.terms.ce]\nweight = 0.5\n[distill.terms.logit]\nweight = 0.5\n[distill.terms.feature]\nweight = 1.0\n"),
        # the same teacher -> a distilled DeiT: ce on the class token's head, hard_kd on the distillation head
        "deit": dict(teacher=resnet, student=TINY_DEIT, distill={"student_features": [], "teacher_features": []},
                     terms='[distill.terms.ce]\nweight = 0.5\n[distill.terms.hard_kd]\nweight = 0.5\nstudent_head = "head_dist"\n'),
        # a timm teacher (a ViT fitted from scratch) -> an fkd student: logits and RKD on the mean token
        "timm_teacher": dict(
            teacher={**TINY_VIT, "checkpoint": f"{root.as_posix()}/teacher-vit/teacher.pt"},
            student={"arch": "small_cnn", "widths": [8, 16]}, distill={"student_features": [], "teacher_features": []},
            terms='[distill.terms.ce]\n[distill.terms.logit]\n[distill.terms.rkd]\nteacher_feature = "blocks.1"\n'),
    }
    made = {}

    def run(kind: str):
        if kind not in made:
            config = root / f"{kind}.toml"
            config.write_text(_run_config(root, kind, **configs[kind]))
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                result = invoke("distill", "--config", config, "--out", root / kind, "--quiet")
            finally:
                torch.set_num_threads(threads)
            assert result.exit_code == 0, result.output
            made[kind] = root / kind
        return made[kind]

    return run


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def _losses(run_dir) -> dict:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return lines[-1]


def test_torchvision_teacher_teaches_a_vit_student_through_its_tokens(digits_runs):
    run_dir = digits_runs("vit")
    summary = _summary(run_dir)
    assert summary["student_arch"] == "timm:vit_tiny_patch16_224" and 0.0 <= summary["student_test_acc"] <= 1.0
    record = _losses(run_dir)
    assert record["train_feature"] > 0 and record["train_logit"] > 0  # both teacher terms were trained
    from fkd.checkpoint import load_checkpoint
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt", "student_run")["state"]
    assert state["params"]["model"]["blocks.1.attn.qkv.weight"].shape == (96, 32)
    assert state["params"]["objective"]["feature"]["blocks.1->layer1"]["weight"].shape == (64, 32)  # D 32 -> C 64


def test_timm_teacher_teaches_an_fkd_student(digits_runs):
    run_dir = digits_runs("timm_teacher")
    summary = _summary(run_dir)
    assert 0.0 <= summary["student_test_acc"] <= 1.0 and 0.0 <= summary["teacher_test_acc"] <= 1.0
    assert _losses(run_dir)["train_rkd"] >= 0 and _summary(run_dir)["teacher_arch"] == TINY_VIT["arch"]


def test_deit_student_evaluates_with_both_heads_averaged(digits_runs):
    run_dir = digits_runs("deit")
    assert _losses(run_dir)["train_hard_kd"] > 0
    from fkd.export.saved_model import load_saved_model
    saved = load_saved_model(run_dir)
    x = torch.randn(5, 3, 16, 16)
    model, _, _ = build_model(TINY_DEIT["arch"], 10, 16, ("head_dist",), **_options(TINY_DEIT))
    with torch.no_grad():
        head, feats, _ = model.apply(saved.params, saved.buffers, x, train=True)
        averaged, _, _ = saved.model.apply(saved.params, saved.buffers, x, train=False)
    torch.testing.assert_close(averaged, (head + feats["head_dist"]) / 2)
    result = invoke("evaluate", run_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"{100 * _summary(run_dir)['student_test_acc']:.2f}%" in result.output


def test_timm_student_exports_to_onnx_and_verifies(digits_runs, tmp_path, one_thread):
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason="the [export] extra (pip install -e '.[export]') is not installed")
    from fkd.export.exported_file import load_exported
    from fkd.export.saved_model import load_saved_model
    from fkd.export.verify import fkd_logits

    run_dir = digits_runs("deit")
    out = tmp_path / "deit.onnx"
    result = invoke("export", run_dir, "--format", "onnx", "--out", out, "--latency-repeats", "0", "--json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output.splitlines()[-1])
    assert entry["verification"]["max_abs_logit_diff"] <= 1e-4
    run, metadata = load_exported(out, threads=1)
    assert metadata["arch"] == TINY_DEIT["arch"]
    x = torch.rand(3, 3, 16, 16)  # noise, not digits: attention's float error is a little larger than on images
    torch.testing.assert_close(run(x), fkd_logits(load_saved_model(run_dir), x), atol=1e-3, rtol=1e-3)


# --- pretrained weights: the local cache only ------------------------------------------------------------------


def _write_hf_cache(cache, repo: str, state: dict) -> None:
    """A Hugging Face cache entry for ``repo`` holding ``model.safetensors`` (the layout huggingface_hub reads)."""
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))


def test_pretrained_timm_weights_load_from_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    reference = timm.create_model("test_vit", num_classes=1000)
    _write_hf_cache(tmp_path / "hub", "timm/test_vit.r160_in1k", reference.state_dict())
    model, params, _ = build_model("timm:test_vit", 10, 160, weights="pretrained")
    torch.testing.assert_close(params["blocks.0.attn.qkv.weight"], reference.state_dict()["blocks.0.attn.qkv.weight"])
    assert params["head.weight"].shape[0] == 10  # a head of another size: timm leaves the new one fresh


def test_pretrained_timm_weights_missing_from_an_empty_cache_are_one_line_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    config = tmp_path / "t.toml"
    config.write_text(tiny_config_text(
        tmp_path, "none", dataset="digits",
        teacher={"arch": "timm:test_vit", "weights": "pretrained", "mode": "finetune", "widths": None}))
    started = time.monotonic()
    result = invoke("teacher", "--config", config, "--out", tmp_path / "run", "--quiet")
    assert time.monotonic() - started < 60
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: timm's pretrained weights for 'test_vit'")
    assert str(tmp_path / "hf" / "hub") in lines[0] and "HF_HUB_OFFLINE is set" in lines[0]
    assert "weights = 'none'" in lines[0]
