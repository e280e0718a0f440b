"""Several teachers as one model: ``apply`` returns their logits stacked on a teacher axis.

A :class:`TeacherEnsemble` has the part of :class:`fkd.models.Model`'s interface a teacher needs --
``apply``, ``features_fn``, ``feature_names``, ``num_classes`` -- so the step, the teacher cache and the
evaluation treat M teachers as they treat one:

* ``params`` / ``buffers`` are ``{teacher name: that teacher's flat dict}``;
* logits come back as ``(B, M, K)`` (batch first, as every per-example tensor in fkd, so caches, batch
  slices and data parallelism need nothing new); the objective reads one teacher's ``[:, m]`` or mixes
  them (:func:`fkd.losses.ensemble_logits`);
* features are named ``"<teacher>:<feature>"`` (``"a:layer2"``): each teacher is built with only its own
  features, and each stops after its last one when no term reads its logits.
"""

from __future__ import annotations

from typing import Callable

import attrs
import torch

SEP = ":"


def split_features(names) -> dict[str, tuple[str, ...]]:
    """``["a:layer2", "b:layer3", "a:layer1"]`` -> ``{"a": ("layer2", "layer1"), "b": ("layer3",)}``."""
    out: dict[str, list[str]] = {}
    for name in names:
        teacher, sep, feature = name.partition(SEP)
        if not sep:
            raise ValueError(f"an ensemble's feature name is '<teacher>{SEP}<feature>', not {name!r}")
        out.setdefault(teacher, []).append(feature)
    return {k: tuple(v) for k, v in out.items()}


def apply_each(names, members, params: dict, buffers: dict, x: torch.Tensor, train: bool):
    """Every member's forward pass on ``x``: ``([logits], {"<name>:<feature>": tensor}, {name: new buffers})``."""
    logits, features, new_buffers = [], {}, {}
    for name, member in zip(names, members):
        z, f, b = member.apply(params[name], buffers[name], x, train=train)
        logits.append(z)
        features.update({f"{name}{SEP}{k}": v for k, v in f.items()})
        new_buffers[name] = b
    return logits, features, new_buffers


@attrs.frozen(eq=False)
class TeacherEnsemble:
    """``names[m]``'s template is ``members[m]``; see the module docstring."""

    names: tuple
    members: tuple

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes

    @property
    def arch(self) -> str:
        return " + ".join(f"{n} ({m.arch})" for n, m in zip(self.names, self.members))

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f"{n}{SEP}{f}" for n, m in zip(self.names, self.members) for f in m.feature_names)

    def apply(self, params: dict, buffers: dict, x: torch.Tensor, *, train: bool = False):
        """``x`` (B, 3, H, W) -> ``(logits (B, M, K), {"<teacher>:<feature>": tensor}, new buffers)``."""
        logits, features, new_buffers = apply_each(self.names, self.members, params, buffers, x, train)
        return torch.stack(logits, dim=1), features, new_buffers

    def features_fn(self) -> Callable:
        """``fn(params, buffers, x) -> {"<teacher>:<feature>": tensor}``: each teacher cut after its last
        feature (:meth:`fkd.models.Model.features_fn`); teachers without features do not run."""
        parts = [(name, member.features_fn()) for name, member in zip(self.names, self.members) if member.feature_names]

        def features(params: dict, buffers: dict, x: torch.Tensor) -> dict:
            out = {}
            for name, fn in parts:
                out.update({f"{name}{SEP}{k}": v for k, v in fn(params[name], buffers[name], x).items()})
            return out

        return features
