"""Data-parallel processes: the process group torchrun describes, and the host-side collectives fkd uses.

``torchrun --nproc_per_node=N cli.py distill ...`` starts N copies of fkd with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. :func:`init_from_env` turns
that into PyTorch's default process group -- gloo on CPUs, NCCL on CUDA with one GPU per local rank --
and returns the device this process trains on. Without those variables (a plain ``python cli.py``)
nothing is initialised and every helper here is the identity: one process is a world of size 1.

:class:`World` is a read-only view of the group (rank, size, whether this process is the one that
writes), with the host-side collectives the impure shell needs at its sync points: sums of counts,
agreement on a stop flag, and :meth:`World.from_main`, which runs a decision (start or resume a run,
read a checkpoint) on rank 0 and gives every rank its result or its error. The in-step collectives,
which must stay pure and traceable, live in :mod:`fkd.data_parallel`.

Collectives time out after ``FKD_COLLECTIVE_TIMEOUT_S`` seconds (default 600): a rank that stops
without its peers noticing (a crash torchrun has not seen yet) cannot hold the others forever.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, TypeVar

import attrs
import torch
import torch.distributed as dist

from fkd.errors import ConfigError, FkdError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 600
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """True when torchrun started this process with more than one process in the job."""
    return all(k in os.environ for k in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def collective_timeout() -> datetime.timedelta:
    """``FKD_COLLECTIVE_TIMEOUT_S`` (seconds, default 600) as the process group's timeout."""
    raw = os.environ.get("FKD_COLLECTIVE_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(f"FKD_COLLECTIVE_TIMEOUT_S = {raw!r} is not a positive number of seconds; "
                          f"unset it or set e.g. FKD_COLLECTIVE_TIMEOUT_S={DEFAULT_TIMEOUT_S}.")
    return datetime.timedelta(seconds=seconds)


def init_from_env(device: torch.device) -> torch.device:
    """Join the job torchrun started and return this process's device; ``device`` as is without torchrun.

    On CUDA each process takes ``cuda:LOCAL_RANK`` (torchrun's one-process-per-GPU convention) and the
    group uses NCCL; on CPUs the group uses gloo. Calling it again in an initialised process is a no-op.
    """
    if not is_distributed():
        return device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started local rank {local_rank}, but this node has "
                              f"{torch.cuda.device_count()} GPUs; lower --nproc_per_node to the GPU count.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=collective_timeout(), **kwargs)
    return device


def shutdown() -> None:
    """Leave the process group (at the end of a command; safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def slice_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part ``[lo, hi)`` of ``n`` items: ``lo = floor(rank * n / W)``.

    The parts are disjoint, cover ``0..n`` in order and differ in size by at most one, so
    ``concat(part_0, ..., part_{W-1})`` is the single-process sequence.
    """
    return rank * n // world_size, (rank + 1) * n // world_size


class SharedError(FkdError):
    """An error every rank raises alike (decided on rank 0, or from identical inputs): only rank 0 prints it."""


