"""Tests for the issue-20 feature losses in fkd.losses: hcl (ReviewKD), fsp, ab, ofd_margin / ofd, srrl, kdsvd.

Each function is checked against an independent float64 computation written here with numpy loops (from the
authors' code's formulas, not by calling fkd), then for the functional contract: gradients (``gradcheck``),
purity (inputs unchanged), a constant teacher, and ``vmap`` over a leading axis equal to a Python loop, the
gradient included.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import grad, vmap

from fkd import losses
from tests.loss_contracts import assert_pure_and_teacher_constant, assert_vmap_equals_loop, stack_members
from fkd.losses import ab, fsp, hcl, kdsvd, ofd, ofd_margin, srrl

F64 = torch.float64


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


# --- independent references ------------------------------------------------------------------------


def np_adaptive_pool(x, out):
    """torch's adaptive average pooling on the last two axes: cell i spans [floor(iH/o), ceil((i+1)H/o))."""
    h, w = x.shape[-2:]
    res = np.zeros(x.shape[:-2] + (out[0], out[1]))
    for i in range(out[0]):
        h0, h1 = (i * h) // out[0], -(-((i + 1) * h) // out[0])
        for j in range(out[1]):
            w0, w1 = (j * w) // out[1], -(-((j + 1) * w) // out[1])
            res[..., i, j] = x[..., h0:h1, w0:w1].mean(axis=(-2, -1))
    return res


def ref_hcl(pairs, levels=(4, 2, 1)):
    total = 0.0
    for s, t in pairs:
        s, t = s.numpy(), t.numpy()
        h = s.shape[2]
        num, den, w = np.mean((s - t) ** 2), 1.0, 1.0
        for lv in levels:
            if lv < h:
                w /= 2
                num += w * np.mean((np_adaptive_pool(s, (lv, lv)) - np_adaptive_pool(t, (lv, lv))) ** 2)
                den += w
        total += num / den
    return total


def ref_fsp_matrix(a, b):
    a, b = a.numpy(), b.numpy()
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    a = a if a.shape[2:] == size else np_adaptive_pool(a, size)
    b = b if b.shape[2:] == size else np_adaptive_pool(b, size)
    B, c1, c2 = a.shape[0], a.shape[1], b.shape[1]
    g = np.zeros((B, c1, c2))
    for n in range(B):
        for i in range(c1):
            for j in range(c2):
                g[n, i, j] = (a[n, i] * b[n, j]).sum() / (size[0] * size[1])
    return g


def ref_fsp(s1, s2, t1, t2):
    return np.mean((ref_fsp_matrix(s1, s2) - ref_fsp_matrix(t1, t2)) ** 2)


def ref_ab(s, t, mu):
    s, t = s.numpy(), t.numpy()
    total = 0.0
    for v_s, v_t in zip(s.ravel(), t.ravel()):
        if v_s > -mu and v_t <= 0:
            total += (v_s + mu) ** 2
        if v_s <= mu and v_t > 0:
            total += (v_s - mu) ** 2
    return total / s.shape[0]


def ref_margin(gamma, beta):
    out = []
    for g, m in zip(gamma.tolist(), beta.tolist()):
        s = abs(g)
        cdf = 0.5 * math.erfc((m / s) / math.sqrt(2))  # Phi(-m/s)
        if cdf > 0.001:
            out.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf + m)
        else:
            out.append(-3 * s)
    return np.array(out)


def ref_ofd(s, t, margin):
    s, t = s.numpy(), t.numpy()
    if t.shape[2:] != s.shape[2:]:
        t = np_adaptive_pool(t, s.shape[2:])
    total = 0.0
    for b in range(s.shape[0]):
        for c in range(s.shape[1]):
            for i in range(s.shape[2]):
                for j in range(s.shape[3]):
                    tt = max(t[b, c, i, j], margin[c])
                    if s[b, c, i, j] > tt or tt > 0:
                        total += (s[b, c, i, j] - tt) ** 2
    return total / s.shape[0]


def ref_srrl(fs, ft, zs, zt, w):
    fs, ft = fs.numpy(), ft.numpy()
    fs = fs.mean(axis=(2, 3)) if fs.ndim == 4 else fs
    ft = ft.mean(axis=(2, 3)) if ft.ndim == 4 else ft
    return np.mean((fs - ft) ** 2) + w * np.mean((zs.numpy() - zt.numpy()) ** 2)


