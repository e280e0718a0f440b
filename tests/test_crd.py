"""CRD: the NCE loss against a float64 loop written here, its memory banks, purity, vmap, and the term."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fkd import prng
from fkd.errors import ConfigError
from fkd.losses import contrastive, crd
from fkd.objective import build
from fkd.terms import Shapes, TermInputs

N, B, D, K = 40, 6, 8, 12


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _reference(v_s, v_t, m_s, m_t, contrast, z_s, z_t, T):
    """Tian et al.'s NCE by explicit loops over examples and contrast rows (RepDistiller's formulation)."""
    n, k = m_s.shape[0], contrast.shape[1] - 1
    noise = k / n

    def side(v, memory, z):
        scores = [[math.exp(float(memory[contrast[b, j]] @ v[b]) / T) for j in range(k + 1)] for b in range(len(v))]
        if z < 0:
            z = sum(map(sum, scores)) / (len(v) * (k + 1)) * n
        total = 0.0
        for row in scores:
            p = [x / z for x in row]
            total += math.log(p[0] / (p[0] + noise + 1e-7))
            total += sum(math.log(noise / (x + noise + 1e-7)) for x in p[1:])
        return -total / len(v), z

    loss_s, z_s = side(v_s, m_t, z_s)
    loss_t, z_t = side(v_t, m_s, z_t)
    return loss_s + loss_t, z_s, z_t


def _inputs():
    v_s, v_t = _unit(B, D, seed=1), _unit(B, D, seed=2)
    m_s, m_t = _unit(N, D, seed=3), _unit(N, D, seed=4)
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(5))[:B]
    contrast = torch.cat([idx[:, None], prng.randint(prng.key_from_seed(0), (B, K), N)], dim=1)
    return v_s, v_t, m_s, m_t, idx, contrast


@pytest.mark.parametrize("z", [-1.0, 300.0])
def test_crd_matches_a_float64_loop(z):
    v_s, v_t, m_s, m_t, _, contrast = _inputs()
    zt = torch.tensor(z, dtype=torch.float64)
    loss, z_s, z_t = crd(v_s, v_t, m_s, m_t, contrast, zt, zt, temperature=0.5)
    want, want_zs, want_zt = _reference(v_s, v_t, m_s, m_t, contrast, z, z, 0.5)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(want, rel=1e-9)
    assert z_s.item() == pytest.approx(want_zs, rel=1e-9) and z_t.item() == pytest.approx(want_zt, rel=1e-9)


def test_crd_gradient_and_purity():
    v_s, v_t, m_s, m_t, _, contrast = _inputs()
    z = torch.tensor(200.0, dtype=torch.float64)
    before = [t.clone() for t in (v_s, v_t, m_s, m_t, contrast)]
    assert torch.autograd.gradcheck(
        lambda a, b: crd(a, b, m_s, m_t, contrast, z, z, temperature=0.5)[0],
        (v_s.clone().requires_grad_(), v_t.clone().requires_grad_()))
    for old, new in zip(before, (v_s, v_t, m_s, m_t, contrast)):
        assert torch.equal(old, new)


def test_memory_update_is_out_of_place_and_normalised():
    _, v_t, _, m_t, idx, _ = _inputs()
    before = m_t.clone()
    new = contrastive.momentum_update(m_t, idx, v_t, 0.5)
    assert torch.equal(m_t, before)
    want = F.normalize(0.5 * before[idx] + 0.5 * v_t, dim=1)
    assert torch.allclose(new[idx], want)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(new[untouched], before[untouched])
    assert torch.allclose(new.norm(dim=1)[idx], torch.ones(B, dtype=torch.float64))


def test_crd_vmaps_over_students():
    v_s, v_t, m_s, m_t, _, contrast = _inputs()
    z = torch.tensor(-1.0, dtype=torch.float64)
    stacked = torch.stack([v_s, _unit(B, D, seed=9), _unit(B, D, seed=10)])
    batched = torch.func.vmap(lambda v: crd(v, v_t, m_s, m_t, contrast, z, z)[0])(stacked)
    looped = torch.stack([crd(v, v_t, m_s, m_t, contrast, z, z)[0] for v in stacked])
    assert torch.allclose(batched, looped)


def _term_inputs(idx, key, s_dim=16, t_dim=32):
    g = torch.Generator().manual_seed(0)
    return TermInputs(torch.randn(len(idx), 10, generator=g), {"embedding": torch.randn(len(idx), s_dim, generator=g)},
                      torch.zeros(len(idx), dtype=torch.int64), None,
                      {"embedding": torch.randn(len(idx), t_dim, generator=g)}, idx, key)


def test_crd_term_state_and_key():
    objective = build({"crd": {"weight": 0.8, "nce_k": 30}})
    shapes = Shapes({"embedding": (16,)}, {"embedding": (32,)}, 10, N)
    params, state = objective.init(shapes)
    assert params["crd"]["student_head"]["weight"].shape == (128, 16)
    assert params["crd"]["teacher_head"]["weight"].shape == (128, 32)
    assert state["crd"]["memory_student"].shape == (N, 128) and state["crd"]["z_student"].item() < 0
    idx = torch.arange(4)
    inputs = _term_inputs(idx, torch.tensor(3))
    loss, _, new = objective(params, state, inputs)
    assert torch.isfinite(loss)
    assert new["crd"]["z_student"].item() > 0  # fixed at the first step ...
    _, _, newer = objective(params, new, inputs)
    assert newer["crd"]["z_student"] == new["crd"]["z_student"]  # ... and kept
    rows_changed = (new["crd"]["memory_student"] != state["crd"]["memory_student"]).any(dim=1)
    assert rows_changed.tolist() == [i < 4 for i in range(N)]  # only the batch's rows move
    other_key = objective(params, state, _term_inputs(idx, torch.tensor(4)))[0]
    assert other_key != loss  # negatives follow the step's key
    assert objective(params, state, inputs)[0] == loss  # and only the key


def test_crd_term_caps_negatives_and_checks_examples():
    objective = build({"crd": {"weight": 1.0}})  # nce_k 16384 > N - 1
    params, state = objective.init(Shapes({"embedding": (16,)}, {"embedding": (32,)}, 10, N))
    assert torch.isfinite(objective(params, state, _term_inputs(torch.arange(4), torch.tensor(0)))[0])
    with pytest.raises(ConfigError, match="at least 2 training examples"):
        objective.init(Shapes({"embedding": (16,)}, {"embedding": (32,)}, 10, 1))
    with pytest.raises(ConfigError, match="distill.terms.crd.momentum"):
        build({"crd": {"momentum": 1.0}})
    with pytest.raises(ConfigError, match="student_feature"):
        build({"crd": {}}).init(Shapes({"block1": (4, 2, 2)}, {"embedding": (32,)}, 10, N))


def test_crd_run_resumes_bit_exactly_with_its_memory_banks(tiny_config, tmp_path, monkeypatch):
    """A distill run with CRD stopped mid-epoch and resumed equals an uninterrupted one: heads, memory
    banks and normalisers are part of the checkpoint, and the negatives follow the step's key."""
    from tests.test_cli import _final_params, _interrupt_after, invoke

    from fkd.checkpoint import load_checkpoint

    extra = "[distill.terms.ce]\nweight = 1.0\n[distill.terms.crd]\nweight = 0.1\nnce_k = 32\nfeat_dim = 8\n"
    cfg = tiny_config("terms", extra)
    full = tmp_path / "full"
    assert invoke("distill", "--config", cfg, "--out", full, "--quiet").exit_code == 0
    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        _interrupt_after(m, 8)  # 6 steps per epoch: mid-way through epoch 2
        assert invoke("distill", "--config", cfg, "--out", cut, "--quiet").exit_code != 0
    resumed = invoke("distill", "--config", cfg, "--out", cut, "--quiet", "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = _final_params(full), _final_params(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    banks = [load_checkpoint(run / "checkpoints" / "latest.pt", "student_run")["state"]["objective"]["crd"]
             for run in (full, cut)]
    for name in ("memory_student", "memory_teacher", "z_student", "z_teacher"):
        assert torch.equal(banks[0][name], banks[1][name]), name
