"""Tests for fkd.losses: each loss against an independent computation, plus the functional contract
(grad / vmap / compile, no mutation, teacher constant, clear shape errors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from fkd.losses import (
    attention_map,
    attention_transfer,
    blended_kd,
    cross_entropy,
    feature_kd,
    feature_mse,
    fitnet_hint,
    init_regressor,
    soft_target_kl,
    weighted_sum,
)
from tests.notebook_reference import blended_distillation_loss, feature_distillation_loss

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def logits_and_labels(b=5, c=7, seed=0):
    s = randn(b, c, seed=seed) * 2
    t = randn(b, c, seed=seed + 1) * 3
    y = torch.randint(0, c, (b,), generator=gen(seed + 2))
    return s, t, y


# --- independent numpy references (float64, explicit loops where it matters) -------------------


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_soft_target_kl(s, t, T):
    total = 0.0
    for b in range(s.shape[0]):
        log_ps, log_pt = np_log_softmax(s[b] / T), np_log_softmax(t[b] / T)
        for c in range(s.shape[1]):
            pt = math.exp(log_pt[c])
            if pt > 0:
                total += pt * (log_pt[c] - log_ps[c])
    return T * T * total / s.shape[0]


def np_cross_entropy(z, y):
    return -np.mean([np_log_softmax(z[b])[y[b]] for b in range(z.shape[0])])


def np_bilinear(x, out_h, out_w):
    """Bilinear resize of (..., H, W), align_corners=False, PyTorch's index convention."""

    def taps(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    r0, r1, lr = taps(out_h, x.shape[-2])
    c0, c1, lc = taps(out_w, x.shape[-1])
    rows = x[..., r0, :] * (1 - lr)[:, None] + x[..., r1, :] * lr[:, None]
    return rows[..., c0] * (1 - lc) + rows[..., c1] * lc


def np_attention(f, p=2.0, size=None):
    q = (np.abs(f) ** p).mean(axis=1)  # (B, H, W)
    if size is not None and q.shape[-2:] != tuple(size):
        q = np_bilinear(q, *size)
    q = q.reshape(q.shape[0], -1)
    return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)


def np_attention_transfer(fs_list, ft_list, p=2.0):
    total = 0.0
    for fs, ft in zip(fs_list, ft_list):
        qs = np_attention(fs, p, size=ft.shape[-2:])
        qt = np_attention(ft, p)
        b, k = qt.shape
        total += sum((qs[i, j] - qt[i, j]) ** 2 for i in range(b) for j in range(k)) / (b * k)
    return total


# --- soft_target_kl ----------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 0.5])
def test_soft_target_kl_matches_kl_div_batchmean(T):
    s, t, _ = logits_and_labels()
    expected = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean") * T**2
    torch.testing.assert_close(soft_target_kl(s, t, T), expected)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_soft_target_kl_matches_numpy_loops(T):
    s, t, _ = logits_and_labels(seed=3)
    expected = np_soft_target_kl(s.numpy(), t.numpy(), T)
    assert soft_target_kl(s, t, T).item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_soft_target_kl_is_0d_and_accepts_tensor_temperature():
    s, t, _ = logits_and_labels()
    out = soft_target_kl(s, t, torch.tensor(2.5, dtype=F64))
    assert out.shape == ()
    torch.testing.assert_close(out, soft_target_kl(s, t, 2.5))


@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
def test_soft_target_kl_closed_form_gradient(T):
    # Hinton et al. 2015 eq. 2 with the T^2 factor and the batch mean: T * (p_s - p_t) / B.
    s, t, _ = logits_and_labels(b=4, c=6, seed=7)
    g = grad(soft_target_kl)(s, t, T)
    expected = T * (F.softmax(s / T, dim=1) - F.softmax(t / T, dim=1)) / s.shape[0]
    torch.testing.assert_close(g, expected)