@attrs.frozen
class World:
    """The processes of this job, as seen from one of them.

    ``rank`` 0 is the main process: it alone writes files and prints. ``group_name`` names the
    process group for the functional collectives (None in a world of one).
    """

    rank: int = 0
    size: int = 1
    group_name: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def part(self, n: int) -> tuple[int, int]:
        """This rank's contiguous ``[lo, hi)`` of ``n`` items (see :func:`slice_bounds`)."""
        return slice_bounds(n, self.rank, self.size)

    def interleaved(self) -> slice:
        """This rank's examples of a global batch: every ``size``-th one from position ``rank``.

        Interleaved rather than contiguous, so that a batch laid out in blocks (a transfer-set batch puts
        its labeled examples first, :func:`fkd.data.transfer.mixed_order`) gives every rank its share of
        each block: a loss averaged over the labeled examples then stays the global batch's. Sizes differ
        by at most one (31 over 2 ranks: 16 + 15).
        """
        return slice(self.rank, None, self.size)

    def check_batch(self, batch_size: int, key: str = "data.batch_size") -> None:
        """Every rank needs at least one example of each global batch."""
        if batch_size < self.size:
            raise SharedError(f"{key} = {batch_size} is smaller than the {self.size} processes sharing each batch; "
                              f"raise it to at least {self.size} or start fewer processes.")

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks, outside a step (a new tensor on ``t``'s device; ``t`` is left as
        it was)."""
        if not self.parallel:
            return t
        out = t.to(_collective_device(), copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank (one small all-reduce, a host sync)."""
        if not self.parallel:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, items: list) -> list:
        """Every rank's ``items`` concatenated in rank order, on every rank (picklable objects; tensors
        should be on the CPU so that any rank can unpickle them)."""
        if not self.parallel:
            return list(items)
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, list(items))
        return [item for part in out for item in part]

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 only; every rank returns its result, or raises its :class:`FkdError`.

        For decisions that read files only rank 0 may rely on (the run directory, a checkpoint being
        resumed): the others never touch them, so a node without the shared file system still gets
        the same state. A rank-0 error is raised on every rank as a :class:`SharedError` carrying the same
        message (rank 0 prints it; the others exit quietly). The result must pickle.
        """
        if not self.parallel:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except FkdError as exc:
                box[0] = ("error", exc)
            except BaseException as exc:
                dist.broadcast_object_list([("crash", f"{type(exc).__name__}: {exc}")], src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "ok":
            return value
        if kind == "error":
            if self.is_main:
                raise value
            raise SharedError(str(value))
        raise SharedError(f"rank 0 failed ({value})")


def _collective_device() -> torch.device:
    """Where the group's collectives take their tensors: this rank's GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world() -> World:
    """This process's :class:`World`, read from torch.distributed (a world of one when no group is set up)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), dist.group.WORLD.group_name)


def is_main() -> bool:
    """True in the process that writes files and prints (rank 0, or the only process)."""
    return world().is_main


def echo_main(echo: Callable[[str], None]) -> Callable[[str], None]:
    """``echo`` on rank 0, a function that prints nothing on the other ranks."""
    return echo if is_main() else (lambda message: None)


def on_main(enter: Callable[[], Any]):
    """``enter()`` (a context manager, e.g. the run directory's lock) on rank 0; a no-op context elsewhere."""
    return enter() if is_main() else contextlib.nullcontext()


def describe() -> str:
    """``"; 2 processes (torchrun, gloo)"`` under torchrun, else ``""`` (for the run's header line)."""
    w = world()
    return f"; {w.size} processes (torchrun, {dist.get_backend()})" if w.parallel else ""


_PEER_GONE = ("closed by peer", "reset by peer", "broken pipe")
_TIMED_OUT = ("timed out", "timeout")


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process of the job went away or stopped
    answering (it timed out, see :func:`collective_timeout`).

    The in-step collectives raise gloo's error as a plain RuntimeError, so its message is what tells.
    """
    if not (dist.is_available() and dist.is_initialized() and isinstance(exc, RuntimeError)):
        return False
    return isinstance(exc, dist.DistError) or any(m in str(exc).lower() for m in _PEER_GONE + _TIMED_OUT)


def _timed_out(exc: BaseException) -> bool:
    return any(m in str(exc).lower() for m in _TIMED_OUT)


def error_line(exc: BaseException) -> str | None:
    """The one line this rank prints for ``exc`` (an :class:`FkdError` or a failed collective), or None.

    Errors every rank meets alike -- a bad config, a non-finite loss (the step's guard sees the global
    batch), a refusal decided on rank 0 -- are printed by rank 0 only. An error only one rank can meet
    (an unreadable file on its node) is printed by that rank, with its number. A collective that failed
    because a peer went away prints nothing: the peer printed its own error (or torchrun reports how it
    ended), and that is the one message. A timeout (a peer stopped responding) is printed by each rank that
    waited for it, with its number unless it is rank 0; any other failed collective by rank 0.
    """
    from fkd.errors import TrainingError

    # Before the group is joined (a config error) the rank comes from torchrun's environment.
    rank = world().rank if dist.is_initialized() else (int(os.environ["RANK"]) if is_distributed() else 0)
    if lost_peer(exc) and not isinstance(exc, FkdError):
        if any(m in str(exc).lower() for m in _PEER_GONE):
            return None
        if _timed_out(exc):  # gloo's "Timed out waiting 600000ms for recv operation to complete"
            # printed by every rank that waited (the frozen one, on waking, finds its peers gone: silent)
            seconds = collective_timeout().total_seconds()
            return (f"error{f' (rank {rank})' if rank else ''}: a collective operation timed out after {seconds:g} s "
                    "(FKD_COLLECTIVE_TIMEOUT_S): another process of the job stopped responding without exiting; the "
                    "last checkpoint was kept, so stop the job and continue it with --resume (raise "
                    "FKD_COLLECTIVE_TIMEOUT_S if a step legitimately takes longer).")
        return None if rank != 0 else f"error: a collective operation failed ({str(exc).splitlines()[0]})"
    if rank == 0:
        return f"error: {exc}"
    if isinstance(exc, (SharedError, ConfigError, TrainingError)):
        return None
    return f"error (rank {rank}): {exc}"


def launcher_words() -> list[str]:
    """How to start fkd again the way this job was started: ``["fkd"]``, or under torchrun
    ``["torchrun", "--nproc_per_node=N", "--no-python", "fkd"]`` (with ``--nnodes=M`` on several nodes;
    add your rendezvous options there)."""
    if not is_distributed():
        return ["fkd"]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    nodes = int(os.environ["WORLD_SIZE"]) // max(per_node, 1)
    return ["torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else []), f"--nproc_per_node={per_node}",
            "--no-python", "fkd"]
