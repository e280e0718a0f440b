"""The imperative baseline: distillation as users write it without fkd (the seed notebook's style).

This module exists for ``bench/harness.py`` only, and lives outside the ``fkd`` package because it
registers forward hooks, which the package itself never does. It is deliberately *not* functional: ``nn.Module``
objects own their weights, the teacher's features are captured with forward hooks (the notebook's
``feature_store``), gradients come from ``loss.backward()`` and the update from ``torch.optim``. It is
nonetheless written as well as that style allows, so that the benchmark compares fkd with a fair
opponent rather than a straw man:

* ``torch.optim`` with ``foreach=True`` and ``zero_grad(set_to_none=True)``;
* the teacher in eval mode under ``torch.no_grad()``;
* no ``loss.item()`` per step (the loss is returned as a device tensor);
* the same autocast (bf16) and channels_last choices as fkd's step.

The loss is the config's objective rewritten with ``torch.nn.functional`` as the notebook writes it
(``F.kl_div(..., reduction="batchmean") * T * T``, ``F.mse_loss`` after a ``nn.Conv2d`` 1x1 regressor
and ``F.interpolate``, attention maps as in Zagoruyko & Komodakis' reference code). It is an
independent implementation on purpose: ``tests/test_bench.py`` checks that it equals
:class:`fkd.objective.Objective` on the same weights and batch, so the benchmark is apples to apples. A
term it cannot express (:data:`IMPERATIVE_TERMS`) makes the bench skip the imperative variant.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fkd.config import OptimizerConfig
from fkd.errors import ConfigError
from fkd.models import Model, build_module
from fkd.objective import Objective
from fkd.terms import pair_key


def module_from(model: Model, params: dict, buffers: dict, device) -> nn.Module:
    """A real ``nn.Module`` of ``model``'s architecture holding copies of ``params`` and ``buffers``."""
    spec = model.spec
    # the same lookup as fkd.models.build_model: a registered architecture, else a torchvision classifier
    options = {k: v for k, v in spec.items() if k not in ("arch", "num_classes", "image_size")}
    module = build_module(spec["arch"], spec["num_classes"], spec["image_size"], **options)
    # fkd's parameter names are the module's own (FX extractors keep them), so the state dict loads as is.
    module.load_state_dict({**params, **buffers}, strict=True)
    return module.to(device)


class FeatureTap:
    """The notebook's forward hooks: ``outputs(x) -> (logits, {name: feature})`` for any module.

    fkd's own students return ``(logits, features)`` from ``forward`` (as the notebook's student does);
    for them the returned dict is used. Any other module (a torchvision teacher) gets one forward hook
    per feature on the submodule of that name, storing its output in ``self.store``.
    """

    def __init__(self, module: nn.Module, names: tuple[str, ...], probe: torch.Tensor | None = None):
        self.module = module
        self.names = tuple(dict.fromkeys(names))  # a feature matched twice is captured once
        self.store: dict[str, torch.Tensor] = {}
        self.handles = []
        self.own = getattr(module, "feature_names", None) is not None
        if self.own or not self.names:
            return
        for name in self.names:
            try:
                sub = module.get_submodule(name)
            except AttributeError:
                raise ConfigError(
                    f"the imperative baseline captures features with forward hooks, and '{name}' is not a "
                    f"submodule of {type(module).__name__}; pick a module name such as layer1."
                ) from None
            self.handles.append(sub.register_forward_hook(self._hook(name)))
        if probe is not None:
            self._check_once(probe)

    def _hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            self.store[name] = output

        return hook

    def _check_once(self, probe: torch.Tensor) -> None:
        # A module called twice per forward (ResNet's shared ReLU) would hand back its last call, not the
        # FX node fkd matches; refuse such names rather than compare different tensors.
        calls = {n: 0 for n in self.names}
        counters = [self.module.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: calls.__setitem__(n, calls[n] + 1)) for n in self.names]
        try:
            with torch.no_grad():
                self.module(probe)
        finally:
            for handle in counters:
                handle.remove()
            self.store.clear()
        twice = [n for n, c in calls.items() if c != 1]
        if twice:
            raise ConfigError(
                f"feature '{twice[0]}' is a module called {calls[twice[0]]} times per forward, so a hook cannot "
                "capture the tensor fkd uses; pick a block output such as layer1."
            )

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.module(x)
        if isinstance(out, tuple):
            logits, returned = out
            return logits, {n: returned[n] for n in self.names}
        feats = {n: self.store[n] for n in self.names}
        self.store.clear()  # drop the references, as the notebook's feature_store would not
        return out, feats

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def attention_map(feat: torch.Tensor, p: float, size=None) -> torch.Tensor:
    """Zagoruyko & Komodakis' ``at(x)``: channel mean of ``|x|^p``, flattened and L2-normalised."""
    q = feat.abs().pow(p).mean(1, keepdim=True)
    if size is not None and tuple(q.shape[-2:]) != tuple(size):
        q = F.interpolate(q, size=tuple(size), mode="bilinear", align_corners=False)
    return F.normalize(q.flatten(1))