def test_soft_target_kl_zero_for_identical_logits_and_nonnegative():
    s, t, _ = logits_and_labels(b=16, c=10)
    for T in (0.5, 1.0, 4.0):
        assert soft_target_kl(s, s.clone(), T).item() == pytest.approx(0.0, abs=1e-15)
    for seed in range(20):
        s, t, _ = logits_and_labels(b=8, c=10, seed=seed)
        assert soft_target_kl(s, t, 2.0).item() >= 0.0


def test_soft_target_kl_teacher_gets_no_gradient():
    s, t, _ = logits_and_labels()
    g_s, g_t = grad(soft_target_kl, argnums=(0, 1))(s, t, 2.0)
    assert torch.count_nonzero(g_s) > 0
    assert torch.count_nonzero(g_t) == 0
    # Also with plain autograd: the teacher is not even in the graph.
    t_req = t.clone().requires_grad_(True)
    s_req = s.clone().requires_grad_(True)
    (g_teacher,) = torch.autograd.grad(soft_target_kl(s_req, t_req, 2.0), (t_req,), allow_unused=True)
    assert g_teacher is None


def test_soft_target_kl_handles_zero_teacher_probabilities():
    # A -inf teacher logit gives p_t = 0 exactly; the loss is the KL over the support and finite.
    s, t, _ = logits_and_labels(b=3, c=5)
    t = t.clone()
    t[:, 0] = -math.inf
    t[1, 3] = -1e6  # exp underflows to 0 as well
    loss = soft_target_kl(s, t, 2.0)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(np_soft_target_kl(s.numpy(), t.numpy(), 2.0), rel=1e-12)
    assert torch.isfinite(grad(soft_target_kl)(s, t, 2.0)).all()


# --- cross_entropy and blended_kd --------------------------------------------------------------


def test_cross_entropy_matches_numpy():
    s, _, y = logits_and_labels(b=6, c=4, seed=11)
    assert cross_entropy(s, y).item() == pytest.approx(np_cross_entropy(s.numpy(), y.numpy()), rel=1e-12)


@pytest.mark.parametrize("T,alpha", [(2.0, 0.7), (4.0, 0.9), (1.0, 0.0), (3.0, 1.0)])
def test_blended_kd_equals_notebook(T, alpha):
    s, t, y = logits_and_labels(b=8, c=10, seed=5)
    torch.testing.assert_close(
        blended_kd(s, t, y, temperature=T, alpha=alpha), blended_distillation_loss(s, t, y, T=T, alpha=alpha)
    )


def test_blended_kd_defaults_equal_notebook_defaults_and_weighted_sum():
    s, t, y = logits_and_labels(b=8, c=10, seed=6)
    expected = blended_distillation_loss(s, t, y)
    torch.testing.assert_close(blended_kd(s, t, y), expected)
    loss, metrics = weighted_sum(
        {"kd": soft_target_kl(s, t, 2.0), "ce": cross_entropy(s, y)}, {"kd": 0.7, "ce": 0.3}
    )
    torch.testing.assert_close(loss, expected)
    assert set(metrics) == {"kd", "ce", "loss"}


# --- feature_mse, init_regressor, fitnet_hint, feature_kd --------------------------------------


def test_feature_mse_matches_mse_loss_and_numpy():
    fs, ft = randn(2, 3, 4, 5, seed=1), randn(2, 3, 4, 5, seed=2)
    out = feature_mse(fs, ft)
    torch.testing.assert_close(out, F.mse_loss(fs, ft))
    assert out.item() == pytest.approx(float(np.mean((fs.numpy() - ft.numpy()) ** 2)), rel=1e-12)
    g_s, g_t = grad(feature_mse, argnums=(0, 1))(fs, ft)
    torch.testing.assert_close(g_s, 2 * (fs - ft) / fs.numel())
    assert torch.count_nonzero(g_t) == 0


def test_feature_mse_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 5, 4, 4\)"):
        feature_mse(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))


def test_soft_target_kl_shape_mismatch():
    with pytest.raises(ValueError, match=r"soft_target_kl.*\(4, 10\).*\(4, 11\)"):
        soft_target_kl(torch.zeros(4, 10), torch.zeros(4, 11), 2.0)


