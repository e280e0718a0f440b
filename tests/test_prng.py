"""fkd.prng: keys are explicit tensors; the same key gives the same numbers eagerly, compiled and vmapped."""

from __future__ import annotations

import pytest
import torch

from fkd import prng


def test_same_key_same_numbers_different_keys_different_numbers():
    key = prng.key_from_seed(3)
    assert key.dtype == torch.int64 and key.ndim == 0
    a, b = prng.uniform(key, (1000,)), prng.uniform(prng.key_from_seed(3), (1000,))
    assert torch.equal(a, b)
    assert not torch.equal(a, prng.uniform(prng.key_from_seed(4), (1000,)))
    # Folding in the step gives a new stream per step; the same step gives the same stream.
    s1, s2 = prng.fold_in(key, 1), prng.fold_in(key, 2)
    assert not torch.equal(prng.uniform(s1, (8,)), prng.uniform(s2, (8,)))
    assert torch.equal(prng.fold_in(key, torch.tensor(2)), s2)


def test_uniform_and_randint_have_the_right_range_and_spread():
    u = prng.uniform(prng.key_from_seed(0), (100_000,))
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    r = prng.randint(prng.key_from_seed(1), (50_000,), 7)
    assert r.dtype == torch.int64 and r.min() == 0 and r.max() == 6
    counts = torch.bincount(r, minlength=7).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.05
    # Neighbouring counters are not correlated (a weak hash would show it here).
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.02
    with pytest.raises(ValueError, match="high"):
        prng.randint(prng.key_from_seed(1), (3,), 0)


def test_vmap_over_keys_equals_one_call_per_key():
    keys = torch.stack([prng.key_from_seed(s) for s in range(3)])
    batched = torch.func.vmap(lambda k: prng.uniform(prng.fold_in(k, 5), (4,)))(keys)
    for i in range(3):
        assert torch.equal(batched[i], prng.uniform(prng.fold_in(keys[i], 5), (4,)))


def test_compiled_equals_eager(one_thread):
    def draw(key, step):
        k = prng.fold_in(key, step)
        return prng.uniform(k, (64,)), prng.randint(k, (16,), 1000)

    key, step = prng.key_from_seed(7), torch.tensor(11)
    eager = draw(key, step)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(draw, fullgraph=True)(key, step)
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
