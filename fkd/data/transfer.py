"""Transfer sets: unlabeled training images for the teacher-based terms, and how batches mix them in.

Hinton et al. (2015) distil on a "transfer set", which need not be labeled: the teacher's outputs are
the targets. Here the training split may carry unlabeled examples, with label **-1**; they flow through
the same step as the labeled ones. Label-based terms (``ce``, DKD's target split) mask themselves to
the examples with label >= 0 (a masked mean, no data-dependent shapes); teacher-based terms see every
example; the training accuracy counts labeled examples only.

Where unlabeled examples come from (``data.transfer = "unlabeled"``):

* the data set's own unlabeled images: STL-10's ``unlabeled`` split (100,000 images), an image
  folder's ``root/unlabeled/``;
* ``data.label_fraction = f < 1``: the training images whose labels were not kept
  (:func:`labeled_mask`: the same deterministic, class-balanced fraction in every run).

With ``data.transfer = "none"`` the images ``label_fraction`` unlabels are dropped instead.

How a training batch of ``B`` mixes them (``data.labeled_share = s``):

* ``s = 0``: labeled and unlabeled examples are shuffled together; a batch holds each in proportion to
  the training set, on average;
* ``s > 0``: every batch holds ``round(s B)`` labeled examples (at least 1, at most ``B - 1``) and the
  rest unlabeled, each drawn from its own shuffled order (:func:`mixed_order`). An epoch stays
  ``floor(N / B)`` batches (``N`` = labeled + unlabeled), so the schedule does not change with ``s``;
  an order that runs out within the epoch restarts with a fresh shuffle, so the smaller set is seen
  several times per epoch and the larger one possibly only in part.

Both orders are pure functions of ``(seed, epoch)``, as :mod:`fkd.data.order` wants for exact resumes.
"""

from __future__ import annotations

import attrs
import torch
from torch.utils.data import ConcatDataset, Subset

from fkd.config import DataConfig
from fkd.data.datasets import Split, TensorViews
from fkd.data.order import derive_seed
from fkd.errors import DataError

UNLABELED = -1
_LABEL_FRACTION = 2  # derive_seed tags, distinct from fkd.data.order's
_MIXED = 3