def ref_kdsvd(student, teacher, k):
    """mdistiller's kdsvd_loss with numpy's SVD; only the signs of the teacher's singular vectors are taken
    from torch's (the loss depends on them; see fkd.losses.kdsvd)."""
    total, prev = 0.0, None
    B = student[0].shape[0]
    for f_s, f_t in zip(student, teacher):
        layer = []
        for b in range(B):
            xs = f_s[b].numpy().reshape(-1, f_s.shape[3])
            xt = f_t[b].numpy().reshape(-1, f_t.shape[3])
            _, st, vth = np.linalg.svd(xt, full_matrices=False)
            _, _, vsh = np.linalg.svd(xs, full_matrices=False)
            _, _, torch_vh = torch.linalg.svd(torch.from_numpy(xt), full_matrices=False)
            vt = vth[:k].T.copy()
            for n in range(vt.shape[1]):
                if np.dot(vt[:, n], torch_vh[n].numpy()) < 0:
                    vt[:, n] = -vt[:, n]
            vt /= np.linalg.norm(vt, axis=0, keepdims=True)
            vs = vsh[:k + 3].T / np.linalg.norm(vsh[:k + 3].T, axis=0, keepdims=True)
            sv = st[:k] / np.linalg.norm(st[:k])
            aligned = np.zeros_like(vt)
            for n in range(vt.shape[1]):
                cos = vs.T @ vt[:, n]
                m = int(np.argmax(np.abs(cos)))
                aligned[:, n] = vs[:, m] * np.sign(cos[m])
            layer.append((aligned * sv, vt * sv))
        if prev is not None:
            for b in range(B):
                (vs, vt), (vsb, vtb) = layer[b], prev[b]
                for i in range(vs.shape[0]):
                    for j in range(vsb.shape[0]):
                        rs = np.exp(-(vs[i] - vsb[j]) ** 2 / 8)
                        rt = np.exp(-(vt[i] - vtb[j]) ** 2 / 8)
                        total += np.sum((rs - rt) ** 2)
        prev = layer
    return total / B


# --- values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("h", [1, 2, 3, 4, 6, 8])
def test_hcl_matches_reference(h):
    s, t = randn(2, 3, h, h, seed=1), randn(2, 3, h, h, seed=2)
    assert hcl(s, t).item() == pytest.approx(ref_hcl([(s, t)]), rel=1e-10)


def test_hcl_sums_pairs_and_takes_levels():
    pairs = [(randn(2, 3, 8, 8, seed=3), randn(2, 3, 8, 8, seed=4)), (randn(2, 5, 1, 1, seed=5), randn(2, 5, 1, 1, seed=6))]
    s, t = [p[0] for p in pairs], [p[1] for p in pairs]
    assert hcl(s, t).item() == pytest.approx(ref_hcl(pairs), rel=1e-10)
    assert hcl(s, t, levels=(2,)).item() == pytest.approx(ref_hcl(pairs, levels=(2,)), rel=1e-10)
    # the weights go to the used levels in turn: at H = 4, level 4 is skipped and level 2 weighs 1/2
    s4, t4 = randn(1, 2, 4, 4, seed=7), randn(1, 2, 4, 4, seed=8)
    import torch.nn.functional as F
    mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    expected = (mse(s4, t4) + 0.5 * mse(F.adaptive_avg_pool2d(s4, 2), F.adaptive_avg_pool2d(t4, 2))
                + 0.25 * mse(s4.mean((2, 3)), t4.mean((2, 3)))) / 1.75
    assert hcl(s4, t4).item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("sizes", [(4, 4), (8, 4), (4, 8), (6, 3)])
def test_fsp_matches_reference(sizes):
    h1, h2 = sizes
    s1, s2 = randn(2, 3, h1, h1, seed=9), randn(2, 4, h2, h2, seed=10)
    t1, t2 = randn(2, 3, h1, h1, seed=11), randn(2, 4, h2, h2, seed=12)
    assert fsp(s1, s2, t1, t2).item() == pytest.approx(ref_fsp(s1, s2, t1, t2), rel=1e-10)


@pytest.mark.parametrize("mu", [0.0, 0.5, 1.0])
def test_ab_matches_reference(mu):
    s, t = randn(3, 4, 3, 3, seed=13), randn(3, 4, 3, 3, seed=14)
    assert ab(s, t, margin=mu).item() == pytest.approx(ref_ab(s, t, mu), rel=1e-10)


