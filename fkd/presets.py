"""Distillation presets: ``distill.method = "logit"`` (and friends) as shorthand for term tables.

A preset is a pure function of a few numbers to ``{term: {"weight": w, **keys}}`` tables, applied once,
when a config is read (:func:`expand_preset`); past loading, ``[distill.terms]`` is the only form and
``distill.method`` is ``"terms"``. The expansion gives the same losses as the presets always did:

============  ===================================================================
``none``      ce 1                                     (the baseline student)
``logit``     ce ``1 - alpha``, logit ``alpha`` at T = ``temperature``  (Hinton et al. 2015)
``feature``   ce ``alpha``, feature ``beta``           (FitNets; the notebook's weights)
``attention`` ce 1, attention ``beta`` with p = ``attention_p``  (Zagoruyko & Komodakis 2017)
``combined``  ``weights[term]`` per term, with ``temperature`` / ``attention_p``
============  ===================================================================

Dict in, dict out: no torch, no registry of terms (unknown term names fail when the objective is
built, :mod:`fkd.build`).
"""

from __future__ import annotations

from typing import Any

import attrs

from fkd.errors import ConfigError
from fkd.registry import Registry
from fkd.schema import build_attrs, field, non_negative, positive, unit_interval


@attrs.frozen
class PresetSettings:
    """The numbers a preset reads (``[distill]`` keys that exist only as shorthand)."""

    temperature: float = field(2.0, positive, help="presets: softmax temperature T of the KD term")
    alpha: float = field(0.7, unit_interval, help="logit: weight of KD; feature: weight of CE")
    beta: float = field(0.3, non_negative, help="feature / attention: weight of that term")
    weights: dict = field({}, help="combined: weight per term (ce, logit, feature, attention)")
    attention_p: float = field(2.0, positive, help="presets: power p of the attention map")


PRESET_KEYS = tuple(f.name for f in attrs.fields(PresetSettings))
"""``[distill]`` keys that only the presets read."""

#: ``distill.method`` names: each preset's ``PresetSettings -> term tables``, and ``terms`` itself.
METHODS = Registry("distillation method", "distill.method")
METHODS.register("none", lambda d: {"ce": {"weight": 1.0}})
METHODS.register("logit", lambda d: {"ce": {"weight": 1.0 - d.alpha},
                                     "logit": {"weight": d.alpha, "temperature": d.temperature}})
METHODS.register("feature", lambda d: {"ce": {"weight": d.alpha}, "feature": {"weight": d.beta}})
METHODS.register("attention", lambda d: {"ce": {"weight": 1.0},
                                         "attention": {"weight": d.beta, "p": d.attention_p}})
METHODS.register("combined", lambda d: _combined_tables(d))
METHODS.register("terms", "terms")  # the tables as written

_COMBINED_KEYS = {"logit": lambda d: {"temperature": d.temperature}, "attention": lambda d: {"p": d.attention_p}}


def _combined_tables(d: PresetSettings) -> dict:
    if not d.weights:
        raise ConfigError("distill.method = 'combined' needs [distill.weights], e.g. {ce = 0.5, logit = 0.5}.")
    tables = {}
    for name, w in d.weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ConfigError(f"distill.weights.{name} must be a number >= 0 (got {w!r}).")
        tables[name] = {"weight": float(w), **_COMBINED_KEYS.get(name, lambda d: {})(d)}
    return tables


def expand_preset(distill: dict[str, Any], prefix: str = "distill.") -> dict[str, Any]:
    """A raw ``[distill]`` table with its preset expanded: ``method = "terms"``, ``preset`` the name it was
    written with, ``terms`` the tables, and no preset keys. A table already in terms form is returned
    as it is (after checking that it sets no preset key)."""
    out = dict(distill)
    method = out.pop("method", "logit")
    settings = {k: out.pop(k) for k in PRESET_KEYS if k in out}
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(METHODS.unknown_message(method, key=f"{prefix}method"))
    terms = out.get("terms", {})
    if method == "terms":
        defaults = attrs.asdict(PresetSettings())
        settings = {k: v for k, v in settings.items() if v != defaults[k]}  # at its default it does nothing
        if settings:
            key = next(iter(settings))
            raise ConfigError(f"{prefix}{key} is shorthand for a preset (distill.method = 'logit', ...), but "
                              f"distill.method = 'terms'; set it in the term's table, e.g. [distill.terms.logit].")
        if not terms:
            raise ConfigError("distill.method = 'terms' needs at least one [distill.terms.<name>] table, "
                              "e.g. [distill.terms.ce] weight = 1.0.")
        out.setdefault("preset", "terms")
        return {"method": "terms", **out}
    if terms:
        raise ConfigError(f"[distill.terms] is set, but distill.method = '{method}' is a preset that "
                          "ignores it; set distill.method = 'terms' to train with your term tables.")
    tables = METHODS.get(method)(build_attrs(PresetSettings, settings, prefix))
    return {"method": "terms", **out, "preset": method, "terms": tables}
