"""STL-10's binary files read through memory maps: no whole-file read, no md5 at every start.

STL-10 (Coates, Ng & Lee 2011) ships ``stl10_binary/{train,test,unlabeled}_X.bin``: uint8 images of
3 x 96 x 96, each channel stored column-major (the transpose of the usual row-major layout), one image
after another; ``{train,test}_y.bin`` hold one uint8 label per image, 1-based. ``unlabeled_X.bin``
holds 100,000 images, 2.76 GB.

torchvision's ``STL10`` md5-checks every file, ``unlabeled_X.bin`` included, each time one of its
splits is constructed and then reads its split's whole file into memory: seconds to minutes per start
before anything trains. Here each file is opened as a ``numpy.memmap`` and an image is read when it is
asked for; the only check at start is the file size (a whole number of images, one label per image).
torchvision's own code path still performs the first download (and its md5 checks) once, in
:func:`fkd.data.datasets._read_stl10`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fkd.errors import DataError

FOLDER = "stl10_binary"
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
         "unlabeled": ("unlabeled_X.bin", None)}
"""``split -> (images file, labels file or None)`` under ``root/stl10_binary``."""


def split_files(folder: Path, split: str) -> list[Path]:
    """The files of ``split`` under ``folder`` (images first)."""
    return [folder / name for name in FILES[split] if name is not None]


def image_count(path: Path) -> int:
    """Images in an ``*_X.bin`` file, from its size; a size that is not a whole number of images is a DataError."""
    size = path.stat().st_size
    if size == 0 or size % IMAGE_BYTES:
        raise DataError(f"STL-10 file '{path}' has {size} bytes, not a whole number of 3x96x96 images; it is "
                        "truncated or corrupted: replace it with the complete extracted file.")
    return size // IMAGE_BYTES


def read_labels(path: Path, n: int) -> torch.Tensor:
    """``*_y.bin`` -> (n,) int64 labels, 0-based (the file is 1-based); a length mismatch is a DataError."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.shape[0] != n or (raw.size and (raw.min() < 1 or raw.max() > 10)):
        raise DataError(f"STL-10 labels '{path}' do not match its images ({raw.shape[0]} labels in 1..10 expected "
                        f"{n}); replace the files with the complete extracted ones.")
    return torch.from_numpy(raw.astype(np.int64) - 1)


class Stl10Images(Dataset):
    """``dataset[i] = (view(uint8 (3, 96, 96) image i), label i)`` read from a memory-mapped ``*_X.bin``.

    The map is opened on first use in each process (and dropped when pickled), so DataLoader workers
    each map the file themselves instead of receiving a copy of it.
    """

    def __init__(self, path: Path, labels: torch.Tensor, view) -> None:
        self.path = Path(path)
        self.labels = labels
        self.view = view
        self._images: np.memmap | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def images(self) -> np.memmap:
        """The file as a read-only uint8 (N, 3, 96, 96) map, still column-major per channel."""
        if self._images is None:
            self._images = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(len(self), 3, SIDE, SIDE))
        return self._images

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 (3, 96, 96), rows and columns in the usual order."""
        return torch.from_numpy(np.ascontiguousarray(self.images()[i].transpose(0, 2, 1)))

    def __getitem__(self, i: int):
        return self.view(self.image(i)), int(self.labels[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}
