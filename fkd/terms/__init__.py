"""Loss terms, one registered unit per module: ``ce``, ``logit``, ``feature``, ``attention``, and ``dkd``,
``dist``, ``lskd``, ``sp``, ``rkd``, ``pkt``, ``cc``, ``nst``, ``vid``, ``crd``, ``mutual``, ``hard_kd``.

A term declares its hyper-parameters (an attrs class), what it consumes, ``init`` for its own
parameters and state, and a pure ``apply`` built on :mod:`fkd.losses` (see :mod:`fkd.terms.base`).
Importing this package registers the built-ins; a user's own terms register the same way from a file
named in ``distill.imports`` (see :mod:`fkd.user_imports`). Adding a term is one new module here (or
in the user's file) plus its test: nothing else changes.
"""

from fkd.terms.base import (
    INPUTS,
    TERMS,
    Shapes,
    Term,
    TermInputs,
    check_pair_kinds,
    config_fields,
    hyper,
    internal,
    non_negative,
    pair_key,
    positive,
    register_term,
)
from fkd.terms import ce, logit, feature, attention  # noqa: E402,F401,I001 -- registers the built-ins, in this order
from fkd.terms import dkd, dist, lskd, sp, rkd, pkt, cc, nst, vid  # noqa: E402,F401,I001 -- issue 9 methods
from fkd.terms import crd  # noqa: E402,F401,I001 -- CRD (fkd/terms/crd.py)
from fkd.terms import mutual  # noqa: E402,F401,I001 -- deep mutual learning (cohorts)
from fkd.terms import hard_kd  # noqa: E402,F401,I001 -- DeiT's hard-label distillation

__all__ = [
    "INPUTS", "TERMS", "Shapes", "Term", "TermInputs", "check_pair_kinds", "config_fields", "hyper",
    "internal", "non_negative", "pair_key", "positive", "register_term",
]
