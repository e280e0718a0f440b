"""Several students as one model: ``apply`` returns their logits stacked on a leading member axis.

A :class:`Cohort` (deep mutual learning's students) is trained by the ordinary step as one model: its
``params`` / ``buffers`` are ``{member name: that member's flat dict}``, its logits ``(K, B, C)`` and its
features ``"<member>:<feature>"``; :func:`fkd.objective.over_cohort` gives each member its own terms. Every
member's gradient is its own loss's (the peers' logits are detached), so one optimizer over the whole
pytree updates each member as its own would -- for the element-wise optimizers (SGD, Adam, AdamW); a
``clip_norm`` clips the cohort's global norm.

``vmap = True`` (members of one architecture) stacks the weights and runs one ``torch.func.vmap``-ed
forward, the way a population runs on a GPU; otherwise the members run one after the other.
"""

from __future__ import annotations

from typing import Callable

import attrs
import torch

from fkd.models.ensemble import SEP, apply_each


@attrs.frozen(eq=False)
class Cohort:
    """``names[k]``'s template is ``members[k]``; see the module docstring."""

    names: tuple
    members: tuple
    vmap: bool = False

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes

    @property
    def image_size(self) -> int:
        return self.members[0].image_size

    @property
    def arch(self) -> str:
        archs = [m.arch for m in self.members]
        return f"{len(archs)} x {archs[0]}" if len(set(archs)) == 1 else " + ".join(archs)

    @property
    def spec(self) -> dict:
        return {"cohort": {n: dict(m.spec) for n, m in zip(self.names, self.members)}}

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f"{n}{SEP}{f}" for n, m in zip(self.names, self.members) for f in m.feature_names)

    @property
    def eval_template(self):
        return self.members[0].eval_template

    def member(self, name: str):
        return self.members[self.names.index(name)]

    def apply(self, params: dict, buffers: dict, x: torch.Tensor, *, train: bool):
        """``x`` (B, 3, H, W) -> ``(logits (K, B, C), {"<member>:<feature>": tensor}, {member: new buffers})``."""
        if self.vmap:
            return self._apply_vmapped(params, buffers, x, train)
        logits, features, new_buffers = apply_each(self.names, self.members, params, buffers, x, train)
        return torch.stack(logits), features, new_buffers

    def _apply_vmapped(self, params, buffers, x, train):
        stack = lambda tree: {k: torch.stack([tree[n][k] for n in self.names]) for k in tree[self.names[0]]}  # noqa: E731
        member = self.members[0]
        logits, feats, new = torch.func.vmap(lambda p, b: member.apply(p, b, x, train=train), randomness="same")(
            stack(params), stack(buffers))
        features = {f"{n}{SEP}{k}": v[i] for k, v in feats.items() for i, n in enumerate(self.names)}
        return logits, features, {n: {k: v[i] for k, v in new.items()} for i, n in enumerate(self.names)}

    def features_fn(self) -> Callable:
        return lambda params, buffers, x: self.apply(params, buffers, x, train=False)[1]
