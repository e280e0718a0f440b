"""Tests for the issue-20 logit and feature losses in fkd.losses (SKD, MLKD, CTKD, Tf-KD, PAD, ICKD, FT).

Each function is checked against an independent float64 computation written here with numpy (from the
authors' code, not by calling fkd), then for the functional contract: gradients (``gradcheck``), purity
(inputs unchanged, no gradient to the teacher), and ``vmap`` over a leading axis of students equal to a
Python loop, the gradient included.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import grad, vmap

from fkd import losses
from tests.loss_contracts import assert_pure_and_teacher_constant, assert_vmap_equals_loop
from fkd.losses import (ctkd_lambda, ctkd_temperature, factor_transfer, gradient_reversal, ickd, mlkd, pad_l2,
                        skd_direction, skd_instance, tf_kd_regularization)

F64 = torch.float64


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kd(s, t, T):
    """mdistiller's kd_loss: T^2 * sum_c p_t log(p_t / p_s), mean over the batch."""
    p_s, p_t = np_softmax(s / T), np_softmax(t / T)
    return T * T * np.mean([sum(p_t[b, c] * math.log(p_t[b, c] / p_s[b, c]) for c in range(s.shape[1]))
                            for b in range(s.shape[0])])


def np_share(v):
    return float(np.mean(v <= np.percentile(v, 50)))


# --- independent references ------------------------------------------------------------------------


def ref_skd_instance(s, t, T, mode):
    kl = np_kd(s, t, T) / (T * T)
    if mode == "paper":
        return kl
    return T * T * kl * np_share(np_softmax(t).max(axis=1))


def ref_skd_direction(s, t, lam, mode):
    b, k = s.shape
    sn = s / np.linalg.norm(s, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    d = sn @ sn.T - tn @ tn.T
    if mode == "code":
        d = d / k
    cov = np.cov(d.T) + lam * np.eye(b)
    inv = np.linalg.inv(cov)
    loss = np.mean([math.sqrt(d[i] @ inv @ d[i]) for i in range(b)])
    if mode == "code":
        loss *= np_share(np_softmax(t).sum(axis=0))
    return loss


def ref_mlkd(sw, tw, ss, ts, T):
    p = np_softmax(tw)
    mask_b = np_share(p.max(axis=1))
    mask_c = np_share(p.sum(axis=0))

    def cc(s, t, tau):
        ps, pt = np_softmax(s / tau), np_softmax(t / tau)
        return ((pt.T @ pt - ps.T @ ps) ** 2).sum() / s.shape[1]

    def bc(s, t, tau):
        ps, pt = np_softmax(s / tau), np_softmax(t / tau)
        return ((pt @ pt.T - ps @ ps.T) ** 2).sum() / s.shape[0]

    total = 0.0
    for tau in (T, 3.0, 5.0, 2.0, 6.0):
        total += np_kd(sw, tw, tau) * mask_b + cc(sw, tw, tau) * mask_c + bc(sw, tw, tau) * mask_b
    for tau in (T, 3.0, 5.0):
        total += np_kd(ss, ts, tau)
    for tau in (2.0, 6.0):
        total += np_kd(sw, tw, tau)
    return total


def ref_tf_kd(s, y, T, cp):
    b, k = s.shape
    u = np.full((b, k), (1 - cp) / (k - 1))
    u[np.arange(b), y] = cp
    q = np_softmax(u / T)
    log_p = np.log(np_softmax(s))
    return np.sum(q * (np.log(q) - log_p)) / (b * k)


def ref_pad(s, t, lv, eps):
    b = s.shape[0]
    s, t, lv = s.reshape(b, -1), t.reshape(b, -1), lv.reshape(b, -1)
    return np.mean([np.mean([(t[i, j] - s[i, j]) ** 2 / (eps + math.exp(lv[i, j])) + lv[i, j]
                             for j in range(s.shape[1])]) for i in range(b)])


def ref_ickd(s, t):
    b, c = s.shape[:2]
    total = 0.0
    for n in range(b):
        gs, gt = s[n].reshape(c, -1) @ s[n].reshape(c, -1).T, t[n].reshape(c, -1) @ t[n].reshape(c, -1).T
        gs = gs / np.linalg.norm(gs, axis=1, keepdims=True)
        gt = gt / np.linalg.norm(gt, axis=1, keepdims=True)
        total += ((gs - gt) ** 2).sum()
    return total / (c * b)


def ref_ft(s, t):
    b = s.shape[0]
    s, t = s.reshape(b, -1), t.reshape(b, -1)
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    return np.abs(s - t).mean()


# --- values against the references ------------------------------------------------------------------


def logits(b=6, k=5, seed=0):
    return randn(b, k, seed=seed, scale=2.0), randn(b, k, seed=seed + 1, scale=3.0)


@pytest.mark.parametrize("mode", ["paper", "code"])
@pytest.mark.parametrize("b", [6, 7])  # even and odd batches: the median interpolates or hits an entry
def test_skd_matches_reference(mode, b):
    s, t = logits(b=b, k=5)
    for T in (4.0, 1.5):
        assert skd_instance(s, t, T, mode).item() == pytest.approx(ref_skd_instance(s.numpy(), t.numpy(), T, mode),
                                                                   rel=1e-9)
    for lam in (0.1, 1.0):
        assert skd_direction(s, t, lam, mode).item() == pytest.approx(
            ref_skd_direction(s.numpy(), t.numpy(), lam, mode), rel=1e-8)


def test_skd_defaults_and_modes():
    s, t = logits()
    assert skd_instance(s, t).item() == skd_instance(s, t, 4.0, "paper").item()
    assert skd_direction(s, t).item() == skd_direction(s, t, 0.1, "paper").item()
    with pytest.raises(ValueError, match="mode must be 'paper' or 'code'"):
        skd_instance(s, t, mode="both")
    with pytest.raises(ValueError, match=r"\(6, 5\).*\(6, 4\)|\(6, 4\).*\(6, 5\)"):
        skd_direction(s, t[:, :4])


@pytest.mark.parametrize("b, T", [(6, 4.0), (7, 2.0)])
def test_mlkd_matches_reference(b, T):
    sw, tw = logits(b=b, k=5, seed=2)
    ss, ts = logits(b=b, k=5, seed=4)
    got = mlkd(sw, tw, ss, ts, temperature=T)
    assert got.shape == ()
    assert got.item() == pytest.approx(ref_mlkd(sw.numpy(), tw.numpy(), ss.numpy(), ts.numpy(), T), rel=1e-9)


def test_median_share_is_numpys_linear_percentile():
    for n, seed in [(5, 0), (8, 1), (9, 2)]:
        v = randn(n, seed=seed)
        assert losses.median_share(v).item() == pytest.approx(np_share(v.numpy()))
    ties = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=F64)
    assert losses.median_share(ties).item() == 0.75


