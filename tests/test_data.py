"""fkd.data: reading data sets, deterministic views, on-device batches, resumable order.

No test touches the network: torchvision data sets are small stand-ins written here in the real
on-disk formats, with torchvision's md5 checks patched out.
"""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

import fkd.data.bundle
from fkd.config import DataConfig
from fkd.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchTransform,
    InMemorySource,
    Source,
    StreamingSource,
    epoch_order,
    load_data,
    square_view,
)
from fkd.data.datasets import STL10_CLASSES, digits_split
from fkd.data.transforms import augments, crop_and_flip
from fkd.errors import ConfigError, DataError


def config(**overrides) -> DataConfig:
    """A DataConfig for tests: no workers, never downloading."""
    return DataConfig(**{"num_workers": 0, "download": False, **overrides})


def collect(source: Source, batch_size: int, **kwargs) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.cpu() for t in batch) for batch in source.batches(batch_size, **kwargs)]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b):
        for ta, tb in zip(batch_a, batch_b):
            assert torch.equal(ta, tb)


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    """Undo normalize = "none": float (B, 3, S, S) in [0, 1] -> the uint8 pixels."""
    return (x * 255).round().to(torch.uint8)


# --- stand-ins in torchvision's on-disk formats -------------------------------------------------


@pytest.fixture
def no_md5(monkeypatch):
    """Skip torchvision's md5 checks (the stand-ins are not the real files)."""
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    # CIFAR's _load_meta checks the meta file with the module-level function.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar(root: Path, *, hundred: bool = False, per_file: int = 4, n_test: int = 6, seed: int = 0):
    """CIFAR-10 (5 train batches + test_batch + batches.meta) or CIFAR-100 (train, test, meta).

    Returns the train and test images as uint8 (N, 3, 32, 32) and their labels.
    """
    rng = np.random.default_rng(seed)
    classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key = "fine_labels" if hundred else "labels"
    files = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    sizes = [per_file * 5] if hundred else [per_file] * 5

    def split(names, counts):
        images, labels = [], []
        for name, n in zip(names, counts):
            x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
            y = rng.integers(0, classes, n).tolist()
            _pickle(folder / name, {"data": x.reshape(n, -1), label_key: y})
            images.append(x)
            labels += y
        return torch.from_numpy(np.concatenate(images)), torch.tensor(labels)

    train = split(files, sizes)
    test = split(["test" if hundred else "test_batch"], [n_test])
    names = [f"c{k}" for k in range(classes)]
    if hundred:
        _pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": names[:20]})
    else:
        _pickle(folder / "batches.meta", {"label_names": names})
    return train, test, names


def write_stl10(root: Path, n_train: int = 6, n_test: int = 4):
    """STL-10 binaries: images stored column-major per channel, labels 1-based, class_names.txt."""
    rng = np.random.default_rng(1)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        images[:, 0, :, :48] = 0  # left half of red dark: orientation mistakes show
        labels = rng.integers(0, 10, n)
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        out.append((torch.from_numpy(images), torch.from_numpy(labels)))
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return out[0], out[1], names


