"""Data: named data sets as deterministic uint8 views, batched and augmented on the device.

``load_data(cfg, device=...)`` returns a :class:`DataBundle` whose ``train`` and ``test``
sources yield ``(x, y, idx)`` batches. The pieces, one concept per module:

* :mod:`fkd.data.datasets` -- reading digits, synthetic, CIFAR-10/100, STL-10, image folders;
* :mod:`fkd.data.stl10` -- STL-10's binaries memory-mapped (its 100,000 unlabeled images included);
* :mod:`fkd.data.transfer` -- transfer sets: unlabeled examples (label -1), ``label_fraction`` and
  batches with a fixed share of labeled examples;
* :mod:`fkd.data.views` -- the deterministic per-example view (resize shorter side, centre crop);
* :mod:`fkd.data.transforms` -- the batched on-device crop / flip / normalise;
* :mod:`fkd.data.order` -- the shuffle order and augmentation seeds, pure functions of
  ``(seed, epoch[, batch])`` for bit-exact resumption;
* :mod:`fkd.data.batches` -- the in-memory and streaming sources;
* :mod:`fkd.data.bundle` -- ``load_data`` and the fingerprint.
"""

from fkd.data.batches import InMemorySource, Source, StreamingSource
from fkd.data.bundle import DataBundle, data_fingerprint, load_data
from fkd.data.order import augmentation_seed, epoch_order
from fkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchTransform
from fkd.data.views import square_view

__all__ = [
    "BatchTransform",
    "DataBundle",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InMemorySource",
    "Source",
    "StreamingSource",
    "augmentation_seed",
    "data_fingerprint",
    "epoch_order",
    "load_data",
    "square_view",
]
