"""Which device a run uses: the ``device`` key of a config (or ``--device``) resolved once, up front."""

from __future__ import annotations

import torch

from fkd.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu; an unavailable CUDA device is a :class:`ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but CUDA is not available here; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N.")
    return device


DEVICE_SHARE = 0.5
"""The largest share of a CUDA device's free memory that data held for a whole run (the training set's
views, the teacher cache) may take, leaving the rest to the step's activations and the allocator."""


def fits_on_device(nbytes: int, device: torch.device | str, *, limit: int, share: float = DEVICE_SHARE) -> bool:
    """Whether ``nbytes`` of run-long data (views, cached teacher outputs) are held on ``device``.

    At most ``limit`` bytes (the host-memory bound every device shares: the data pass through host memory
    first), and on CUDA at most ``share`` of the memory ``torch.cuda.mem_get_info`` reports free now. Held
    there, a batch is an index into a device tensor: no host-to-device copy and no host sync per step.
    """
    if nbytes > limit:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= share * free
    return True