def test_gradient_reversal_is_the_identity_forward_and_minus_lam_backward():
    x = randn(3, 4, seed=5)
    for lam in (0.0, 0.3, torch.tensor(0.7, dtype=F64)):
        y = gradient_reversal(x, lam)
        assert torch.equal(y, x)  # bit for bit
        w = randn(3, 4, seed=6)
        g = grad(lambda x: (gradient_reversal(x, lam) * w).sum())(x)
        torch.testing.assert_close(g, -float(lam) * w)
    # Under vmap (a sweep's stacked students) and vmap of grad, and with autograd.
    xs = randn(4, 3, seed=7)
    lams = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=F64)
    got = vmap(grad(lambda x, lam: gradient_reversal(x, lam).pow(2).sum()))(xs, lams)
    torch.testing.assert_close(got, -lams[:, None] * 2 * xs)
    torch.testing.assert_close(vmap(gradient_reversal)(xs, lams), xs)
    leaf = xs.clone().requires_grad_()
    gradient_reversal(leaf, 0.5).sum().backward()
    torch.testing.assert_close(leaf.grad, torch.full_like(xs, -0.5))
    # No gradient reaches lam.
    lam = torch.tensor(0.4, dtype=F64)
    assert grad(lambda lam: gradient_reversal(x, lam).sum())(lam).item() == 0.0


def test_ctkd_lambda_is_the_authors_cosine_decay():
    def authors(i, max_value=0.0, min_value=-1.0, num_loops=10):  # CTKD train_student.py CosineDecay
        i = min(max(i, 0), num_loops)
        return (math.cos(i * math.pi / num_loops) + 1.0) * 0.5 * (max_value - min_value) + min_value

    for e in (-1, 0, 1, 2.5, 5, 9, 10, 11, 240):
        assert ctkd_lambda(e).item() == pytest.approx(-authors(e), abs=1e-7)
        assert ctkd_lambda(torch.tensor(float(e), dtype=F64), 20, 0.8, 0.2).item() == pytest.approx(
            0.2 + 0.6 * (1 - math.cos(math.pi * min(max(e, 0), 20) / 20)) / 2, abs=1e-12)