def test_ofd_margin_matches_reference_in_both_branches():
    gamma = torch.tensor([1.0, -0.5, 2.0, 0.1, 0.3, 1.0], dtype=F64)
    beta = torch.tensor([0.0, 0.2, -1.0, 1.0, 3.0, -2.0], dtype=F64)  # 0.1/1.0 and 0.3/3.0: Phi(-10) -> -3s
    expected = ref_margin(gamma, beta)
    assert np.allclose(ofd_margin(gamma, beta).numpy(), expected, rtol=1e-10, atol=0)
    assert ofd_margin(gamma, beta)[3].item() == pytest.approx(-0.3)


@pytest.mark.parametrize("t_size", [3, 6])
def test_ofd_matches_reference(t_size):
    s, t = randn(2, 4, 3, 3, seed=15), randn(2, 4, t_size, t_size, seed=16)
    margin = ofd_margin(randn(4, seed=17), randn(4, seed=18))
    assert ofd(s, t, margin).item() == pytest.approx(ref_ofd(s, t, margin.numpy()), rel=1e-10)
    assert ofd(s, t, margin.view(1, 4, 1, 1)).item() == ofd(s, t, margin).item()  # the authors' margin shape


@pytest.mark.parametrize("spatial", [True, False])
def test_srrl_matches_reference(spatial):
    fs = randn(3, 5, 2, 2, seed=19) if spatial else randn(3, 5, seed=19)
    ft = randn(3, 5, 4, 4, seed=20) if spatial else randn(3, 5, seed=20)
    zs, zt = randn(3, 7, seed=21), randn(3, 7, seed=22)
    assert srrl(fs, ft, zs, zt, logit_weight=0.3).item() == pytest.approx(ref_srrl(fs, ft, zs, zt, 0.3), rel=1e-10)


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_matches_reference(k):
    student = [randn(2, 3, 4, 4, seed=23), randn(2, 5, 2, 4, seed=24), randn(2, 4, 3, 4, seed=25)]
    teacher = [randn(2, 6, 4, 4, seed=26), randn(2, 7, 3, 4, seed=27), randn(2, 2, 5, 4, seed=28)]
    assert kdsvd(student, teacher, k=k).item() == pytest.approx(ref_kdsvd(student, teacher, k), rel=1e-8)


def test_zero_for_identical_inputs():
    s = randn(2, 3, 4, 4, seed=29)
    assert hcl(s, s).item() == 0 and fsp(s, s, s, s).item() == 0
    assert kdsvd([s, s], [s, s]).item() == pytest.approx(0.0, abs=1e-12)
    # AB: zero once every student neuron is on the teacher's side by more than the margin
    assert ab(torch.where(s > 0, s + 1, s - 1), s, margin=1.0).item() == 0


# --- the functional contract -------------------------------------------------------------------------

MARGIN = ofd_margin(randn(3, seed=40), randn(3, seed=41))

#: name -> (fn(student, teacher), student, teacher); student tensors are what gradients flow into.
CASES = {
    "hcl": (hcl, randn(2, 3, 4, 4, seed=30), randn(2, 3, 4, 4, seed=31)),
    "hcl_list": (lambda s, t: hcl([s, s[:, :, :2, :2]], [t, t[:, :, :2, :2]]),
                 randn(2, 3, 4, 4, seed=30), randn(2, 3, 4, 4, seed=31)),
    "fsp": (lambda s, t: fsp(s, s[:, :2, ::2, ::2] * 2, t, t[:, :2, ::2, ::2]),
            randn(2, 3, 4, 4, seed=32), randn(2, 3, 4, 4, seed=33)),
    "ab": (lambda s, t: ab(s, t, margin=0.5), randn(2, 3, 3, 3, seed=34), randn(2, 3, 3, 3, seed=35)),
    "ofd": (lambda s, t: ofd(s, t, MARGIN), randn(2, 3, 3, 3, seed=36), randn(2, 3, 6, 6, seed=37)),
    "srrl": (lambda s, t: srrl(s, t, s.mean((2, 3)) @ torch.ones(3, 4, dtype=F64), t.mean((2, 3)) @ torch.ones(3, 4, dtype=F64) * 0.5),
             randn(2, 3, 2, 2, seed=38), randn(2, 3, 2, 2, seed=39)),
    "kdsvd": (lambda s, t: kdsvd([s, s[:, :2] * 1.5 + 0.2], [t, t[:, 1:]]),
              randn(2, 3, 4, 4, seed=42), randn(2, 3, 4, 4, seed=43)),
}


@pytest.mark.parametrize("name", CASES)
def test_gradcheck(name):
    fn, s, t = CASES[name]
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (s.clone().requires_grad_(),))