def write_image_folder(root: Path, layout: dict[str, dict[str, int]], size=(12, 10)) -> None:
    """``layout = {split: {class: count}}``; PNGs of ``size`` (w, h), every third one grayscale."""
    rng = np.random.default_rng(2)
    for split, classes in layout.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, count in classes.items():
            (root / split / name).mkdir(exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                image = Image.fromarray(pixels).convert("L") if i % 3 == 2 else Image.fromarray(pixels)
                image.save(root / split / name / f"{i}.png")


# --- views -------------------------------------------------------------------------------------


def test_square_view_shapes_grayscale_and_batching():
    images = torch.randint(0, 256, (5, 3, 20, 30), dtype=torch.uint8)
    views = square_view(images, 16)
    assert views.shape == (5, 3, 16, 16) and views.dtype == torch.uint8
    # Batched and one-by-one give the same bytes (the streamed and in-memory paths rely on it).
    assert all(torch.equal(views[i], square_view(images[i], 16)) for i in range(5))
    gray = square_view(images[:, :1], 16)
    assert gray.shape == (5, 3, 16, 16) and torch.equal(gray[:, 0], gray[:, 2])
    # At the native size only the centre crop happens.
    assert torch.equal(square_view(images, 20), images[..., :, 5:25])


# --- digits ------------------------------------------------------------------------------------


def test_digits_sizes_stratification_and_determinism():
    from sklearn.datasets import load_digits

    bundle = load_data(config(name="digits"))
    assert (len(bundle.train), len(bundle.test)) == (1437, 360)
    assert bundle.num_classes == 10 and bundle.class_names == [str(d) for d in range(10)]
    assert bundle.in_channels == 3
    # Stratified: every class keeps its share of the test split to within one image.
    all_counts = np.bincount(load_digits().target, minlength=10)
    test_counts = torch.bincount(bundle.test.labels, minlength=10).numpy()
    assert np.all(np.abs(test_counts - all_counts * 0.2) <= 1)
    # The split belongs to the data set: the same whatever the global RNGs hold.
    torch.manual_seed(7)
    np.random.seed(7)
    again = load_data(config(name="digits"))
    assert torch.equal(bundle.train.labels, again.train.labels)
    assert torch.equal(bundle.test.views, again.test.views)
    assert bundle.fingerprint == again.fingerprint


def test_digits_views_are_the_scaled_pixels():
    from sklearn.datasets import load_digits

    digits = load_digits()
    bundle = load_data(config(name="digits", image_size=8, normalize="none"))
    train_idx, _ = digits_split(digits.target, 0.2)
    x, y, idx = next(bundle.train.batches(16, shuffle=False))
    expected = np.rint(digits.images[train_idx[:16]] * 255 / 16).astype(np.uint8)
    assert torch.equal(as_uint8(x)[:, 1], torch.from_numpy(expected))
    assert torch.equal(y, torch.from_numpy(digits.target[train_idx[:16]]))
    assert torch.equal(idx, torch.arange(16))


@pytest.mark.parametrize("fraction", [0.001, 1.5])
def test_digits_bad_test_fraction(fraction):
    with pytest.raises(DataError, match="test_fraction"):
        load_data(config(name="digits", test_fraction=fraction))


def test_train_limit_keeps_the_first_examples():
    full = load_data(config(name="digits"))
    limited = load_data(config(name="digits", train_limit=100))
    assert len(limited.train) == 100 and len(limited.test) == len(full.test)
    assert torch.equal(limited.train.views, full.train.views[:100])
    assert limited.fingerprint != full.fingerprint


def test_resize_smaller_than_image_size_is_an_error():
    with pytest.raises(ConfigError, match="data.resize = 28 is smaller than data.image_size = 32"):
        config(name="synthetic", image_size=32, resize=28)


def test_unknown_data_set_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"data.name = 'cifar11' is not a known data set; did you mean "
                                          r"'cifar10'\? valid: digits, synthetic, cifar10, cifar100, stl10, imagefolder\."):
        load_data(config(name="cifar11"))


def test_augments_is_the_training_transforms_randomness():
    for settings, random in (({}, False), ({"flip": True}, True), ({"crop": "random"}, True)):
        cfg = config(name="synthetic", **settings)
        assert augments(cfg) == BatchTransform.for_split(cfg, train=True).is_random == random


# --- batches: shapes, normalisation, order --------------------------------------------------------


def test_batch_shapes_dtypes_and_normalisation():
    cfg = config(name="synthetic", synthetic_size=20, image_size=16, resize=20)
    bundle = load_data(cfg)
    assert isinstance(bundle.train, InMemorySource) and isinstance(bundle.train, Source)
    assert bundle.train.views.shape == (20, 3, 20, 20) and bundle.train.views.dtype == torch.uint8
    x, y, idx = next(bundle.train.batches(8, shuffle=True, epoch=1))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and idx.dtype == torch.int64 and y.shape == idx.shape == (8,)
    assert torch.equal(y, bundle.train.labels[idx])
    centre = bundle.train.views[idx][..., 2:18, 2:18].float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x, (centre - mean) / std)

    raw = load_data(config(name="synthetic", synthetic_size=20, image_size=16, resize=20, normalize="none"))
    x, _, idx = next(raw.train.batches(8, shuffle=True, epoch=1))
    torch.testing.assert_close(x, centre)
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_num_batches_drop_last_and_coverage():
    source = load_data(config(name="synthetic", synthetic_size=10, image_size=8)).train
    assert source.num_batches(4) == 3 and source.num_batches(4, drop_last=True) == 2
    batches = collect(source, 4, shuffle=True, seed=3)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(10))
    assert [len(b[1]) for b in collect(source, 4, shuffle=True, drop_last=True)] == [4, 4]
    assert collect(source, 4, shuffle=True, start=3) == []


