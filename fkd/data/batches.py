"""Sources of batches: the training or test split of a data set, batched on the device.

A :class:`Source` yields ``(x, y, idx)``: ``x`` float32 (B, 3, S, S) normalised, ``y`` int64
(B,) labels and ``idx`` int64 (B,) positions in the split, all on the bundle's device. Two
implementations share the order (:mod:`fkd.data.order`) and the transform
(:mod:`fkd.data.transforms`), so for the same ``(seed, epoch)`` they yield identical batches:

* :class:`InMemorySource` holds every view as one uint8 (N, 3, R, R) tensor on the device and
  indexes it -- no DataLoader, no workers, no host-to-device traffic per batch.
* :class:`StreamingSource` builds views in DataLoader workers from a map-style dataset (a
  torchvision data set with :class:`~fkd.data.views.PilSquareView` as its transform) and copies
  each uint8 batch to the device, for data sets too large to hold.
"""

from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from fkd.data.order import augmentation_seed, batch_bounds, batch_count, epoch_order
from fkd.data.transforms import BatchTransform
from fkd.errors import FkdError

Batch = tuple[Tensor, Tensor, Tensor]


@runtime_checkable
class Source(Protocol):
    """One split of a data set, batched.

    ``labels``: (N,) int64 on the CPU. ``batches`` yields ``(x, y, idx)`` as described in the
    module docstring; ``start`` skips the first ``start`` batches of the epoch without loading
    them, so ``batches(..., start=k)`` equals ``list(batches(...))[k:]`` (mid-epoch resume).
    """

    labels: Tensor

    def __len__(self) -> int: ...

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int: ...

    def batches(self, batch_size: int, *, shuffle: bool, epoch: int = 0, seed: int = 0, start: int = 0,
                augment: bool = False, drop_last: bool = False) -> Iterator[Batch]: ...


class _SourceBase:
    """What both sources share: labels, the transform, the order and the per-batch seeds."""

    def __init__(self, labels: Tensor, transform: BatchTransform, device: torch.device | str,
                 labeled_share: float = 0.0) -> None:
        self.labels = labels.to("cpu", torch.int64)
        self.transform = transform
        self.device = torch.device(device)
        self.labeled_share = labeled_share
        self._labels_on_device = self.labels.to(self.device)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """``ceil(N / batch_size)``, or ``floor`` with ``drop_last``."""
        return batch_count(len(self), batch_size, drop_last)

    def epoch_order(self, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool) -> Tensor:
        """The epoch's example order, (num_batches * B,) or (N,) int64 on the CPU.

        Shuffled with ``labeled_share > 0``: every batch holds that share of labeled examples
        (:func:`fkd.data.transfer.mixed_order`); otherwise :func:`fkd.data.order.epoch_order`.
        """
        if shuffle and self.labeled_share:
            from fkd.data.transfer import mixed_order

            return mixed_order(self.labels, batch_size, self.labeled_share, seed=seed, epoch=epoch,
                               batches=self.num_batches(batch_size, drop_last))
        return epoch_order(len(self), shuffle=shuffle, seed=seed, epoch=epoch)

    def _to_device(self, t: Tensor) -> Tensor:
        if self.device.type == "cuda":
            # From pinned memory the copy is queued without waiting for the GPU; a pageable
            # copy would make the host wait for every kernel queued before it.
            return (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)
        return t.to(self.device)

    def _finish(self, views: Tensor, idx: Tensor, b: int, *, augment: bool, seed: int, epoch: int) -> Batch:
        """Device uint8 views and indices of batch ``b`` -> ``(x, y, idx)``."""
        key = augmentation_seed(seed, epoch, b) if augment else None
        return self.transform(views, seed=key), self._labels_on_device[idx], idx

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, device={self.device}, transform={self.transform})"