def labeled_mask(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Which examples keep their label: (N,) bool, ``round(fraction * n_c)`` (at least 1) per class ``c``.

    Class-balanced (the same fraction of every class) and deterministic: each class's choice is a
    permutation seeded by the class alone, never by the run's seed, so every run -- and the teacher cache
    -- sees the same labeled examples. Examples already unlabeled (-1) stay unlabeled.
    """
    keep = torch.zeros(labels.shape[0], dtype=torch.bool)
    if fraction >= 1:
        return labels >= 0
    for c in torch.unique(labels[labels >= 0]).tolist():
        members = torch.nonzero(labels == c).flatten()
        n_keep = max(1, int(fraction * members.numel() + 0.5))
        generator = torch.Generator().manual_seed(derive_seed(_LABEL_FRACTION, int(c)))
        keep[members[torch.randperm(members.numel(), generator=generator)[:n_keep]]] = True
    return keep


def take(split: Split, idx: torch.Tensor) -> Split:
    """The examples ``idx`` of ``split``, in that order."""
    if isinstance(split.dataset, TensorViews):
        return Split(TensorViews(split.dataset.views[idx], split.labels[idx]), split.labels[idx])
    return Split(Subset(split.dataset, idx.tolist()), split.labels[idx])


def relabel(split: Split, labels: torch.Tensor) -> Split:
    """``split`` with other labels (sources read labels from the split, never from its dataset)."""
    if isinstance(split.dataset, TensorViews):
        return Split(TensorViews(split.dataset.views, labels), labels)
    return Split(split.dataset, labels)


def concat(first: Split, second: Split) -> Split:
    """``first`` then ``second``: tensors stay tensors, datasets become a ConcatDataset."""
    labels = torch.cat([first.labels, second.labels])
    if isinstance(first.dataset, TensorViews) and isinstance(second.dataset, TensorViews):
        return Split(TensorViews(torch.cat([first.dataset.views, second.dataset.views]), labels), labels)
    return Split(ConcatDataset([first.dataset, second.dataset]), labels)


def training_split(cfg: DataConfig, train: Split, unlabeled: Split | None) -> Split:
    """The training split ``cfg`` asks for: ``label_fraction`` applied, the transfer set appended."""
    if cfg.label_fraction < 1:
        keep = labeled_mask(train.labels, cfg.label_fraction)
        if cfg.transfer == "none":
            train = take(train, torch.nonzero(keep).flatten())
        else:
            train = relabel(train, torch.where(keep, train.labels, torch.full_like(train.labels, UNLABELED)))
    if cfg.transfer == "none":
        return train
    if unlabeled is not None and len(unlabeled):
        train = concat(train, unlabeled)
    if not bool((train.labels < 0).any()):
        raise DataError(f"data.transfer = 'unlabeled', but data set '{cfg.name}' has no unlabeled images; set "
                        "data.label_fraction below 1 to unlabel part of its training split, or data.transfer = "
                        "'none'.")
    if not bool((train.labels >= 0).any()):
        raise DataError("the training split has no labeled image left; raise data.label_fraction.")
    return train


def labeled_only(cfg: DataConfig) -> DataConfig:
    """``cfg`` without its transfer set or mixing: what a teacher is fitted on (labeled examples only)."""
    return attrs.evolve(cfg, transfer="none", labeled_share=0.0, mixup=0.0, cutmix=0.0)


def labeled_per_batch(batch_size: int, share: float) -> int:
    """``round(share * batch_size)``, kept within ``[1, batch_size - 1]`` so both kinds are in every batch."""
    return min(max(int(share * batch_size + 0.5), 1), batch_size - 1)


def _cycled(members: torch.Tensor, count: int, seed: int, epoch: int, stream: int) -> torch.Tensor:
    """``count`` entries of ``members``: shuffled passes over them, each a new permutation, concatenated."""
    generator = torch.Generator().manual_seed(derive_seed(_MIXED, seed, epoch, stream))
    passes = -(-count // members.numel())
    return torch.cat([members[torch.randperm(members.numel(), generator=generator)] for _ in range(passes)])[:count]


def mixed_order(labels: torch.Tensor, batch_size: int, share: float, *, seed: int, epoch: int,
                batches: int) -> torch.Tensor:
    """The example order of an epoch in which every batch holds a fixed share of labeled examples.

    ``labels``: (N,) with -1 for unlabeled. Returns (batches * batch_size,) int64 on the CPU: batch ``b``
    is ``order[b B:(b + 1) B]``, its first ``L = labeled_per_batch(B, share)`` entries labeled examples and
    the rest unlabeled ones, each kind in its own order (see the module docstring).
    """
    labeled = torch.nonzero(labels >= 0).flatten()
    unlabeled = torch.nonzero(labels < 0).flatten()
    if labeled.numel() == 0 or unlabeled.numel() == 0:
        raise DataError("data.labeled_share needs both labeled and unlabeled training images; set it to 0.")
    n_labeled = labeled_per_batch(batch_size, share)
    first = _cycled(labeled, batches * n_labeled, seed, epoch, 0).view(batches, n_labeled)
    rest = _cycled(unlabeled, batches * (batch_size - n_labeled), seed, epoch, 1).view(batches, -1)
    return torch.cat([first, rest], dim=1).flatten()


def describe(cfg: DataConfig, labels: torch.Tensor) -> str | None:
    """One line for the run's start about the transfer set and how batches mix it in; None without one."""
    n_labeled = int((labels >= 0).sum())
    n_unlabeled = labels.shape[0] - n_labeled
    if n_unlabeled == 0:
        return None
    if cfg.labeled_share:
        n = labeled_per_batch(cfg.batch_size, cfg.labeled_share)
        mix = f"every batch {n} labeled + {cfg.batch_size - n} unlabeled"
    else:
        mix = "batches shuffle both together"
    return (f"transfer set: {n_labeled} labeled + {n_unlabeled} unlabeled training images ({mix}); "
            "label terms use the labeled ones, teacher terms all")
