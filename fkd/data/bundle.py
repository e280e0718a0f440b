"""``load_data``: a configured data set as two batch sources on a device, plus its fingerprint."""

from __future__ import annotations

import hashlib
import json

import attrs
import torch

from fkd.config import DataConfig
from fkd.data.batches import InMemorySource, Source, StreamingSource, load_views
from fkd.data.datasets import Split, TensorViews, read_splits
from fkd.data.transfer import training_split
from fkd.data.transforms import BatchTransform
from fkd.device import fits_on_device

# in_memory = "auto" holds a split on the device when its uint8 views fit in this many bytes.
IN_MEMORY_LIMIT_BYTES = 2 * 1024**3

FINGERPRINT_VERSION = 1  # bump when the view computation changes, so old teacher caches miss


@attrs.frozen
class DataBundle:
    """A data set ready for training.

    ``train`` and ``test`` yield ``(x, y, idx)`` batches on the device (see
    :class:`~fkd.data.batches.Source`); only ``train`` can augment. ``fingerprint`` is a SHA-256
    hex digest of what determines the un-augmented training inputs (data set, where it was read
    from, view and image sizes, normalisation, ``train_limit``, N and the labels), so it keys a
    cache of teacher outputs on them.
    """

    train: Source
    test: Source
    num_classes: int
    class_names: list[str]
    in_channels: int
    fingerprint: str


def view_size(cfg: DataConfig) -> int:
    """R, the side of the stored views: ``cfg.resize``, or ``cfg.image_size`` when it is 0."""
    return cfg.resize or cfg.image_size


def holds_in_memory(mode: str, n: int, view: int, device: torch.device | str = "cpu") -> bool:
    """Whether a split of ``n`` views of side ``view`` is held on the device (``data.in_memory``): ``auto``
    when its uint8 views fit (:func:`fkd.device.fits_on_device`: at most :data:`IN_MEMORY_LIMIT_BYTES`, and
    on CUDA at most half the free device memory)."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    return fits_on_device(n * 3 * view * view, device, limit=IN_MEMORY_LIMIT_BYTES)


def load_data(cfg: DataConfig, *, device: torch.device | str = "cpu") -> DataBundle:
    """Read data set ``cfg.name`` and return its train and test sources on ``device``.

    The data never depend on the run's seed: splits and synthetic images are fixed so that runs
    with different seeds (and their teacher caches) see the same examples. The seed that orders
    and augments batches is passed to ``Source.batches``.

    Raises:
        DataError: the data set is missing or malformed.
    """
    device = torch.device(device)
    splits = read_splits(cfg, view_size(cfg))
    train_split = splits.train.head(cfg.train_limit) if cfg.train_limit else splits.train
    train_split = training_split(cfg, train_split, splits.unlabeled)  # label_fraction, the transfer set
    train = _make_source(train_split, BatchTransform.for_split(cfg, train=True), cfg, device, cfg.labeled_share)
    test = _make_source(splits.test, BatchTransform.for_split(cfg, train=False), cfg, device)
    return DataBundle(
        train=train, test=test,
        num_classes=len(splits.class_names), class_names=list(splits.class_names), in_channels=3,
        fingerprint=data_fingerprint(cfg, splits.identity, train_split.labels),
    )


def _make_source(split: Split, transform: BatchTransform, cfg: DataConfig, device: torch.device,
                 labeled_share: float = 0.0) -> Source:
    if not holds_in_memory(cfg.in_memory, len(split), view_size(cfg), device):
        return StreamingSource(split.dataset, split.labels, transform, device, cfg.num_workers, labeled_share)
    if isinstance(split.dataset, TensorViews):
        views = split.dataset.views
    else:
        views = load_views(split.dataset, num_workers=cfg.num_workers)
    return InMemorySource(views, split.labels, transform, device, labeled_share)


def data_fingerprint(cfg: DataConfig, identity: dict, train_labels: torch.Tensor) -> str:
    """SHA-256 hex digest of the un-augmented training view: data identity, sizes, normalisation, labels."""
    labels = train_labels.to("cpu", torch.int64).contiguous().numpy()
    payload = {
        "version": FINGERPRINT_VERSION,
        "name": cfg.name,
        "identity": identity,
        "view_size": view_size(cfg),
        "image_size": cfg.image_size,
        "normalize": cfg.normalize,
        "train_limit": cfg.train_limit,
        "n": int(labels.shape[0]),
        "labels": hashlib.sha256(labels.tobytes()).hexdigest(),
    }
    if cfg.transfer != "none" or cfg.label_fraction < 1:  # which images the split holds (absent: as before)
        payload.update(transfer=cfg.transfer, label_fraction=cfg.label_fraction)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