@pytest.mark.parametrize("spatial", [True, False])
def test_init_regressor_matches_torch_default_init(spatial):
    cs, ct = 12, 20
    torch.manual_seed(123)
    ref = torch.nn.Conv2d(cs, ct, 1) if spatial else torch.nn.Linear(cs, ct)
    reg = init_regressor(cs, ct, spatial=spatial, generator=gen(123))
    assert reg["weight"].shape == ((ct, cs, 1, 1) if spatial else (ct, cs))
    assert reg["bias"].shape == (ct,)
    torch.testing.assert_close(reg["weight"], ref.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(reg["bias"], ref.bias.detach(), rtol=0, atol=0)
    assert not reg["weight"].requires_grad and not reg["bias"].requires_grad
    bound = 1 / math.sqrt(cs)
    assert reg["weight"].abs().max() <= bound and reg["bias"].abs().max() <= bound


def test_init_regressor_dtype_and_seeds():
    a = init_regressor(4, 6, generator=gen(0), dtype=F64)
    b = init_regressor(4, 6, generator=gen(1), dtype=F64)
    assert a["weight"].dtype == F64 and a["bias"].dtype == F64
    assert not torch.equal(a["weight"], b["weight"])
    torch.testing.assert_close(a["weight"], init_regressor(4, 6, generator=gen(0), dtype=F64)["weight"])
    with pytest.raises(ValueError):
        init_regressor(0, 6)


def identity_regressor(c, spatial=True):
    w = torch.eye(c, dtype=F64)
    return {"weight": w[:, :, None, None] if spatial else w, "bias": torch.zeros(c, dtype=F64)}


def test_fitnet_hint_identity_regressor_equals_feature_mse():
    fs, ft = randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2)
    torch.testing.assert_close(fitnet_hint(fs, ft, identity_regressor(3)), feature_mse(fs, ft))
    vs, vt = randn(5, 3, seed=3), randn(5, 3, seed=4)
    torch.testing.assert_close(fitnet_hint(vs, vt, identity_regressor(3, spatial=False)), feature_mse(vs, vt))


@pytest.mark.parametrize("s_hw,t_hw", [((8, 8), (4, 4)), ((3, 5), (7, 6)), ((4, 4), (4, 4))])
def test_fitnet_hint_resizes_and_matches_manual(s_hw, t_hw):
    b, cs, ct = 2, 3, 5
    fs, ft = randn(b, cs, *s_hw, seed=1), randn(b, ct, *t_hw, seed=2)
    reg = init_regressor(cs, ct, generator=gen(9), dtype=F64)
    w, bias = reg["weight"].numpy()[:, :, 0, 0], reg["bias"].numpy()
    regressed = np.einsum("oc,bchw->bohw", w, fs.numpy()) + bias[None, :, None, None]
    if s_hw != t_hw:
        regressed = np_bilinear(regressed, *t_hw)
    expected = float(np.mean((regressed - ft.numpy()) ** 2))
    assert fitnet_hint(fs, ft, reg).item() == pytest.approx(expected, rel=1e-12)
    # gradients reach the student and the regressor, not the teacher
    g_s, g_t, g_r = grad(fitnet_hint, argnums=(0, 1, 2))(fs, ft, reg)
    assert g_s.shape == fs.shape and torch.count_nonzero(g_s) > 0
    assert torch.count_nonzero(g_t) == 0
    assert g_r["weight"].shape == reg["weight"].shape and torch.count_nonzero(g_r["bias"]) > 0


def test_fitnet_hint_linear_regressor_matches_manual():
    vs, vt = randn(4, 6, seed=1), randn(4, 3, seed=2)
    reg = init_regressor(6, 3, spatial=False, generator=gen(2), dtype=F64)
    manual = vs.numpy() @ reg["weight"].numpy().T + reg["bias"].numpy()
    expected = float(np.mean((manual - vt.numpy()) ** 2))
    assert fitnet_hint(vs, vt, reg).item() == pytest.approx(expected, rel=1e-12)