def test_shuffle_order_is_a_function_of_seed_and_epoch():
    assert torch.equal(epoch_order(50, shuffle=True, seed=1, epoch=2), epoch_order(50, shuffle=True, seed=1, epoch=2))
    assert not torch.equal(epoch_order(50, shuffle=True, seed=1, epoch=2), epoch_order(50, shuffle=True, seed=1, epoch=3))
    assert not torch.equal(epoch_order(50, shuffle=True, seed=1, epoch=2), epoch_order(50, shuffle=True, seed=2, epoch=2))
    assert torch.equal(epoch_order(50, shuffle=False, seed=1, epoch=2), torch.arange(50))
    # Consuming random numbers elsewhere does not move the order.
    torch.manual_seed(0)
    first = epoch_order(50, shuffle=True, seed=1, epoch=2)
    torch.rand(100)
    assert torch.equal(first, epoch_order(50, shuffle=True, seed=1, epoch=2))


# --- augmentation -----------------------------------------------------------------------------------

AUGMENTED = dict(name="synthetic", synthetic_size=40, image_size=16, crop="random", pad=4, flip=True,
                 normalize="none")


def test_augmentation_is_deterministic_and_resumes_with_start():
    source = load_data(config(**AUGMENTED)).train
    run = dict(shuffle=True, epoch=2, seed=5, augment=True)
    full = collect(source, 8, **run)
    assert_same_batches(full, collect(source, 8, **run))
    for start in (1, 3):
        assert_same_batches(collect(source, 8, start=start, **run), full[start:])
    # Another epoch draws other crops and another order.
    other = collect(source, 8, **{**run, "epoch": 3})
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, other))
    # Same order and batch positions but augmentation off: the centred views.
    plain = collect(source, 8, **{**run, "augment": False})
    assert all(torch.equal(a[2], b[2]) for a, b in zip(full, plain))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, plain))


def test_random_crops_are_padded_crops_possibly_mirrored():
    source = load_data(config(**AUGMENTED)).train
    x, _, idx = next(source.batches(16, shuffle=True, augment=True, seed=1))
    padded = torch.nn.functional.pad(source.views[idx], (4, 4, 4, 4))
    seen_flip = seen_offset = False
    for i in range(16):
        matches = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
                   if torch.equal(as_uint8(x[i]), (lambda c: c.flip(-1) if f else c)(padded[i, :, t:t + 16, l:l + 16]))]
        assert matches, f"image {i} is not a crop of its padded view"
        seen_flip |= any(f for _, _, f in matches)
        seen_offset |= any((t, l) != (4, 4) for t, l, _ in matches)
    assert seen_flip and seen_offset


def test_crop_and_flip_matches_slicing():
    views = torch.randint(0, 256, (3, 3, 10, 10), dtype=torch.uint8)
    top, left, flip = torch.tensor([0, 2, 4]), torch.tensor([4, 1, 0]), torch.tensor([False, True, False])
    out = crop_and_flip(views, top, left, flip, size=6, pad=0)
    for i in range(3):
        expected = views[i, :, top[i]:top[i] + 6, left[i]:left[i] + 6]
        assert torch.equal(out[i], expected.flip(-1) if flip[i] else expected)


def test_eval_batches_are_never_augmented():
    bundle = load_data(config(**AUGMENTED))
    assert bundle.train.transform.is_random and not bundle.test.transform.is_random
    augmented = collect(bundle.test, 16, shuffle=False, augment=True, seed=9)
    plain = collect(bundle.test, 16, shuffle=False)
    assert_same_batches(augmented, plain)
    # R = S here, so the un-augmented batch is the stored view itself (pad only matters when cropping randomly).
    assert torch.equal(as_uint8(plain[0][0]), bundle.test.views[:16])


def test_batch_transform_same_seed_same_output():
    transform = BatchTransform(12, crop="random", pad=2, flip=True)
    views = torch.randint(0, 256, (6, 3, 14, 14), dtype=torch.uint8)
    assert torch.equal(transform(views, seed=4), transform(views, seed=4))
    assert not torch.equal(transform(views, seed=4), transform(views, seed=5))
    assert torch.equal(transform(views), BatchTransform(12)(views))


# --- in memory vs streaming -------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
def test_streaming_matches_in_memory(drop_last):
    memory = load_data(config(in_memory="always", **AUGMENTED))
    stream = load_data(config(in_memory="never", **AUGMENTED))
    assert isinstance(stream.train, StreamingSource) and isinstance(memory.train, InMemorySource)
    assert memory.fingerprint == stream.fingerprint
    for kwargs in (dict(shuffle=True, epoch=1, seed=2, augment=True), dict(shuffle=False),
                   dict(shuffle=True, epoch=0, seed=2, augment=True, start=2)):
        assert_same_batches(collect(memory.train, 12, drop_last=drop_last, **kwargs),
                            collect(stream.train, 12, drop_last=drop_last, **kwargs))
    assert_same_batches(collect(memory.test, 16, shuffle=False), collect(stream.test, 16, shuffle=False))


