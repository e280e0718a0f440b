"""Teacher-output cache: run the teacher once per data set instead of once per step.

When the training view is deterministic (no random crop or flip), the teacher's outputs for an image
are the same every epoch, so they are computed in one pass over the training set and looked up by
dataset index afterwards. With random augmentation the teacher must see the student's augmented view
(the "consistent teacher" of Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and
consistent"), so it runs live and nothing is cached.

Where the outputs live (``teacher.cache``):

* ``memory`` -- float32 tensors on the training device;
* ``disk``   -- float16 under ``teacher.cache_dir/teacher-<key>.pt``, memory-mapped, reused by later runs;
* ``auto``   -- a disk cache with the same key when one exists, else memory when the outputs take at
  most ``MEMORY_LIMIT_BYTES`` (and, on CUDA, half the free device memory), else disk;
* ``off``    -- never cache.

A disk cache whose float16 outputs fit the device the same way (:func:`fkd.device.fits_on_device`) is
read onto it whole: each step's lookup is then an index into device tensors, with no host gather, copy
or synchronisation; one that does not fit stays memory-mapped and its rows are copied per batch.

The cache covers the whole training split, a transfer set's unlabeled images included. When the
teacher's features would not fit -- ``teacher.cache_max_gb``, and for a disk cache the free space under
``teacher.cache_dir`` (100,000 STL-10 images at 224 px with ResNet-18's ``layer1`` are ~40 GB as float16)
-- only the logits are cached (a file ``teacher-<key>-logits.pt``), a message says so, and the step runs
the teacher live up to its last feature (:meth:`fkd.models.Model.features_fn`).

The key is a SHA-256 over the teacher checkpoint's bytes, the data fingerprint (data set, view,
transform, labels; see :func:`fkd.data.data_fingerprint`), the feature names and the precision, so a
stale cache (another teacher, other data, another transform) is never used.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import attrs
import torch

from fkd import distributed
from fkd.checkpoint import load_checkpoint, save_checkpoint
from fkd.device import fits_on_device
from fkd.data.order import batch_count
from fkd.errors import CheckpointError

MEMORY_LIMIT_BYTES = 1 << 30
FORMAT = 1


@attrs.frozen(eq=False)
class TeacherCache:
    """Teacher outputs for every training example, indexed by dataset index.

    ``logits``: (N, K); ``features``: ``{name: (N, ...)}``; ``where``: ``"memory"`` or the disk path;
    ``logits_only``: the features did not fit, so batches carry no ``teacher_features`` and the step
    computes them live.
    """

    logits: torch.Tensor
    features: dict
    where: str
    device: torch.device
    logits_only: bool = False

    def lookup(self, idx: torch.Tensor) -> dict:
        """Batch entries for dataset indices ``idx`` (B,): ``teacher_logits`` and ``teacher_features``
        (the latter absent from a logits-only cache)."""
        if self.logits.device != idx.device:
            host_idx = idx.to(self.logits.device)
            pick = lambda t: t[host_idx].to(self.device, torch.float32, non_blocking=True)  # noqa: E731
        else:
            pick = lambda t: t[idx].float()  # noqa: E731
        if self.logits_only:
            return {"teacher_logits": pick(self.logits)}
        return {"teacher_logits": pick(self.logits), "teacher_features": {k: pick(v) for k, v in self.features.items()}}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(teacher_checkpoint: str | Path, data_fingerprint: str, feature_names, precision: str) -> str:
    """SHA-256 hex key of everything that determines the cached outputs."""
    payload = {
        "format": FORMAT,
        "teacher": file_sha256(teacher_checkpoint),
        "data": data_fingerprint,
        "features": list(feature_names),
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def teacher_batch_outputs(teacher, variables: dict, x: torch.Tensor, precision: str) -> tuple:
    """The teacher in eval mode on one batch -> fp32 ``(logits (B, K), {name: feature})``, no gradients."""
    from fkd.step import float32_math, precision_autocast  # the step's policy, so cached == live outputs

    with torch.no_grad(), precision_autocast(x.device.type, precision), float32_math(precision, x.device):
        out, f, _ = teacher.apply(variables["params"], variables["buffers"], x, train=False)
    return out.float(), {n: v.float() for n, v in f.items()}


def compute_outputs(teacher, variables: dict, source, *, batch_size: int, precision: str, device,
                    features: bool = True) -> tuple:
    """One eval-mode pass of the teacher over ``source`` in dataset order -> ``(logits, features)``
    (``features`` False: ``(logits, {})``).

    Under torchrun each rank runs the teacher on a contiguous block of the batches and the blocks are
    shared by a sum over ranks of zero-padded copies (exact: every row has one non-zero contributor), so
    the teacher runs once per example in the job and every rank holds the whole cache.
    """
    world = distributed.world()
    if world.parallel:
        first, last = world.part(batch_count(len(source), batch_size))
        # A rank with no batch of its own (more ranks than batches) runs the first one for the shapes only.
        blocks = itertools.islice(source.batches(batch_size, shuffle=False, start=first if last > first else 0),
                                  max(last - first, 1))
    else:
        blocks = source.batches(batch_size, shuffle=False)
    logits, feats = [], {n: [] for n in (teacher.feature_names if features else ())}
    for x, _, _ in blocks:
        out, f = teacher_batch_outputs(teacher, variables, x, precision)
        logits.append(out)
        for n in feats:
            feats[n].append(f[n])
    logits, feats = torch.cat(logits), {n: torch.cat(v) for n, v in feats.items()}
    if not world.parallel:
        return logits, feats
    lo, hi = first * batch_size, min(last * batch_size, len(source))
    return _share_rows(logits, lo, hi, len(source), world), {n: _share_rows(v, lo, hi, len(source), world)
                                                             for n, v in feats.items()}


def _share_rows(mine: torch.Tensor, lo: int, hi: int, n: int, world) -> torch.Tensor:
    """The (n, ...) tensor whose rows ``lo:hi`` this rank computed (``mine``), the rest by the others:
    a sum over ranks of zero-padded copies."""
    full = torch.zeros((n, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
    full[lo:hi] = mine[:hi - lo]
    return world.sum(full)


def feature_values_per_example(teacher, variables: dict, source, precision: str) -> int:
    """How many feature values the teacher gives per example (0 without features), from one example."""
    if not teacher.feature_names or len(source) == 0:
        return 0
    x, _, _ = next(iter(source.batches(1, shuffle=False)))
    _, feats = teacher_batch_outputs(teacher, variables, x, precision)
    return sum(v[0].numel() for v in feats.values())


def free_bytes(folder: str | Path) -> int:
    """Free space on the file system that holds ``folder`` (or its nearest existing parent)."""
    path = Path(folder).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def features_fit(n_values: int, mode: str, max_bytes: int, cache_dir: str | Path) -> bool:
    """Whether ``n_values`` feature values fit the cache: as float32 in memory within ``max_bytes``, or as
    float16 on disk within ``max_bytes`` and the free space under ``cache_dir``."""
    if mode == "memory":
        return n_values * 4 <= max_bytes
    if mode == "auto" and n_values * 4 <= min(MEMORY_LIMIT_BYTES, max_bytes):
        return True
    return n_values * 2 <= min(max_bytes, free_bytes(cache_dir))


def build_cache(
    teacher, variables: dict, source, *, mode: str, key: str, cache_dir: str | Path, batch_size: int,
    precision: str, device, echo=print, max_bytes: int = 16 * 10**9,
) -> TeacherCache:
    """Compute (or reuse) the teacher outputs for ``source`` as ``mode`` says (see module docstring);
    the features only when they fit ``max_bytes`` (and the disk), else the logits alone, with a message."""
    device = torch.device(device)
    n_values = len(source) * feature_values_per_example(teacher, variables, source, precision)
    logits_only = n_values > 0 and not features_fit(n_values, mode, max_bytes, cache_dir)
    if logits_only:
        echo(f"teacher cache: the features of {len(source):,} images would take {n_values * 2 / 1e9:.1f} GB as "
             f"float16, more than teacher.cache_max_gb = {max_bytes / 1e9:g} or the free space under '{cache_dir}'; "
             "caching the logits only, the teacher runs live up to its last feature each step")
    path = Path(cache_dir) / f"teacher-{key[:32]}{'-logits' if logits_only else ''}.pt"
    world = distributed.world()
    # Under torchrun every rank must take the same branch: reuse the file only when all of them see it.
    if mode in ("auto", "disk") and not world.any(not path.is_file()):
        try:
            return _load(path, device, len(source), logits_only)
        except CheckpointError:
            echo(f"ignoring unreadable teacher cache {path}; recomputing it")
    logits, feats = compute_outputs(teacher, variables, source, batch_size=batch_size, precision=precision,
                                    device=device, features=not logits_only)
    nbytes = logits.numel() * 4 + sum(v.numel() * 4 for v in feats.values())
    if mode == "memory" or (mode == "auto" and fits_on_device(nbytes, device, limit=MEMORY_LIMIT_BYTES)):
        return TeacherCache(logits, feats, "memory", device, logits_only)
    if world.is_main:  # the others read it back (cache_dir must then be on a shared file system)
        save_checkpoint(path, {
            "key": key,
            "logits": logits.half().cpu(),
            "features": {k: v.half().cpu() for k, v in feats.items()},
        }, kind="teacher_cache")
    del logits, feats
    world.barrier()
    return _load(path, device, len(source), logits_only)


def _load(path: Path, device: torch.device, n: int, logits_only: bool = False) -> TeacherCache:
    data = load_checkpoint(path, "teacher_cache", mmap=True)  # rows are read as batches ask for them
    if data["logits"].shape[0] != n:
        raise CheckpointError(f"teacher cache {path} has {data['logits'].shape[0]} rows, expected {n}")
    return on_device_if_fits(TeacherCache(data["logits"], data["features"], str(path), device, logits_only))


def on_device_if_fits(cache: TeacherCache) -> TeacherCache:
    """``cache`` with its outputs moved onto its training device (kept float16; a lookup returns float32)
    when they fit there (:func:`fkd.device.fits_on_device` within ``MEMORY_LIMIT_BYTES``), else as it is."""
    tensors = [cache.logits, *cache.features.values()]
    if all(t.device == cache.device for t in tensors):
        return cache
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    if not fits_on_device(nbytes, cache.device, limit=MEMORY_LIMIT_BYTES):
        return cache
    return attrs.evolve(cache, logits=cache.logits.to(cache.device),
                        features={k: v.to(cache.device) for k, v in cache.features.items()})