def test_fitnet_hint_shape_errors():
    reg = init_regressor(3, 5)
    with pytest.raises(ValueError, match=r"\(2, 4, 8, 8\).*4 channels.*expects 3"):
        fitnet_hint(torch.zeros(2, 4, 8, 8), torch.zeros(2, 5, 4, 4), reg)
    with pytest.raises(ValueError, match=r"regressed student_feat.*\(2, 5, 4, 4\).*\(2, 6, 4, 4\)"):
        fitnet_hint(torch.zeros(2, 3, 8, 8), torch.zeros(2, 6, 4, 4), reg)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        fitnet_hint(torch.zeros(2, 3), torch.zeros(2, 5), reg)


def test_feature_kd_equals_notebook_and_weighted_sum():
    s, t, y = logits_and_labels(b=4, c=10, seed=2)
    fs, ft = randn(4, 8, 3, 3, seed=3), randn(4, 8, 3, 3, seed=4)
    expected = feature_distillation_loss(s, t, fs, ft, y)  # alpha=0.7, beta=0.3
    torch.testing.assert_close(feature_kd(s, y, fs, ft), expected)
    loss, metrics = weighted_sum(
        {"ce": cross_entropy(s, y), "feature": feature_mse(fs, ft)}, {"ce": 0.7, "feature": 0.3}
    )
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["feature"], F.mse_loss(fs, ft))
    # with a regressor the feature term becomes the FitNets hint
    ft_wide = randn(4, 16, 6, 6, seed=5)
    reg = init_regressor(8, 16, generator=gen(0), dtype=F64)
    torch.testing.assert_close(
        feature_kd(s, y, fs, ft_wide, reg, alpha=0.5, beta=2.0),
        0.5 * cross_entropy(s, y) + 2.0 * fitnet_hint(fs, ft_wide, reg),
    )


# --- attention ---------------------------------------------------------------------------------


def test_attention_map_matches_numpy_and_reference_formula():
    f = randn(3, 4, 5, 6, seed=1)
    q = attention_map(f)
    assert q.shape == (3, 30)
    np.testing.assert_allclose(q.numpy(), np_attention(f.numpy()), rtol=1e-12)
    # szagoruyko/attention-transfer: F.normalize(x.pow(2).mean(1).view(x.size(0), -1))
    torch.testing.assert_close(q, F.normalize(f.pow(2).mean(1).view(f.size(0), -1)))
    torch.testing.assert_close(torch.linalg.vector_norm(q, dim=1), torch.ones(3, dtype=F64))
    np.testing.assert_allclose(attention_map(f, p=3.0).numpy(), np_attention(f.numpy(), 3.0), rtol=1e-12)


def test_attention_transfer_matches_manual_with_differing_channels():
    fs = [randn(2, 4, 6, 6, seed=1), randn(2, 8, 3, 3, seed=2)]
    ft = [randn(2, 16, 6, 6, seed=3), randn(2, 32, 3, 3, seed=4)]
    out = attention_transfer(fs, ft)
    assert out.shape == ()
    expected = np_attention_transfer([f.numpy() for f in fs], [f.numpy() for f in ft])
    assert out.item() == pytest.approx(expected, rel=1e-12)
    reference = sum(
        (F.normalize(x.pow(2).mean(1).view(x.size(0), -1)) - F.normalize(z.pow(2).mean(1).view(z.size(0), -1)))
        .pow(2)
        .mean()
        for x, z in zip(fs, ft)
    )
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(attention_transfer(tuple(fs), tuple(ft)), out)


def test_attention_transfer_zero_for_identical_and_accepts_single_tensors():
    f = randn(2, 4, 5, 5, seed=1)
    assert attention_transfer([f], [f.clone()]).item() == pytest.approx(0.0, abs=1e-15)
    assert attention_transfer(f, f.clone()).item() == pytest.approx(0.0, abs=1e-15)
    # the maps are channel-free: scaling channels uniformly or duplicating them changes nothing
    assert attention_transfer(f, torch.cat([f, f], dim=1) * 3).item() == pytest.approx(0.0, abs=1e-14)