def test_ctkd_temperature_value_and_reversed_gradient():
    raw = torch.tensor(1.0, dtype=F64)
    lam = 0.6
    sig = 1 / (1 + math.exp(-1.0))
    assert ctkd_temperature(raw, lam).item() == pytest.approx(1.0 + 20.0 * sig, rel=1e-12)
    assert ctkd_temperature(raw, lam, 2.0, 5.0).item() == pytest.approx(2.0 + 5.0 * sig, rel=1e-12)
    g = grad(lambda r: ctkd_temperature(r, lam))(raw)
    assert g.item() == pytest.approx(-lam * 20.0 * sig * (1 - sig), rel=1e-12)
    # The KD loss at that temperature: the student descends it, the temperature ascends it.
    s, t = logits(seed=8)

    def kd(r):
        return losses.soft_target_kl(s, t, ctkd_temperature(r, 1.0))

    eps = 1e-6
    numeric = (kd(raw + eps) - kd(raw - eps)) / (2 * eps)
    assert grad(kd)(raw).item() == pytest.approx(-numeric.item(), rel=1e-5)


@pytest.mark.parametrize("T, cp", [(20.0, 0.99), (1.0, 0.9)])
def test_tf_kd_regularization_matches_reference(T, cp):
    s = randn(6, 5, seed=9, scale=2.0)
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    assert tf_kd_regularization(s, y, T, cp).item() == pytest.approx(ref_tf_kd(s.numpy(), y.numpy(), T, cp), rel=1e-9)


@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 2, 2)])
def test_pad_l2_matches_reference(shape):
    s, t = randn(*shape, seed=10), randn(*shape, seed=11)
    lv = randn(shape[0], math.prod(shape[1:]), seed=12, scale=0.5)
    for eps in (1e-6, 0.1):
        assert pad_l2(s, t, lv, eps).item() == pytest.approx(ref_pad(s.numpy(), t.numpy(), lv.numpy(), eps), rel=1e-9)


def test_pad_l2_reads_a_log_variance_of_the_features_shape_or_per_dimension():
    s, t = randn(3, 2, 2, 2, seed=41), randn(3, 2, 2, 2, seed=42)
    lv = randn(3, 2, 2, 2, seed=43, scale=0.5)
    assert pad_l2(s, t, lv).item() == pytest.approx(pad_l2(s, t, lv.flatten(1)).item(), rel=1e-12)
    per_dim = randn(8, seed=44, scale=0.5)
    assert pad_l2(s, t, per_dim).item() == pytest.approx(pad_l2(s, t, per_dim.expand(3, 8)).item(), rel=1e-12)


def test_variance_branch_is_linear_then_batchnorm_in_train_mode():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(5, 4, generator=g)
    linear, bn = torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    p = {"weight": linear.weight.data, "bias": linear.bias.data, "gamma": bn.weight.data, "beta": bn.bias.data}
    torch.testing.assert_close(losses.variance_branch(e, p), bn.train()(linear(e)))


@pytest.mark.parametrize("hw", [(2, 2), (3, 4)])
def test_ickd_matches_reference(hw):
    s, t = randn(3, 4, *hw, seed=13), randn(3, 4, *hw, seed=14)
    assert ickd(s, t).item() == pytest.approx(ref_ickd(s.numpy(), t.numpy()), rel=1e-9)
    assert ickd(s, s).item() == pytest.approx(0.0, abs=1e-12)


def test_conv_bn_embed_is_the_authors_embed_in_train_mode():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 5, generator=g)
    conv, bn = torch.nn.Conv2d(3, 6, 1, bias=False), torch.nn.BatchNorm2d(6)
    bn.weight.data.uniform_(0.5, 1.5)
    p = {"weight": conv.weight.data[:, :, 0, 0], "gamma": bn.weight.data, "beta": bn.bias.data}
    torch.testing.assert_close(losses.conv_bn_embed(x, p), bn.train()(conv(x)), atol=1e-5, rtol=1e-5)


def test_factor_transfer_matches_reference():
    s, t = randn(3, 2, 4, 4, seed=15), randn(3, 2, 4, 4, seed=16)
    assert factor_transfer(s, t).item() == pytest.approx(ref_ft(s.numpy(), t.numpy()), rel=1e-9)
    with pytest.raises(ValueError, match="same size per example"):
        factor_transfer(s, t[:, :1])


