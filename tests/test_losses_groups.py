"""The group losses (ensembles, cohorts) and ``fkd.optim.ema_update`` against float64 loops written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import grad, vmap

from fkd import losses
from fkd.optim import ema_update

from tests.test_losses_methods import F64, np_softmax, randn


def ref_ensemble(z, T, w):
    """z: (M, B, C) numpy; w: None, (M,) or (M, B)."""
    m, b, c = z.shape
    out = np.zeros((b, c))
    for bi in range(b):
        ws = np.ones(m) if w is None else (w if w.ndim == 1 else w[:, bi])
        ws = ws / ws.sum()
        for mi in range(m):
            out[bi] += ws[mi] * np_softmax(z[mi, bi] / T)
    return out


@pytest.mark.parametrize("weights", [None, "teacher", "example"])
def test_ensemble_distribution_matches_loop(weights):
    z = randn(3, 5, 7, scale=3.0)
    w = {None: None, "teacher": torch.tensor([1.0, 2.0, 5.0], dtype=F64),
         "example": randn(3, 5, seed=1).abs() + 0.1}[weights]
    got = losses.ensemble_distribution(z, 2.5, w)
    want = ref_ensemble(z.numpy(), 2.5, None if w is None else w.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, rtol=1e-12)


def test_ensemble_logits_give_the_ensemble_at_their_temperature():
    z = randn(2, 4, 6, scale=4.0)
    p = losses.ensemble_distribution(z, 3.0)
    assert torch.allclose(torch.softmax(losses.ensemble_logits(z, 3.0) / 3.0, -1), p, atol=1e-14)
    # KD against the ensemble logits is KL to the mixture
    s = randn(4, 6, seed=3)
    want = 9.0 * (p * (p.log() - torch.log_softmax(s / 3.0, -1))).sum(-1).mean()
    assert torch.allclose(losses.soft_target_kl(s, losses.ensemble_logits(z, 3.0), 3.0), want, atol=1e-12)


def test_ensemble_is_a_constant_and_pure():
    z = randn(2, 4, 6).requires_grad_()
    before = z.detach().clone()
    out = losses.ensemble_distribution(z, 2.0)
    assert not out.requires_grad and torch.equal(z.detach(), before)


def test_confidence_weights_match_ca_mkd():
    z = randn(3, 6, 5, scale=2.0)
    y = torch.tensor([0, 1, 2, 3, -1, 4])
    got = losses.confidence_weights(z, y).numpy()
    zn = z.numpy()
    for b in range(6):
        if y[b] < 0:
            np.testing.assert_allclose(got[:, b], 1 / 3)
            continue
        ce = np.array([-math.log(np_softmax(zn[m, b])[y[b]]) for m in range(3)])
        soft = np.exp(ce) / np.exp(ce).sum()
        np.testing.assert_allclose(got[:, b], (1 - soft) / 2, rtol=1e-12)
    np.testing.assert_allclose(got.sum(0), 1.0, rtol=1e-12)


def ref_mutual(z, T):
    k, b, c = z.shape
    out = []
    for m in range(k):
        total = 0.0
        for j in range(k):
            if j == m:
                continue
            for bi in range(b):
                p, q = np_softmax(z[j, bi] / T), np_softmax(z[m, bi] / T)
                total += float((p * (np.log(p) - np.log(q))).sum())
        out.append(T * T * total / b / (k - 1))
    return np.array(out)


@pytest.mark.parametrize("k", [2, 4])
def test_mutual_learning_matches_loop(k):
    z = randn(k, 5, 6, scale=2.0)
    np.testing.assert_allclose(losses.mutual_learning(z, 2.0).numpy(), ref_mutual(z.numpy(), 2.0), rtol=1e-10)


def test_mutual_learning_gradient_stays_with_its_member():
    z = randn(3, 4, 5, scale=2.0)
    for k in range(3):
        g = grad(lambda zz: losses.mutual_learning(zz, 1.5)[k])(z)
        for j in range(3):
            if j != k:
                assert torch.count_nonzero(g[j]) == 0
        # member k's own gradient: T * (q - mean_j p_j) / B over the peers (Hinton et al.'s dKL/dz)
        T = 1.5
        q = torch.softmax(z[k] / T, -1)
        p_mean = torch.stack([torch.softmax(z[j] / T, -1) for j in range(3) if j != k]).mean(0)
        assert torch.allclose(g[k], T * (q - p_mean) / 4, atol=1e-12)


def test_mutual_learning_gradcheck_and_vmap():
    # finite differences see the detached peers move too, so check one member against a fixed cohort
    s, cohort0 = randn(3, 4, seed=5).requires_grad_(), randn(2, 3, 4, seed=6)
    assert torch.autograd.gradcheck(lambda ss: losses.mutual_learning_member(ss, cohort0, 2.0), (s,))
    cohort = randn(3, 4, 5, seed=2)
    per = vmap(losses.mutual_learning_member, in_dims=(0, None, None))(cohort, cohort, 2.0)
    assert torch.allclose(per, losses.mutual_learning(cohort, 2.0), atol=1e-12)


def test_mutual_learning_needs_two():
    with pytest.raises(ValueError, match="at least 2"):
        losses.mutual_learning(randn(1, 2, 3))


def test_ema_update_matches_formula_and_is_pure():
    ema = {"w": randn(3, 2), "b": {"v": randn(4, seed=1)}, "n": torch.tensor(3)}
    new = {"w": randn(3, 2, seed=2), "b": {"v": randn(4, seed=3)}, "n": torch.tensor(7)}
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else {"v": v["v"].clone()}) for k, v in ema.items()}
    out = ema_update(ema, new, 0.9)
    assert torch.allclose(out["w"], 0.9 * ema["w"] + 0.1 * new["w"], atol=1e-14)
    assert torch.allclose(out["b"]["v"], 0.9 * ema["b"]["v"] + 0.1 * new["b"]["v"], atol=1e-14)
    assert out["n"].item() == 7 and out["n"] is not new["n"]
    assert torch.equal(ema["w"], before["w"]) and torch.equal(ema["b"]["v"], before["b"]["v"])
    tensor_decay = ema_update(ema, new, torch.tensor(0.9, dtype=F64))
    assert torch.allclose(tensor_decay["w"], out["w"], atol=1e-14)