def test_auto_streams_splits_over_the_memory_limit(monkeypatch):
    assert isinstance(load_data(config(name="synthetic", synthetic_size=8)).train, InMemorySource)
    monkeypatch.setattr(fkd.data.bundle, "IN_MEMORY_LIMIT_BYTES", 8 * 3 * 32 * 32 - 1)
    assert isinstance(load_data(config(name="synthetic", synthetic_size=8)).train, StreamingSource)


# --- fingerprint --------------------------------------------------------------------------------------


def test_fingerprint_tracks_the_training_view_only():
    base = dict(name="synthetic", synthetic_size=16)
    fp = load_data(config(**base)).fingerprint
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fp == load_data(config(**base, crop="random", pad=2, flip=True, batch_size=3)).fingerprint
    for change in (dict(image_size=16), dict(normalize="none"), dict(train_limit=8), dict(synthetic_classes=4)):
        assert load_data(config(**base, **change)).fingerprint != fp, change


# --- torchvision data sets --------------------------------------------------------------------------


def test_cifar10_standin(tmp_path, no_md5):
    (train_x, train_y), (test_x, test_y), names = write_cifar(tmp_path)
    cfg = config(name="cifar10", root=str(tmp_path), image_size=32, normalize="none")
    bundle = load_data(cfg)
    assert isinstance(bundle.train, InMemorySource)
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (20, 6, 10)
    assert bundle.class_names == names
    assert torch.equal(bundle.train.labels, train_y) and torch.equal(bundle.test.labels, test_y)
    assert torch.equal(bundle.train.views, train_x) and torch.equal(bundle.test.views, test_x)
    x, y, idx = next(bundle.test.batches(6, shuffle=False))
    assert torch.equal(as_uint8(x), test_x) and torch.equal(y, test_y)

    stream = load_data(config(name="cifar10", root=str(tmp_path), in_memory="never", crop="random", pad=4, flip=True))
    memory = load_data(config(name="cifar10", root=str(tmp_path), in_memory="always", crop="random", pad=4, flip=True))
    run = dict(shuffle=True, epoch=1, seed=4, augment=True)
    assert_same_batches(collect(stream.train, 8, **run), collect(memory.train, 8, **run))

    limited = load_data(config(name="cifar10", root=str(tmp_path), train_limit=7, in_memory="never"))
    assert len(limited.train) == 7 and torch.equal(limited.train.labels, train_y[:7])
    assert sorted(torch.cat([b[2] for b in collect(limited.train, 3, shuffle=True)]).tolist()) == list(range(7))


def test_cifar100_standin_uses_fine_labels(tmp_path, no_md5):
    (train_x, train_y), (test_x, test_y), names = write_cifar(tmp_path, hundred=True)
    bundle = load_data(config(name="cifar100", root=str(tmp_path), image_size=16, normalize="none"))
    assert bundle.num_classes == 100 and bundle.class_names == names
    assert torch.equal(bundle.train.labels, train_y) and torch.equal(bundle.test.labels, test_y)
    assert torch.equal(bundle.train.views, square_view(train_x, 16))


def test_stl10_standin_orientation_and_resize(tmp_path, no_md5):
    (train_x, train_y), (test_x, test_y), names = write_stl10(tmp_path)
    native = load_data(config(name="stl10", root=str(tmp_path), image_size=96))
    assert native.class_names == names and native.num_classes == 10
    assert torch.equal(native.train.views, train_x) and torch.equal(native.test.views, test_x)
    assert torch.equal(native.train.labels, train_y) and torch.equal(native.test.labels, test_y)
    small = load_data(config(name="stl10", root=str(tmp_path), image_size=32, in_memory="never"))
    x, _, idx = next(small.test.batches(4, shuffle=False, augment=True))
    assert x.shape == (4, 3, 32, 32)
    expected = BatchTransform(32)(square_view(test_x, 32))
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_stl10_without_class_names_file_uses_stl10s_own_names(tmp_path, no_md5):
    write_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "class_names.txt").unlink()  # torchvision then sets no `classes`
    assert load_data(config(name="stl10", root=str(tmp_path), image_size=96)).class_names == list(STL10_CLASSES)


