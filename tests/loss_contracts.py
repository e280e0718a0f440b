"""The functional contract every distillation loss in ``fkd.losses`` keeps, as checks the method test files share.

A case is ``(fn(student, teacher) -> 0-d loss, student, teacher)``: gradients flow into the student only.
"""

from __future__ import annotations

import torch
from torch.func import grad, vmap


def assert_pure_and_teacher_constant(fn, s, t, *unchanged: torch.Tensor) -> None:
    """A finite 0-d loss; the inputs (and ``unchanged``, e.g. labels) untouched; no gradient reaches the
    teacher, some reaches the student."""
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    before = [s.detach().clone(), t.detach().clone(), *(u.clone() for u in unchanged)]
    loss = fn(s, t)
    loss.backward()
    assert loss.shape == () and torch.isfinite(loss)
    for now, then in zip([s.detach(), t.detach(), *unchanged], before):
        assert torch.equal(now, then)
    assert t.grad is None or torch.all(t.grad == 0)  # no gradient reaches the teacher
    assert s.grad is not None and s.grad.abs().sum() > 0


def stack_members(x: torch.Tensor, n: int = 3) -> torch.Tensor:
    """``n`` distinct copies of ``x`` stacked on a new leading axis (a population's members)."""
    return torch.stack([x * (1 + 0.3 * i) + 0.1 * i for i in range(n)])


def assert_vmap_equals_loop(fn, s, t, *, grads: bool = False) -> None:
    """``vmap(fn)`` over stacked students and teachers -- and over stacked students with one teacher, a
    sweep's case -- equals a Python loop; with ``grads``, so do the students' gradients."""
    students, teachers = stack_members(s), stack_members(t)
    assert torch.allclose(vmap(fn)(students, teachers), torch.stack([fn(a, b) for a, b in zip(students, teachers)]))
    assert torch.allclose(vmap(fn, in_dims=(0, None))(students, t), torch.stack([fn(a, t) for a in students]))
    if grads:
        batched = vmap(grad(fn), in_dims=(0, None))(students, t)
        assert torch.allclose(batched, torch.stack([grad(fn)(a, t) for a in students]))