def test_paraphraser_and_translator_equal_the_authors_modules():
    """fkd's functions with the authors' layer stack (Conv2d / ConvTranspose2d 3x3, padding 1, LeakyReLU 0.1)."""
    g = torch.Generator().manual_seed(2)
    p = losses.init_paraphraser(4, 2, g)
    tr = losses.init_translator(3, 2, g)
    x, xs = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)

    def conv(c_in, c_out, w, transposed=False):
        m = (torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d)(c_in, c_out, 3, padding=1)
        m.weight.data.copy_(w["weight"])
        m.bias.data.copy_(w["bias"])
        return m

    act = torch.nn.LeakyReLU(0.1)
    enc = torch.nn.Sequential(conv(4, 4, p["conv0"]), act, conv(4, 2, p["conv1"]), act, conv(2, 2, p["conv2"]), act)
    dec = torch.nn.Sequential(conv(2, 2, p["deconv0"], True), act, conv(2, 4, p["deconv1"], True), act,
                              conv(4, 4, p["deconv2"], True), act)
    trans = torch.nn.Sequential(conv(3, 3, tr["conv0"]), act, conv(3, 2, tr["conv1"]), act, conv(2, 2, tr["conv2"]),
                                act)
    with torch.no_grad():
        torch.testing.assert_close(losses.paraphraser_encode(x, p), enc(x))
        torch.testing.assert_close(losses.paraphraser_reconstruct(x, p), dec(enc(x)))
        torch.testing.assert_close(losses.translate(xs, tr), trans(xs))
    bound = 1 / math.sqrt(4 * 9)
    assert p["conv0"]["weight"].abs().max() <= bound and p["deconv1"]["weight"].shape == (2, 4, 3, 3)


# --- the functional contract -------------------------------------------------------------------------

LABELS = torch.tensor([1, 0, 2, 2])
_SW, _TW = randn(4, 3, seed=20), randn(4, 3, seed=21, scale=2.0)

#: name -> (fn(student, teacher), student, teacher); student tensors are what gradients flow into.
CASES = {
    "skd_instance_paper": (lambda s, t: skd_instance(s, t, 2.0, "paper"), randn(4, 3, seed=22), randn(4, 3, seed=23)),
    "skd_instance_code": (lambda s, t: skd_instance(s, t, 2.0, "code"), randn(4, 3, seed=22), randn(4, 3, seed=23)),
    "skd_direction_paper": (lambda s, t: skd_direction(s, t, 0.1, "paper"), randn(5, 3, seed=24),
                            randn(5, 3, seed=25)),
    "skd_direction_code": (lambda s, t: skd_direction(s, t, 0.1, "code"), randn(5, 3, seed=24), randn(5, 3, seed=25)),
    "mlkd": (lambda s, t: mlkd(s, t, 0.5 * s + 0.1, _TW), randn(4, 3, seed=26), randn(4, 3, seed=27)),
    "tf_kd": (lambda s, t: tf_kd_regularization(s, LABELS, 4.0) + 0 * t.sum(), randn(4, 3, seed=28),
              randn(4, 3, seed=29)),
    # lam = -1: the reversal's backward is the identity, so gradcheck sees the true derivative of the chain
    "ctkd": (lambda s, t: losses.soft_target_kl(s, t, ctkd_temperature(s.mean(), -1.0)), randn(4, 3, seed=30),
             randn(4, 3, seed=31)),
    "pad_l2": (lambda s, t: pad_l2(s, t, torch.linspace(-0.5, 0.5, 6, dtype=F64)), randn(4, 6, seed=32),
               randn(4, 6, seed=33)),
    "ickd": (ickd, randn(3, 2, 2, 2, seed=34), randn(3, 2, 2, 2, seed=35)),
    "factor_transfer": (factor_transfer, randn(3, 2, 2, 2, seed=36), randn(3, 2, 2, 2, seed=37)),
}


@pytest.mark.parametrize("name", CASES)
def test_gradcheck(name):
    fn, s, t = CASES[name]
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (s.clone().requires_grad_(),))


def test_pad_gradcheck_in_the_log_variance():
    s, t, lv = randn(3, 4, seed=38), randn(3, 4, seed=39), randn(3, 4, seed=40)
    assert torch.autograd.gradcheck(lambda a, v: pad_l2(a, t, v), (s.requires_grad_(), lv.requires_grad_()))


@pytest.mark.parametrize("name", CASES)
def test_pure_and_teacher_constant(name):
    assert_pure_and_teacher_constant(*CASES[name], LABELS)


@pytest.mark.parametrize("name", CASES)
def test_vmap_over_a_leading_axis_equals_a_loop(name):
    assert_vmap_equals_loop(*CASES[name], grads=True)


def test_public_api_exports_every_new_function():
    for name in ("skd_instance", "skd_direction", "mlkd", "gradient_reversal", "ctkd_lambda", "ctkd_temperature",
                 "tf_kd_regularization", "pad_l2", "ickd", "factor_transfer"):
        assert name in losses.__all__ and callable(getattr(losses, name))


def test_torch_compile_traces_the_logit_losses_without_graph_breaks():
    cases = [CASES[n] for n in ("skd_instance_code", "skd_direction_code", "mlkd", "ctkd", "ickd")]

    def total(students):
        return torch.stack([fn(s, t) for (fn, _, t), s in zip(cases, students)]).sum()

    students = [s for _, s, _ in cases]
    compiled = torch.compile(grad(total), backend="eager", fullgraph=True)
    for got, want in zip(compiled(students), grad(total)(students)):
        torch.testing.assert_close(got, want)
