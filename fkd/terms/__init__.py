"""Loss terms, one registered unit per module: ``ce``, ``logit``, ``feature``, ``attention``, and ``dkd``,
``dist``, ``lskd``, ``sp``, ``rkd``, ``pkt``, ``cc``, ``nst``, ``vid``, ``crd``, ``mutual``, and ``reviewkd``, ``fsp``,
``ab``, ``ofd``, ``srrl``, ``kdsvd``, ``skd``, ``mlkd`` (with ``ce_strong``), ``ctkd``, ``tf_kd``, ``pad``, ``ickd``, ``ft``, ``hard_kd``.

A term declares its hyper-parameters (an attrs class), what it consumes, ``init`` for its own
parameters and state, and a pure ``apply`` built on :mod:`fkd.losses` (see :mod:`fkd.terms.base`).
Importing this package registers the built-ins; a user's own terms register the same way from a file
named in ``distill.imports`` (see :mod:`fkd.user_imports`). Adding a term is one new module here (or
in the user's file) plus its test: nothing else changes.
"""

from fkd.terms.base import (
    INPUTS,
    TERMS,
    PretrainSettings,
    Shapes,
    Term,
    TermInputs,
    apply_teacher_head,
    check_pair_kinds,
    config_fields,
    hyper,
    internal,
    non_negative,
    pair_key,
    positive,
    register_term,
    teacher_head_params,
    teacher_param,
)
from fkd.terms.weight_schedule import WeightSchedule
from fkd.terms import ce, logit, feature, attention  # noqa: E402,F401,I001 -- registers the built-ins, in this order
from fkd.terms import dkd, dist, lskd, sp, rkd, pkt, cc, nst, vid  # noqa: E402,F401,I001 -- issue 9 methods
from fkd.terms import crd  # noqa: E402,F401,I001 -- CRD (fkd/terms/crd.py)
from fkd.terms import mutual  # noqa: E402,F401,I001 -- deep mutual learning (cohorts)
from fkd.terms import reviewkd, fsp, ab, ofd, srrl, kdsvd  # noqa: E402,F401,I001 -- issue 20 feature methods
from fkd.terms import skd, mlkd, ctkd, tf_kd, pad, ickd, ft  # noqa: E402,F401,I001 -- issue 20 (first half)
from fkd.terms import hard_kd  # noqa: E402,F401,I001 -- DeiT's hard-label distillation

__all__ = [
    "INPUTS", "TERMS", "PretrainSettings", "Shapes", "Term", "TermInputs", "check_pair_kinds", "config_fields", "hyper",
    "internal", "non_negative", "pair_key", "positive", "register_term",
    "WeightSchedule", "apply_teacher_head", "teacher_head_params", "teacher_param",
]