def _cross_entropy(term, s_logits, s_feats, labels, t_logits, t_feats, regressors):
    return F.cross_entropy(s_logits, labels)


def _soft_target_kl(term, s_logits, s_feats, labels, t_logits, t_feats, regressors):
    T = term.temperature
    soft = F.kl_div(F.log_softmax(s_logits / T, dim=1), F.softmax(t_logits / T, dim=1), reduction="batchmean")
    return soft * (T * T)


def _fitnets_hint(term, s_logits, s_feats, labels, t_logits, t_feats, regressors):
    hints = []
    for s, t in term.pairs:
        f_t = t_feats[t]
        regressed = regressors[pair_key(s, t)](s_feats[s])
        if regressed.ndim == 4 and regressed.shape[-2:] != f_t.shape[-2:]:
            regressed = F.interpolate(regressed, size=f_t.shape[-2:], mode="bilinear", align_corners=False)
        hints.append(F.mse_loss(regressed, f_t.detach()))
    return sum(hints) / len(hints)


def _attention_transfer(term, s_logits, s_feats, labels, t_logits, t_feats, regressors):
    return sum(
        (attention_map(s_feats[s], term.p, t_feats[t].shape[-2:]) - attention_map(t_feats[t].detach(), term.p))
        .pow(2).mean()
        for s, t in term.pairs
    )


#: The loss terms this baseline can express, by registered name. A term missing here is not timed
#: imperatively (see :func:`unsupported_terms`): timing another loss would make the comparison meaningless.
IMPERATIVE_TERMS: dict[str, Callable] = {
    "ce": _cross_entropy,
    "logit": _soft_target_kl,
    "feature": _fitnets_hint,
    "attention": _attention_transfer,
}


def unsupported_terms(objective: Objective) -> list[str]:
    """The objective's terms this baseline cannot express (the bench then skips the imperative variant)."""
    return [t.name for t in objective.terms if t.name not in IMPERATIVE_TERMS]


def distillation_loss(
    objective: Objective,
    s_logits: torch.Tensor,
    s_feats: dict,
    labels: torch.Tensor,
    t_logits: torch.Tensor | None,
    t_feats: dict,
    regressors: dict[str, nn.Module],
) -> torch.Tensor:
    """The objective written the notebook's way: ``sum_k w_k * term_k`` with ``torch.nn.functional``."""
    loss = torch.zeros((), device=s_logits.device)
    for t in objective.terms:
        loss = loss + t.weight * IMPERATIVE_TERMS[t.name](t.term, s_logits, s_feats, labels, t_logits, t_feats,
                                                          regressors)
    return loss


def regressor_modules(regressors: dict, device) -> dict[str, nn.Module]:
    """fkd's regressor dicts as ``nn.Conv2d(Cs, Ct, 1)`` / ``nn.Linear(Cs, Ct)`` modules with the same weights.

    A plain dict keyed like fkd's (``"block2->layer1"``): an ``nn.ModuleDict`` refuses keys with dots,
    which FX feature names such as ``layer2.1`` bring.
    """
    modules = {}
    for key, reg in regressors.items():
        weight = reg["weight"]
        if weight.ndim == 4:
            module = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=1)
        else:
            module = nn.Linear(weight.shape[1], weight.shape[0])
        module.load_state_dict({"weight": weight, "bias": reg["bias"]})
        modules[key] = module.to(device)
    return modules