def test_a_torchvision_data_set_without_class_names_is_never_given_another_sets_names(tmp_path, no_md5, monkeypatch):
    write_cifar(tmp_path)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_load_meta", lambda self: None)  # no `classes` read
    with pytest.raises(DataError, match="CIFAR-10 under .* lists no class names") as info:
        load_data(config(name="cifar10", root=str(tmp_path)))
    assert "airplane" not in str(info.value)


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                          ("stl10", "stl10_binary")])
def test_missing_offline_data_names_the_path(tmp_path, name, folder):
    with pytest.raises(DataError) as info:
        load_data(config(name=name, root=str(tmp_path)))
    message = str(info.value)
    assert str(tmp_path / folder) in message and "download" in message
    assert "\n" not in message


def test_failed_download_is_a_data_error(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(DataError, match="could not be downloaded"):
        load_data(config(name="cifar10", root=str(tmp_path), download=True))


def test_corrupted_files_are_a_data_error(tmp_path, no_md5):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="incomplete or corrupted"):
        load_data(config(name="cifar10", root=str(tmp_path)))


# --- image folders ------------------------------------------------------------------------------------


def test_image_folder(tmp_path):
    write_image_folder(tmp_path, {"train": {"cat": 3, "dog": 4}, "test": {"cat": 2, "dog": 1}}, size=(14, 10))
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    bundle = load_data(config(name="imagefolder", root=str(tmp_path), image_size=8, normalize="none"))
    assert bundle.class_names == ["cat", "dog"] and bundle.num_classes == 2
    assert bundle.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1] and bundle.test.labels.tolist() == [0, 0, 1]
    assert bundle.train.views.shape == (7, 3, 8, 8)
    from torchvision.transforms.functional import pil_to_tensor

    first = pil_to_tensor(Image.open(tmp_path / "train" / "cat" / "0.png").convert("RGB"))
    assert torch.equal(bundle.train.views[0], square_view(first, 8))
    gray = bundle.train.views[2]  # 2.png was saved grayscale
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    stream = load_data(config(name="imagefolder", root=str(tmp_path), image_size=8, in_memory="never", flip=True))
    memory = load_data(config(name="imagefolder", root=str(tmp_path), image_size=8, flip=True))
    run = dict(shuffle=True, seed=1, augment=True)
    assert_same_batches(collect(stream.train, 3, **run), collect(memory.train, 3, **run))


@pytest.mark.parametrize("layout, fragment", [
    (None, "does not exist"),
    ({"train": {"cat": 1}}, "has no 'test' folder"),
    ({"train": {"cat": 1, "dog": 1}, "test": {"cat": 1}}, "class 'dog' is in"),
    ({"train": {"cat": 1}, "test": {"cat": 1, "eel": 1}}, "class 'eel' is in"),
    ({"train": {"cat": 0, "dog": 0}, "test": {"cat": 1, "dog": 1}}, "no images found under"),
    ({"train": {"cat": 1, "dog": 0}, "test": {"cat": 1, "dog": 1}}, "has no images"),
    ({"train": {}, "test": {"cat": 1}}, "no class folders"),
])
def test_image_folder_errors(tmp_path, layout, fragment):
    root = tmp_path / "images"
    if layout is not None:
        write_image_folder(root, layout)
    with pytest.raises(DataError, match=fragment) as info:
        load_data(config(name="imagefolder", root=str(root)))
    assert str(root) in str(info.value)


def test_unreadable_image_names_the_file(tmp_path):
    write_image_folder(tmp_path, {"train": {"cat": 2}, "test": {"cat": 1}})
    (tmp_path / "train" / "cat" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="1.png"):
        load_data(config(name="imagefolder", root=str(tmp_path)))


# --- CUDA -------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches():
    run = dict(shuffle=True, epoch=1, seed=3, augment=True)
    cpu = load_data(config(**AUGMENTED))
    for mode in ("always", "never"):
        cuda = load_data(config(in_memory=mode, **AUGMENTED), device="cuda")
        x, y, idx = next(cuda.train.batches(8, **run))
        assert x.is_cuda and y.is_cuda and idx.is_cuda
        # Same order, crops and flips on both devices; the float division may round differently.
        for (xg, yg, ig), (xc, yc, ic) in zip(collect(cuda.train, 8, **run), collect(cpu.train, 8, **run)):
            assert torch.equal(yg, yc) and torch.equal(ig, ic) and torch.equal(as_uint8(xg), as_uint8(xc))
            torch.testing.assert_close(xg, xc, rtol=0, atol=1e-6)


