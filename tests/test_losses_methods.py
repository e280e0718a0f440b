"""Tests for the issue-9 losses in fkd.losses (DKD, DIST, LSKD, SP, RKD, PKT, CC, NST, VID).

Each function is checked against an independent float64 computation written here with plain loops over
numpy arrays (from the papers' formulas, not by calling fkd), then for the functional contract: gradients
(``gradcheck``), purity (inputs unchanged), a constant teacher, and ``vmap`` over a leading axis equal
to a Python loop, the gradient included.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import grad, vmap

from fkd import losses
from tests.loss_contracts import assert_pure_and_teacher_constant, assert_vmap_equals_loop, stack_members
from fkd.losses import (
    correlation_congruence,
    dist,
    dkd,
    dkd_per_example,
    init_vid_params,
    logit_standardized_kd,
    nst,
    pkt,
    rkd,
    similarity_preserving,
    vid_nll,
    vid_regressor,
)

F64 = torch.float64


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


# --- independent references ------------------------------------------------------------------------


def ref_dkd(s, t, y, alpha, beta, T):
    """Zhao et al. 2022, eq. 7: binary KL on (target, rest) plus KL over the renormalised non-targets."""
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        if y[b] < 0:
            continue
        p_s, p_t = np_softmax(s[b] / T), np_softmax(t[b] / T)
        k = y[b]
        tckd = np_kl([p_t[k], 1 - p_t[k]], [p_s[k], 1 - p_s[k]])
        rest = [c for c in range(len(p_s)) if c != k]
        q_s = p_s[rest] / p_s[rest].sum()
        q_t = p_t[rest] / p_t[rest].sum()
        total += T**2 * (alpha * tckd + beta * np_kl(q_t, q_s))
        n += 1
    return total / max(n, 1)


def ref_dist(s, t, beta, gamma, T):
    y_s = np.stack([np_softmax(r / T) for r in s])
    y_t = np.stack([np_softmax(r / T) for r in t])
    inter = 1 - np.mean([np.corrcoef(y_s[b], y_t[b])[0, 1] for b in range(y_s.shape[0])])
    intra = 1 - np.mean([np.corrcoef(y_s[:, c], y_t[:, c])[0, 1] for c in range(y_s.shape[1])])
    return T**2 * (beta * inter + gamma * intra)


def ref_lskd(s, t, T):
    total = 0.0
    for b in range(s.shape[0]):
        zs = (s[b] - s[b].mean()) / (1e-7 + s[b].std(ddof=1))
        zt = (t[b] - t[b].mean()) / (1e-7 + t[b].std(ddof=1))
        total += np_kl(np_softmax(zt / T), np_softmax(zs / T))
    return T**2 * total / s.shape[0]


def ref_sp(s, t):
    def rows(z):
        g = z @ z.T
        return np.stack([r / np.sqrt((r**2).sum()) for r in g])

    b = s.shape[0]
    return ((rows(s.reshape(b, -1)) - rows(t.reshape(b, -1))) ** 2).sum() / b**2


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def ref_rkd(s, t, wd, wa):
    b = s.shape[0]

    def dist_mat(z):
        d = np.array([[np.linalg.norm(z[i] - z[j]) if i != j else 0.0 for j in range(b)] for i in range(b)])
        return d / (d.sum() / (b * (b - 1)))

    def angle(z, i, j, k):
        u, v = z[j] - z[i], z[k] - z[i]
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        return 0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv))

    ds, dt = dist_mat(s), dist_mat(t)
    loss_d = np.mean([huber(ds[i, j] - dt[i, j]) for i in range(b) for j in range(b)])
    loss_a = np.mean([huber(angle(s, i, j, k) - angle(t, i, j, k))
                      for i in range(b) for j in range(b) for k in range(b)])
    return wd * loss_d + wa * loss_a


def ref_pkt(s, t, eps=1e-7):
    def probs(z):
        b = z.shape[0]
        k = np.array([[(1 + z[i] @ z[j] / ((np.linalg.norm(z[i]) + eps) * (np.linalg.norm(z[j]) + eps))) / 2
                       for j in range(b)] for i in range(b)])
        return k / k.sum(axis=1, keepdims=True)

    p_s, p_t = probs(s), probs(t)
    b = s.shape[0]
    return np.mean([p_t[i, j] * math.log((p_t[i, j] + eps) / (p_s[i, j] + eps)) for i in range(b) for j in range(b)])


def ref_cc(s, t, gamma, order):
    def corr(z):
        b = z.shape[0]
        return np.array([[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * float(z[i] @ z[j]) ** p
                              for p in range(order + 1)) for j in range(b)] for i in range(b)])

    return math.sqrt(((corr(s) - corr(t)) ** 2).sum()) / s.shape[0] ** 2


def block_mean(f, size):
    """Average-pool (B, C, H, W) by whole blocks to (B, C, size, size)."""
    b, c, h, w = f.shape
    return f.reshape(b, c, size, h // size, size, w // size).mean(axis=(3, 5))


def ref_nst(s, t):
    size = min(s.shape[2], t.shape[2])
    s, t = block_mean(s, size), block_mean(t, size)

    def unit(f):
        v = f.reshape(f.shape[0], f.shape[1], -1)
        return v / np.sqrt((v**2).sum(axis=2, keepdims=True))

    s, t = unit(s), unit(t)

    def k(a, c):
        return np.mean([float(a[n, i] @ c[n, j]) ** 2 for n in range(a.shape[0])
                        for i in range(a.shape[1]) for j in range(c.shape[1])])

    return k(t, t) + k(s, s) - 2 * k(s, t)


def ref_vid(mu, t, log_scale, eps):
    total, count = 0.0, 0
    for idx in np.ndindex(*mu.shape):
        var = math.log1p(math.exp(log_scale[idx[1]])) + eps
        total += 0.5 * ((mu[idx] - t[idx]) ** 2 / var + math.log(var))
        count += 1
    return total / count


# --- values against the references ------------------------------------------------------------------


def logits(b=6, k=5, seed=0):
    return randn(b, k, seed=seed, scale=2.0), randn(b, k, seed=seed + 1, scale=3.0)


@pytest.mark.parametrize("alpha, beta, T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_reference(alpha, beta, T):
    s, t = logits()
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    got = dkd(s, t, y, alpha, beta, T)
    assert got.shape == ()
    assert got.item() == pytest.approx(ref_dkd(s.numpy(), t.numpy(), y.numpy(), alpha, beta, T), rel=1e-9)


def test_dkd_unlabeled_examples_are_left_out():
    s, t = logits()
    y = torch.tensor([0, -1, 2, -1, 1, 3])
    keep = y >= 0
    assert dkd(s, t, y).item() == pytest.approx(dkd(s[keep], t[keep], y[keep]).item(), rel=1e-12)
    assert dkd(s, t, y).item() == pytest.approx(ref_dkd(s.numpy(), t.numpy(), y.numpy(), 1.0, 8.0, 4.0), rel=1e-9)
    per = dkd_per_example(s, t, y)
    assert per.shape == (6,) and torch.all(per[~keep] == 0) and torch.all(per[keep] > 0)
    # No labeled example: 0 (not nan), and a zero gradient.
    none = torch.full((6,), -1)
    s_req = s.clone().requires_grad_()
    loss = dkd(s_req, t, none)
    loss.backward()
    assert loss.item() == 0 and torch.all(s_req.grad == 0)


def test_dist_matches_reference():
    s, t = logits(b=7, k=6)
    for beta, gamma, T in [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)]:
        assert dist(s, t, beta, gamma, T).item() == pytest.approx(ref_dist(s.numpy(), t.numpy(), beta, gamma, T),
                                                                  rel=1e-6)


def test_logit_standardized_kd_matches_reference_and_ignores_logit_scale():
    s, t = logits()
    for T in (1.0, 2.0):
        assert logit_standardized_kd(s, t, T).item() == pytest.approx(ref_lskd(s.numpy(), t.numpy(), T), rel=1e-9)
    # The z-score removes each row's shift and scale (up to the 1e-7 floor).
    assert logit_standardized_kd(3 * s + 1, t, 2.0).item() == pytest.approx(
        logit_standardized_kd(s, t, 2.0).item(), rel=1e-6)


def test_similarity_preserving_matches_reference_and_flattens_maps():
    s, t = randn(5, 3, 2, 2, seed=2), randn(5, 7, seed=3)
    assert similarity_preserving(s, t).item() == pytest.approx(ref_sp(s.numpy(), t.numpy()), rel=1e-9)


def test_rkd_matches_reference():
    s, t = randn(5, 4, seed=4), randn(5, 6, seed=5, scale=2.0)
    for wd, wa in [(25.0, 50.0), (1.0, 0.0)]:
        assert rkd(s, t, wd, wa).item() == pytest.approx(ref_rkd(s.numpy(), t.numpy(), wd, wa), rel=1e-9)


def test_pkt_matches_reference():
    s, t = randn(6, 4, seed=6), randn(6, 8, seed=7)
    assert pkt(s, t).item() == pytest.approx(ref_pkt(s.numpy(), t.numpy()), rel=1e-9)


@pytest.mark.parametrize("gamma, order", [(0.4, 2), (1.0, 0), (0.3, 4)])
def test_correlation_congruence_matches_reference(gamma, order):
    s, t = randn(5, 3, seed=8, scale=0.5), randn(5, 4, seed=9, scale=0.5)
    got = correlation_congruence(s, t, gamma, order)
    assert got.item() == pytest.approx(ref_cc(s.numpy(), t.numpy(), gamma, order), rel=1e-9, abs=1e-15)


def test_correlation_congruence_approximates_the_gaussian_kernel_for_unit_vectors():
    s = torch.nn.functional.normalize(randn(4, 3, seed=10), dim=1)
    t = torch.nn.functional.normalize(randn(4, 3, seed=11), dim=1)
    gamma = 0.4
    exact = torch.linalg.vector_norm(torch.exp(-gamma * torch.cdist(s, s) ** 2)
                                     - torch.exp(-gamma * torch.cdist(t, t) ** 2)) / 16
    assert correlation_congruence(s, t, gamma, order=12).item() == pytest.approx(exact.item(), rel=1e-6)


@pytest.mark.parametrize("s_hw, t_hw", [(4, 4), (8, 4), (2, 4)])
def test_nst_matches_reference(s_hw, t_hw):
    s, t = randn(3, 4, s_hw, s_hw, seed=12), randn(3, 5, t_hw, t_hw, seed=13)
    got = nst(s, t)
    assert got.item() == pytest.approx(ref_nst(s.numpy(), t.numpy()), rel=1e-9)
    assert got.item() >= 0
    assert nst(s, s).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(3, 4, 2, 2), (3, 4)])
def test_vid_nll_matches_reference(shape):
    mu, t = randn(*shape, seed=14), randn(*shape, seed=15)
    log_scale = randn(shape[1], seed=16)
    assert vid_nll(mu, t, log_scale).item() == pytest.approx(
        ref_vid(mu.numpy(), t.numpy(), log_scale.numpy(), 1e-5), rel=1e-9)


def test_vid_params_and_regressor():
    p = init_vid_params(3, 5, generator=torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in p.items()} == {"w1": (5, 3), "w2": (5, 5), "w3": (5, 5), "log_scale": (5,)}
    assert torch.allclose(torch.nn.functional.softplus(p["log_scale"]) + 1e-5, torch.full((5,), 5.0))
    assert p["w1"].abs().max() <= 1 / math.sqrt(3) and p["w2"].abs().max() <= 1 / math.sqrt(5)
    again = init_vid_params(3, 5, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(p[k], again[k]) for k in p)  # from the generator only
    x = randn(2, 3, 4, 4, seed=17).float()
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 1, bias=False), torch.nn.ReLU(),
                               torch.nn.Conv2d(5, 5, 1, bias=False), torch.nn.ReLU(),
                               torch.nn.Conv2d(5, 5, 1, bias=False))
    for layer, key in zip(conv[::2], ("w1", "w2", "w3")):
        layer.weight.data.copy_(p[key][:, :, None, None])
    assert torch.allclose(vid_regressor(x, p), conv(x), atol=1e-6)


# --- the functional contract -------------------------------------------------------------------------

LABELS = torch.tensor([1, -1, 0, 2])


def _maps(seed):
    return randn(3, 2, 4, 4, seed=seed), randn(3, 3, 2, 2, seed=seed + 1)


#: name -> (fn(student, teacher), student, teacher); student tensors are what gradients flow into.
CASES = {
    "dkd": (lambda s, t: dkd(s, t, LABELS, 1.0, 8.0, 4.0), randn(4, 3, seed=20), randn(4, 3, seed=21)),
    "dist": (lambda s, t: dist(s, t, 1.0, 2.0, 2.0), randn(4, 3, seed=22), randn(4, 3, seed=23)),
    "lskd": (lambda s, t: logit_standardized_kd(s, t, 2.0), randn(4, 3, seed=24), randn(4, 3, seed=25)),
    "sp": (similarity_preserving, randn(4, 3, seed=26), randn(4, 5, seed=27)),
    "rkd": (rkd, randn(4, 3, seed=28), randn(4, 5, seed=29)),
    "pkt": (pkt, randn(4, 3, seed=30), randn(4, 5, seed=31)),
    "cc": (correlation_congruence, randn(4, 3, seed=32, scale=0.5), randn(4, 5, seed=33, scale=0.5)),
    "nst": (nst, *_maps(34)),
    "vid": (lambda mu, t: vid_nll(mu, t, torch.linspace(-1.0, 1.0, 3, dtype=F64)),
            randn(4, 3, 2, 2, seed=36), randn(4, 3, 2, 2, seed=37)),
}


@pytest.mark.parametrize("name", CASES)
def test_gradcheck(name):
    fn, s, t = CASES[name]
    s = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (s,))


def test_vid_gradcheck_in_log_scale_and_mean():
    mu, t, a = randn(2, 3, 2, 2, seed=38), randn(2, 3, 2, 2, seed=39), randn(3, seed=40)
    assert torch.autograd.gradcheck(lambda m, s: vid_nll(m, t, s), (mu.requires_grad_(), a.requires_grad_()))


def test_correlation_congruence_gradient_is_finite_at_zero_distance():
    s = randn(4, 3, seed=41).requires_grad_()
    loss = correlation_congruence(s, s.detach())
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", CASES)
def test_pure_and_teacher_constant(name):
    assert_pure_and_teacher_constant(*CASES[name], LABELS)


@pytest.mark.parametrize("name", CASES)
def test_vmap_over_a_leading_axis_equals_a_loop(name):
    assert_vmap_equals_loop(*CASES[name], grads=True)


def test_vmap_gradient_equals_autograd_gradient():
    # grad under vmap (the sweep's step) equals the eager autograd gradient, member by member.
    for name in ("dkd", "rkd", "nst"):
        fn, s, t = CASES[name]
        students = stack_members(s)
        batched = vmap(grad(fn), in_dims=(0, None))(students, t)
        for a, g in zip(students, batched):
            a = a.clone().requires_grad_()
            fn(a, t).backward()
            assert torch.allclose(a.grad, g), name


def test_dkd_vmap_with_per_member_labels():
    s, t = randn(4, 3, seed=42), randn(4, 3, seed=43)
    labels = torch.tensor([[0, 1, 2, -1], [-1, -1, 0, 0], [2, 2, 2, 2]])
    students = stack_members(s)
    batched = vmap(dkd, in_dims=(0, None, 0))(students, t, labels)
    assert torch.allclose(batched, torch.stack([dkd(a, t, y) for a, y in zip(students, labels)]))


def test_leading_axes_average_like_the_batch():
    s, t = randn(2, 4, 3, seed=44), randn(2, 4, 3, seed=45)
    y = torch.tensor([[0, 1, 2, 0], [1, 1, 0, 2]])
    assert torch.allclose(dkd(s, t, y), (dkd(s[0], t[0], y[0]) + dkd(s[1], t[1], y[1])) / 2)
    assert torch.allclose(logit_standardized_kd(s, t, 2.0),
                          (logit_standardized_kd(s[0], t[0], 2.0) + logit_standardized_kd(s[1], t[1], 2.0)) / 2)


def test_zero_for_identical_inputs():
    s = randn(5, 4, seed=46)
    y = torch.tensor([0, 1, 2, 3, 0])
    for value in (dkd(s, s, y), logit_standardized_kd(s, s, 2.0), similarity_preserving(s, s), rkd(s, s),
                  correlation_congruence(s, s)):
        assert value.item() == pytest.approx(0.0, abs=1e-9)
    assert dist(s, s).item() == pytest.approx(0.0, abs=1e-5)  # the 1e-8 in Pearson's denominator
    assert pkt(s, s).item() == pytest.approx(0.0, abs=1e-9)


def test_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 5\)"):
        dkd(randn(4, 3), randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels have shape \(3,\)"):
        dkd(randn(4, 3), randn(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(5, 3\)"):
        rkd(randn(4, 3), randn(5, 3))
    with pytest.raises(ValueError, match="nst"):
        nst(randn(4, 3), randn(4, 3))
    with pytest.raises(ValueError, match="log_scale"):
        vid_nll(randn(2, 3), randn(2, 3), randn(4))
    with pytest.raises(ValueError, match="order"):
        correlation_congruence(randn(4, 3), randn(4, 3), order=1.5)


def test_public_api_reexports_the_submodules():
    from fkd.losses import logits, maps, relations

    assert losses.dkd is logits.dkd and losses.rkd is relations.rkd and losses.nst is maps.nst
    for name in ("dkd", "dist", "logit_standardized_kd", "similarity_preserving", "rkd", "pkt", "nst",
                 "correlation_congruence", "vid_nll"):
        assert name in losses.__all__


def test_torch_compile_traces_every_function_without_graph_breaks():
    """Dynamo captures each loss and its gradient as one graph (``fullgraph``), equal to eager."""

    def all_losses(cases):
        return torch.stack([fn(s, t) for fn, s, t in cases])

    cases = list(CASES.values())
    students = [s for _, s, _ in cases]

    def total(students):
        return all_losses([(fn, s, t) for (fn, _, t), s in zip(cases, students)]).sum()

    compiled = torch.compile(grad(total), backend="eager", fullgraph=True)
    for got, want in zip(compiled(students), grad(total)(students)):
        torch.testing.assert_close(got, want)