@pytest.mark.parametrize("name", CASES)
def test_pure_and_teacher_constant(name):
    assert_pure_and_teacher_constant(*CASES[name])


def test_ofd_margin_is_a_constant_and_pure():
    g, b = randn(4, seed=44).requires_grad_(), randn(4, seed=45).requires_grad_()
    before = (g.detach().clone(), b.detach().clone())
    m = ofd_margin(g, b)
    assert m.shape == (4,) and not m.requires_grad
    assert torch.equal(g.detach(), before[0]) and torch.equal(b.detach(), before[1])


@pytest.mark.parametrize("name", CASES)
def test_vmap_over_a_leading_axis_equals_a_loop(name):
    assert_vmap_equals_loop(*CASES[name], grads=True)


def test_connectors_under_vmap_equal_a_loop():
    p = losses.init_conv_bn(3, 5, generator=torch.Generator().manual_seed(0))
    abf_p = losses.init_abf(3, 4, 5, fuse=True, generator=torch.Generator().manual_seed(1))
    x, res = randn(2, 3, 4, 4, seed=46).float(), randn(2, 4, 2, 2, seed=47).float()
    xs = stack_members(x)
    out = vmap(lambda a: losses.conv_bn(a, p))(xs)
    assert torch.allclose(out, torch.stack([losses.conv_bn(a, p) for a in xs]), atol=1e-6)
    y, fused = losses.abf(x, res, abf_p, (8, 8))
    assert y.shape == (2, 5, 8, 8) and fused.shape == (2, 4, 4, 4)
    batched = vmap(lambda a: losses.abf(a, res, abf_p, (8, 8))[0])(xs)
    assert torch.allclose(batched, torch.stack([losses.abf(a, res, abf_p, (8, 8))[0] for a in xs]), atol=1e-5)


def test_abf_matches_the_authors_module():
    """fkd's functional ABF equals mdistiller's ABF (rebuilt here from nn modules) with the same weights."""
    nn = torch.nn
    p = losses.init_abf(3, 4, 5, fuse=True, generator=torch.Generator().manual_seed(2))
    conv1 = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
    conv2 = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5))
    att = nn.Sequential(nn.Conv2d(8, 2, 1), nn.Sigmoid())
    with torch.no_grad():
        conv1[0].weight.copy_(p["conv1"]), conv2[0].weight.copy_(p["conv2"])
        att[0].weight.copy_(p["att_weight"]), att[0].bias.copy_(p["att_bias"])
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)
    n, _, h, w = x.shape
    a = conv1(x)
    y_up = torch.nn.functional.interpolate(y, (h, w), mode="nearest")
    z = att(torch.cat([a, y_up], dim=1))
    a = a * z[:, 0].view(n, 1, h, w) + y_up * z[:, 1].view(n, 1, h, w)
    expected = conv2(torch.nn.functional.interpolate(a, (8, 8), mode="nearest"))
    out, fused = losses.abf(x, y, p, (8, 8))
    assert torch.allclose(out, expected, atol=1e-5) and torch.allclose(fused, a, atol=1e-6)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 2, 2\)"):
        hcl(randn(2, 3, 4, 4), randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="same channel counts"):
        fsp(randn(2, 3, 4, 4), randn(2, 4, 4, 4), randn(2, 3, 4, 4), randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="connector"):
        ab(randn(2, 3, 4, 4), randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="margin"):
        ofd(randn(2, 3, 4, 4), randn(2, 3, 4, 4), randn(4))
    with pytest.raises(ValueError, match="two or more"):
        kdsvd([randn(2, 3, 4, 4)], [randn(2, 3, 4, 4)])


def test_public_api_exports_the_issue_20_functions():
    for name in ("hcl", "fsp", "ab", "ofd_margin", "ofd", "srrl", "kdsvd"):
        assert name in losses.__all__ and callable(getattr(losses, name))


def test_torch_compile_traces_every_function_without_graph_breaks():
    """Dynamo captures each loss and its gradient as one graph (``fullgraph``), equal to eager."""
    cases = list(CASES.values())
    students = [s for _, s, _ in cases]

    def total(students):
        return torch.stack([fn(s, t) for (fn, _, t), s in zip(cases, students)]).sum()

    compiled = torch.compile(grad(total), backend="eager", fullgraph=True)
    for got, want in zip(compiled(students), grad(total)(students)):
        torch.testing.assert_close(got, want)