@pytest.mark.parametrize("s_hw,t_hw", [((8, 8), (4, 4)), ((3, 5), (6, 4))])
def test_attention_transfer_resizes_student_map(s_hw, t_hw):
    fs, ft = randn(2, 3, *s_hw, seed=1), randn(2, 7, *t_hw, seed=2)
    out = attention_transfer(fs, ft)
    expected = np_attention_transfer([fs.numpy()], [ft.numpy()])
    assert out.item() == pytest.approx(expected, rel=1e-12)
    g_s, g_t = grad(attention_transfer, argnums=(0, 1))(fs, ft)
    assert g_s.shape == fs.shape and torch.count_nonzero(g_s) > 0
    assert torch.count_nonzero(g_t) == 0


def test_attention_resize_by_two_is_average_pooling():
    # the documented claim: bilinear (align_corners=False) at exactly 1/2 size == 2x2 mean
    fs = randn(2, 3, 8, 8, seed=1)
    pooled = F.avg_pool2d(fs.pow(2).mean(1, keepdim=True), 2).flatten(1)
    torch.testing.assert_close(attention_map(fs, size=(4, 4)), F.normalize(pooled))


def test_attention_transfer_errors():
    f = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="2 student feature maps but 1 teacher"):
        attention_transfer([f, f], [f])
    with pytest.raises(ValueError, match="at least one"):
        attention_transfer([], [])
    with pytest.raises(ValueError, match=r"pair 0.*\(2, 3, 4, 4\).*\(3, 3, 4, 4\)"):
        attention_transfer(f, torch.zeros(3, 3, 4, 4))
    with pytest.raises(TypeError):
        attention_transfer({"a": f}, {"a": f})


# --- weighted_sum ------------------------------------------------------------------------------


def test_weighted_sum_values_metrics_and_grad():
    a, b = torch.tensor(2.0, dtype=F64), torch.tensor(5.0, dtype=F64)

    def f(a, b):
        return weighted_sum({"a": a * a, "b": b}, {"a": 0.5, "b": torch.tensor(3.0, dtype=F64)})

    loss, metrics = f(a, b)
    assert loss.item() == pytest.approx(0.5 * 4 + 3 * 5)
    assert metrics["a"].item() == 4.0 and metrics["b"].item() == 5.0
    assert metrics["loss"].item() == pytest.approx(17.0)
    assert all(not m.requires_grad for m in metrics.values())
    (g_a, g_b), aux = grad(f, argnums=(0, 1), has_aux=True)(a, b)
    assert g_a.item() == pytest.approx(2.0) and g_b.item() == pytest.approx(3.0)
    assert aux["loss"].item() == pytest.approx(17.0)


