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
  most ``MEMORY_LIMIT_BYTES``, else disk;
* ``off``    -- never cache.

The key is a SHA-256 over the teacher checkpoint's bytes, the data fingerprint (data set, view,
transform, labels; see :func:`fkd.data.data_fingerprint`), the feature names and the precision, so a
stale cache (another teacher, other data, another transform) is never used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import attrs
import torch

from fkd.checkpoint import load_checkpoint, save_checkpoint
from fkd.errors import CheckpointError

MEMORY_LIMIT_BYTES = 1 << 30
FORMAT = 1


@attrs.frozen(eq=False)
class TeacherCache:
    """Teacher outputs for every training example, indexed by dataset index.

    ``logits``: (N, K); ``features``: ``{name: (N, ...)}``; ``where``: ``"memory"`` or the disk path.
    """

    logits: torch.Tensor
    features: dict
    where: str
    device: torch.device

    def lookup(self, idx: torch.Tensor) -> dict:
        """Batch entries for dataset indices ``idx`` (B,): ``teacher_logits`` and ``teacher_features``."""
        if self.logits.device != idx.device:
            host_idx = idx.to(self.logits.device)
            pick = lambda t: t[host_idx].to(self.device, torch.float32, non_blocking=True)  # noqa: E731
        else:
            pick = lambda t: t[idx].float()  # noqa: E731
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
    from fkd.step import precision_autocast  # the step's policy, so cached == live outputs

    with torch.no_grad(), precision_autocast(x.device.type, precision):
        out, f, _ = teacher.apply(variables["params"], variables["buffers"], x, train=False)
    return out.float(), {n: v.float() for n, v in f.items()}


def compute_outputs(teacher, variables: dict, source, *, batch_size: int, precision: str, device) -> tuple:
    """One eval-mode pass of the teacher over ``source`` in dataset order -> ``(logits, features)``."""
    logits, feats = [], {n: [] for n in teacher.feature_names}
    for x, _, _ in source.batches(batch_size, shuffle=False):
        out, f = teacher_batch_outputs(teacher, variables, x, precision)
        logits.append(out)
        for n in feats:
            feats[n].append(f[n])
    return torch.cat(logits), {n: torch.cat(v) for n, v in feats.items()}


def build_cache(
    teacher, variables: dict, source, *, mode: str, key: str, cache_dir: str | Path, batch_size: int,
    precision: str, device, echo=print,
) -> TeacherCache:
    """Compute (or reuse) the teacher outputs for ``source`` as ``mode`` says (see module docstring)."""
    device = torch.device(device)
    path = Path(cache_dir) / f"teacher-{key[:32]}.pt"
    if mode in ("auto", "disk") and path.is_file():
        try:
            return _load(path, device, len(source))
        except CheckpointError:
            echo(f"ignoring unreadable teacher cache {path}; recomputing it")
    logits, feats = compute_outputs(teacher, variables, source, batch_size=batch_size, precision=precision,
                                    device=device)
    nbytes = logits.numel() * 4 + sum(v.numel() * 4 for v in feats.values())
    if mode == "memory" or (mode == "auto" and nbytes <= MEMORY_LIMIT_BYTES):
        return TeacherCache(logits, feats, "memory", device)
    save_checkpoint(path, {
        "key": key,
        "logits": logits.half().cpu(),
        "features": {k: v.half().cpu() for k, v in feats.items()},
    }, kind="teacher_cache")
    del logits, feats
    return _load(path, device, len(source))


def _load(path: Path, device: torch.device, n: int) -> TeacherCache:
    data = load_checkpoint(path, "teacher_cache", mmap=True)  # rows are read as batches ask for them
    if data["logits"].shape[0] != n:
        raise CheckpointError(f"teacher cache {path} has {data['logits'].shape[0]} rows, expected {n}")
    return TeacherCache(data["logits"], data["features"], str(path), device)