def test_imagefolder_fingerprint_changes_when_an_image_is_replaced(tmp_path):
    import os

    from PIL import Image

    from fkd.config import DataConfig
    from fkd.data import load_data

    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (12, 12), (40 * i, 80, 120)).save(folder / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, num_workers=0)
    before = load_data(cfg).fingerprint
    assert load_data(cfg).fingerprint == before
    target = tmp_path / "train" / "a" / "0.png"
    Image.new("RGB", (12, 12), (255, 0, 0)).save(target)
    os.utime(target, ns=(1, 1))  # a different modification time, whatever the clock
    assert load_data(cfg).fingerprint != before


# --- augmentation drawn on the device, and the data order it leaves alone ----------------------------


def reference_crop_flip(views: torch.Tensor, top, left, flip, size: int, pad: int) -> torch.Tensor:
    """The per-example reference: pad one image, slice its crop, mirror it -- a plain loop over examples."""
    out = []
    for i in range(views.shape[0]):
        padded = torch.nn.functional.pad(views[i], (pad, pad, pad, pad))
        t, l = int(top[i]), int(left[i])
        crop = padded[:, t:t + size, l:l + size]
        out.append(crop.flip(-1) if bool(flip[i]) else crop)
    return torch.stack(out)


@pytest.mark.parametrize("view, size, pad", [(16, 16, 4), (20, 16, 0), (32, 32, 4)])
def test_device_augmentation_equals_a_per_example_crop_and_flip(view, size, pad):
    from fkd.data.order import augmentation_seed
    from fkd.data.transforms import BatchTransform

    views = torch.randint(0, 256, (64, 3, view, view), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    transform = BatchTransform(size, "random", pad, True, "none")
    seed = augmentation_seed(7, 3, 11)
    top, left, flip = transform.draw(64, view, seed)
    expected = reference_crop_flip(views, top, left, flip, size, pad)
    assert torch.equal(as_uint8(transform(views, seed=seed)), expected)
    # the same key draws the same crops; another batch's key others
    assert all(torch.equal(a, b) for a, b in zip((top, left, flip), transform.draw(64, view, seed)))
    other = transform.draw(64, view, augmentation_seed(7, 3, 12))
    assert not torch.equal(torch.stack([top, left]), torch.stack(other[:2]))
    slack = view + 2 * pad - size
    assert int(top.min()) >= 0 and int(top.max()) <= slack and int(left.max()) <= slack
    assert 0 < int(flip.sum()) < 64


def test_augmentation_draws_use_no_cpu_generator(monkeypatch):
    """The crops and flips come from a prng key on the batch's device, never from a torch.Generator."""
    from fkd.data import transforms

    def refused(*args, **kwargs):
        raise AssertionError("a CPU generator was used for augmentation")

    source = load_data(config(**AUGMENTED)).train
    monkeypatch.setattr(transforms.torch, "Generator", refused)
    x, _, _ = next(source.batches(8, shuffle=False, augment=True, seed=1))
    assert x.shape == (8, 3, 16, 16)


def test_augmentation_draws_are_uniform_enough():
    from fkd.data.transforms import BatchTransform

    top, left, flip = BatchTransform(32, "random", 4, True).draw(20000, 32, 12345)
    counts = torch.bincount(torch.cat([top, left]), minlength=9).double()
    assert counts.numel() == 9 and bool((counts / counts.mean() - 1).abs().max() < 0.05)
    assert abs(flip.double().mean().item() - 0.5) < 0.02


def test_data_order_is_unchanged():
    """The shuffle is the one it always was (values recorded before augmentation moved onto the device),
    and an augmented epoch visits exactly that order."""
    assert epoch_order(20, shuffle=True, seed=0, epoch=0).tolist() == [
        1, 7, 15, 12, 9, 18, 14, 6, 8, 10, 16, 17, 5, 2, 0, 11, 3, 19, 4, 13]
    assert epoch_order(20, shuffle=True, seed=3, epoch=7).tolist() == [
        16, 13, 11, 17, 2, 6, 15, 18, 1, 0, 7, 3, 10, 19, 12, 9, 4, 5, 14, 8]
    source = load_data(config(**AUGMENTED)).train
    seen = torch.cat([idx for _, _, idx in source.batches(8, shuffle=True, epoch=2, seed=5, augment=True)])
    assert torch.equal(seen, epoch_order(len(source), shuffle=True, seed=5, epoch=2))