class InMemorySource(_SourceBase):
    """A split held as one uint8 (N, 3, R, R) tensor on the device.

    Args:
        views: uint8 (N, 3, R, R); moved to ``device`` once.
        labels: (N,) integer labels.
        transform: the per-batch transform (random parts only on the training split).
        device: where batches are produced.
    """

    def __init__(self, views: Tensor, labels: Tensor, transform: BatchTransform,
                 device: torch.device | str = "cpu", labeled_share: float = 0.0) -> None:
        super().__init__(labels, transform, device, labeled_share)
        if views.dtype != torch.uint8 or views.ndim != 4 or views.shape[0] != len(self):
            raise ValueError(f"views must be uint8 (N, 3, R, R) with N = {len(self)}, got {views.dtype} {tuple(views.shape)}")
        self.views = views.to(self.device)

    def batches(self, batch_size: int, *, shuffle: bool, epoch: int = 0, seed: int = 0, start: int = 0,
                augment: bool = False, drop_last: bool = False) -> Iterator[Batch]:
        """Batches of the epoch from batch ``start`` on (see :class:`Source`)."""
        order = self._to_device(self.epoch_order(batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                                 drop_last=drop_last))
        for b, lo, hi in batch_bounds(order.shape[0], batch_size, start=start, drop_last=drop_last):
            idx = order[lo:hi]
            yield self._finish(self.views.index_select(0, idx), idx, b, augment=augment, seed=seed, epoch=epoch)


class _LoadFailure:
    """An :class:`~fkd.errors.FkdError` raised while loading an item, carried back as data.

    Raised in a DataLoader worker, the error would reach this process re-wrapped by torch as a new
    exception whose message is the worker's whole traceback. Returned as a value instead, it crosses the
    process boundary intact and is raised here as it was, so the message (naming the bad file) is the
    same with and without workers.
    """

    def __init__(self, error: FkdError) -> None:
        self.error = error


def _collate(items: list):
    """``default_collate``, or the first :class:`_LoadFailure` among the items."""
    for item in items:
        if isinstance(item, _LoadFailure):
            return item
    return default_collate(items)


def _raise_failure(batch) -> None:
    if isinstance(batch, _LoadFailure):
        raise batch.error


class _ViewAndIndex(Dataset):
    """``dataset[i] = (view, label)`` -> ``(view, i)``: the loader returns indices, labels come from ours."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i][0], i
        except FkdError as exc:  # e.g. an image that cannot be decoded: see _LoadFailure
            return _LoadFailure(exc)


class StreamingSource(_SourceBase):
    """A split read through a DataLoader, one batch of uint8 views at a time.

    Args:
        dataset: map-style; ``dataset[i]`` is ``(uint8 (3, R, R) view, label)``.
        labels: (N,) integer labels, equal to the dataset's (read without decoding images).
        transform: the per-batch transform, applied on the device after the copy.
        device: where batches are produced; on CUDA the loader pins memory and copies without blocking.
        num_workers: DataLoader worker processes (0: load in this process).
    """

    def __init__(self, dataset: Dataset, labels: Tensor, transform: BatchTransform,
                 device: torch.device | str = "cpu", num_workers: int = 0, labeled_share: float = 0.0) -> None:
        super().__init__(labels, transform, device, labeled_share)
        if len(dataset) != len(self):
            raise ValueError(f"dataset has {len(dataset)} items but {len(self)} labels")
        self.dataset = dataset
        self.num_workers = num_workers

    def batches(self, batch_size: int, *, shuffle: bool, epoch: int = 0, seed: int = 0, start: int = 0,
                augment: bool = False, drop_last: bool = False) -> Iterator[Batch]:
        """Batches of the epoch from batch ``start`` on (see :class:`Source`).

        The batch sampler is the same permutation :class:`InMemorySource` uses, cut into the
        same chunks, so both produce identical batches; skipped batches are never loaded.
        """
        order = self.epoch_order(batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)
        bounds = list(batch_bounds(order.shape[0], batch_size, start=start, drop_last=drop_last))
        if not bounds:
            return
        loader = DataLoader(
            _ViewAndIndex(self.dataset),
            batch_sampler=[order[lo:hi].tolist() for _, lo, hi in bounds],
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            collate_fn=_collate,
        )
        for (b, _, _), batch in zip(bounds, loader):
            _raise_failure(batch)
            views, idx = batch
            views, idx = self._to_device(views), self._to_device(idx)
            yield self._finish(views, idx, b, augment=augment, seed=seed, epoch=epoch)


def load_views(dataset: Dataset, *, batch_size: int = 256, num_workers: int = 0) -> Tensor:
    """Every view of ``dataset`` in order, via one DataLoader pass: uint8 (N, 3, R, R) on the CPU."""
    loader = DataLoader(_ViewAndIndex(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate)
    out = None
    for batch in loader:
        _raise_failure(batch)
        views, idx = batch
        if out is None:  # the first batch tells the view shape; filling in place avoids a second copy
            out = torch.empty((len(dataset), *views.shape[1:]), dtype=torch.uint8)
        out[idx[0]:idx[0] + len(idx)] = views
    return out if out is not None else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