def test_weighted_sum_rejects_mismatched_names():
    with pytest.raises(ValueError, match=r"no weight for \['b'\].*no term for \['c'\]"):
        weighted_sum({"a": torch.tensor(1.0), "b": torch.tensor(1.0)}, {"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="reserved"):
        weighted_sum({"loss": torch.tensor(1.0)}, {"loss": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        weighted_sum({}, {})


# --- the functional contract -------------------------------------------------------------------


def example_inputs():
    s, t, y = logits_and_labels(b=4, c=6, seed=1)
    fs, ft = randn(4, 3, 8, 8, seed=2), randn(4, 5, 4, 4, seed=3)
    reg = init_regressor(3, 5, generator=gen(4), dtype=F64)
    return s, t, y, fs, ft, reg


def all_terms(s, t, y, fs, ft, reg, T):
    terms = {
        "kd": soft_target_kl(s, t, T),
        "ce": cross_entropy(s, y),
        "blend": blended_kd(s, t, y, T, 0.7),
        "hint": fitnet_hint(fs, ft, reg),
        "feat": feature_mse(ft * 0.5, ft),
        "at": attention_transfer([fs, ft], [ft, ft]),
    }
    return weighted_sum(terms, {k: 1.0 for k in terms})


def test_inputs_not_mutated():
    inputs = example_inputs()
    s, t, y, fs, ft, reg = inputs
    tensors = [s, t, y, fs, ft, reg["weight"], reg["bias"]]
    copies = [x.clone() for x in tensors]
    versions = [x._version for x in tensors]
    all_terms(*inputs, 2.0)
    grad(lambda *a: all_terms(*a, 2.0)[0], argnums=(0, 3, 5))(*inputs)
    feature_kd(s, y, fs, ft, reg)
    for x, c, v in zip(tensors, copies, versions):
        assert torch.equal(x, c)
        assert x._version == v


def test_vmap_over_ensemble_axis_matches_loop():
    e = 3
    s = torch.stack([logits_and_labels(seed=i)[0] for i in range(e)])
    t = torch.stack([logits_and_labels(seed=10 + i)[1] for i in range(e)])
    y = logits_and_labels()[2]
    fs = torch.stack([randn(5, 3, 8, 8, seed=20 + i) for i in range(e)])
    ft = torch.stack([randn(5, 4, 4, 4, seed=30 + i) for i in range(e)])
    regs = [init_regressor(3, 4, generator=gen(i), dtype=F64) for i in range(e)]
    reg = {k: torch.stack([r[k] for r in regs]) for k in ("weight", "bias")}

    cases = [
        (lambda s, t: soft_target_kl(s, t, 2.0), (s, t)),
        (lambda s: cross_entropy(s, y), (s,)),
        (lambda s, t: blended_kd(s, t, y), (s, t)),
        (feature_mse, (ft.roll(1, dims=1), ft)),
        (fitnet_hint, (fs, ft, reg)),
        (lambda a, b: attention_transfer([a], [b]), (fs, ft)),
    ]
    for fn, args in cases:
        batched = vmap(fn)(*args)
        looped = torch.stack(
            [fn(*[{k: v[i] for k, v in a.items()} if isinstance(a, dict) else a[i] for a in args]) for i in range(e)]
        )
        torch.testing.assert_close(batched, looped)


def test_vmap_per_sample_mean_equals_batch_loss():
    s, t, y, fs, ft, reg = example_inputs()
    cases = [
        (lambda s, t: soft_target_kl(s, t, 2.0), (s, t), (0, 0)),
        (cross_entropy, (s, y), (0, 0)),
        (lambda s, t, y: blended_kd(s, t, y), (s, t, y), (0, 0, 0)),
        (feature_mse, (ft * 2, ft), (0, 0)),
        (fitnet_hint, (fs, ft, reg), (0, 0, None)),
        (lambda a, b: attention_transfer(a, b), (fs, ft), (0, 0)),
    ]
    for fn, args, in_dims in cases:
        per_sample = vmap(fn, in_dims=in_dims)(*args)
        assert per_sample.shape == (s.shape[0],)
        torch.testing.assert_close(per_sample.mean(), fn(*args))


def test_torch_compile_matches_eager_without_graph_breaks():
    inputs = example_inputs()
    T = torch.tensor(2.0, dtype=F64)
    compiled = torch.compile(all_terms, backend="eager", fullgraph=True)
    loss_c, metrics_c = compiled(*inputs, T)
    loss_e, metrics_e = all_terms(*inputs, T)
    torch.testing.assert_close(loss_c, loss_e)
    for k in metrics_e:
        torch.testing.assert_close(metrics_c[k], metrics_e[k])

    step = torch.compile(grad(lambda *a: all_terms(*a), argnums=(0, 5), has_aux=True), backend="eager", fullgraph=True)
    (g_s, g_reg), _ = step(*inputs, T)
    (e_s, e_reg), _ = grad(lambda *a: all_terms(*a), argnums=(0, 5), has_aux=True)(*inputs, T)
    torch.testing.assert_close(g_s, e_s)
    torch.testing.assert_close(g_reg["weight"], e_reg["weight"])