TORCH_OPTIMIZERS: dict[str, Callable[[list, OptimizerConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, cfg: torch.optim.SGD(
        params, lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay, foreach=True),
    "adam": lambda params, cfg: torch.optim.Adam(
        params, lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps, weight_decay=cfg.weight_decay,
        foreach=True),
    "adamw": lambda params, cfg: torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps, weight_decay=cfg.weight_decay,
        foreach=True),
}
"""The ``torch.optim`` counterpart of each optimizer in :data:`fkd.optim.OPTIMIZERS`."""


def torch_optimizer(cfg: OptimizerConfig, parameters, schedule=None):
    """``torch.optim`` counterpart of :func:`fkd.optim.optimizer_from_config` (foreach kernels).

    An optimizer with no counterpart in :data:`TORCH_OPTIMIZERS` is a :class:`ConfigError`: timing a
    different optimizer than fkd's would make the comparison meaningless.
    """
    if cfg.name not in TORCH_OPTIMIZERS:
        raise ConfigError(f"the imperative baseline has no torch.optim counterpart of optimizer '{cfg.name}'; "
                          f"it knows {', '.join(TORCH_OPTIMIZERS)}: add one to TORCH_OPTIMIZERS in "
                          "bench/imperative.py or pick one of those.")
    params = list(parameters)
    opt = TORCH_OPTIMIZERS[cfg.name](params, cfg)
    scheduler = None
    if schedule is not None and cfg.schedule != "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: float(schedule(torch.tensor(i))) / cfg.learning_rate)
    return opt, scheduler


class ImperativeDistiller:
    """Student, teacher (with hooks), regressors and ``torch.optim``: one ``train_step`` per batch.

    Built from fkd's functional pieces so that both sides start from identical weights; ``regressors``
    are the ``feature`` term's params (``objective.init(...)[0]["feature"]``).
    """

    def __init__(
        self,
        objective: Objective,
        student: Model,
        student_vars: dict,
        optimizer: OptimizerConfig,
        *,
        teacher: Model | None = None,
        teacher_vars: dict | None = None,
        regressors: dict | None = None,
        schedule=None,
        precision: str = "fp32",
        channels_last: bool = False,
        device="cpu",
    ):
        device = torch.device(device)
        self.objective = objective
        self.device_type = device.type
        self.precision = precision
        self.channels_last = channels_last
        self.student = module_from(student, student_vars["params"], student_vars["buffers"], device).train()
        self.regressors = regressor_modules(regressors or {}, device)
        probe = torch.zeros(1, 3, student.image_size, student.image_size, device=device)
        self.teacher = None
        unsupported = unsupported_terms(objective)
        if unsupported:
            raise ConfigError(f"the imperative baseline cannot express the loss term(s) {', '.join(unsupported)}; "
                              f"it knows {', '.join(IMPERATIVE_TERMS)}.")
        if objective.needs_teacher:
            if teacher is None or teacher_vars is None:
                raise ValueError("the objective needs the teacher: pass teacher and teacher_vars")
            self.teacher = module_from(teacher, teacher_vars["params"], teacher_vars["buffers"], device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        if channels_last:
            for module in (self.student, self.teacher, *self.regressors.values()):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        self.student_tap = FeatureTap(self.student, objective.student_feature_names)
        self.teacher_tap = (FeatureTap(self.teacher, objective.teacher_feature_names, probe)
                            if self.teacher is not None else None)
        self.trainable = list(self.student.parameters()) + [
            p for module in self.regressors.values() for p in module.parameters()]
        self.clip_norm = optimizer.clip_norm
        self.optimizer, self.scheduler = torch_optimizer(optimizer, self.trainable, schedule)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The objective on one batch (a differentiable 0-d tensor); the teacher runs under no_grad."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t_logits, t_feats = None, {}
        if self.teacher is not None:
            with torch.no_grad(), self._autocast():
                t_logits, t_feats = self.teacher_tap.outputs(x)
            t_logits, t_feats = t_logits.float(), {k: v.float() for k, v in t_feats.items()}
        with self._autocast():
            s_logits, s_feats = self.student_tap.outputs(x)
        s_logits, s_feats = s_logits.float(), {k: v.float() for k, v in s_feats.items()}
        return distillation_loss(self.objective, s_logits, s_feats, y, t_logits, t_feats, self.regressors)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``zero_grad``, forward, ``loss.backward()``, ``optimizer.step()``; returns the detached loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        loss.backward()
        if self.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.clip_norm, foreach=True)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.detach()

    def close(self) -> None:
        """Remove the hooks (the notebook's ``handle.remove()``)."""
        self.student_tap.remove()
        if self.teacher_tap is not None:
            self.teacher_tap.remove()
