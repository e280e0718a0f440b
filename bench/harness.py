"""``fkd bench``: the cost of one distillation step, fkd's way and the imperative way, side by side.

This harness lives in the repository's ``bench/`` folder, not in the ``fkd`` package: ``python cli.py
bench`` loads it from a clone (:mod:`fkd.clone_files`).

Every variant trains the same student (same initial weights) on the same batch on the same device:

================  ==================================================================================
``imperative``    the baseline users would otherwise write (``bench/imperative.py``): ``nn.Module``,
                  forward hooks, ``loss.backward()``, ``torch.optim`` (foreach), teacher under no_grad
``functional``    :func:`fkd.step.make_train_step`, eager
``compiled``      the same step under ``torch.compile`` (``train.compile_mode``), on any device
``student_only``  the student's step with no teacher (CE only): the floor distillation approaches
``cached``        distillation with the teacher's outputs looked up in a :class:`fkd.cache.TeacherCache`
================  ==================================================================================

``student_only`` and ``cached`` follow ``train.compile`` (``auto``: compiled on CUDA, eager on the CPU), so
on a GPU they are compared with ``compiled`` and on a CPU with ``functional``. ``train.precision`` (bf16
autocast) and ``train.channels_last`` (CUDA only) apply to every variant, the imperative one included.

Timing, in two passes. First each variant alone: built, ``warmup`` untimed steps (``torch.compile``
compiles here; their wall time is ``warmup_s``, the first step's loss ``first_loss``), its peak memory
read, then freed. Then all variants together, rebuilt from the same initial weights (a compiled step
comes from ``torch.compile``'s cache): one more untimed step each, then rounds in which every variant
takes a block of up to five consecutive timed steps, the starting variant moving on each round, until
each has taken ``steps``: a change in the machine's load or clock during the run touches all variants
alike. The figure is the median. On CUDA each step is timed with CUDA events recorded on the stream (no
host sync inside the timed rounds), on the CPU with ``perf_counter``.

Peak memory (``peak_mem_mb``), from the first pass: on CUDA ``torch.cuda.max_memory_allocated`` with the
peak reset before each variant is built (it includes what all variants share: the data, the batch, the
teacher's weights). On Linux CPUs it is the process's peak resident set (``VmHWM``), reset per variant
through ``/proc/self/clear_refs``: the whole process (Python, torch, the data) at its highest during
that variant. Where the reset is refused it is the process peak since start, and the table says so.

The teacher has random weights (``teacher.weights`` and its checkpoint are ignored): the cost of a step
does not depend on their values, and the benchmark runs offline. The cache holds the teacher's outputs
for the benchmark's batch only: a lookup gathers the batch's rows whatever the cache's length.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import attrs
import torch

from fkd import objective as objective_lib
from fkd.cache import TeacherCache, compute_outputs
from fkd.clone_files import load_clone_module
from fkd.config import Config
from fkd.data import load_data
from fkd.distill_setup import preflight
from fkd.errors import ConfigError
from fkd.models.from_config import build_teacher
from fkd.objective import Objective, from_weights
from fkd.run_setup import TrainingSetup, build_training, uses_channels_last
from fkd.step import maybe_compile, should_compile
from fkd.population import Population, choose_strategy, freeze_diverged
from fkd.sweep.runner import student_state

def load_imperative_baseline():
    """The notebook-style baseline, ``bench/imperative.py`` beside this file.

    It lives outside the ``fkd`` package on purpose: it captures features with forward hooks, as the
    notebook does, and the package itself never registers a hook.
    """
    return load_clone_module("bench/imperative.py", "the imperative baseline")


MIN_CLI_STEPS = 20


@attrs.frozen(eq=False)
class BenchReport:
    """What :func:`run_bench` measured: one row per variant and what they share.

    ``rows``: dicts with ``variant``, ``ms_per_step`` (median), ``images_per_s``, ``peak_mem_mb``,
    ``ratio`` (ms over ``imperative``'s, None without it), ``first_loss`` (the first warm-up step's loss:
    equal across the distillation variants, since they start from the same weights), ``warmup_s``,
    ``compiled``, ``steps``, ``device``. ``context``: config name, device, batch shape, models, method,
    memory measure, threads and load average at the start.
    """

    rows: list
    context: dict

    def json_lines(self) -> list[str]:
        """One JSON object per variant (its row and the context's ``device``, ``batch_size``, ...)."""
        shared = {k: self.context[k] for k in ("device", "batch_size", "image_size", "mem_kind")}
        return [json.dumps({**row, **shared}) for row in self.rows]

    def table(self) -> str:
        """A fixed-width table with a header line saying what was measured and how."""
        c = self.context
        head = [
            f"bench {c['config']}: {c['method']} ({c['weights']}), student {c['student']}, teacher {c['teacher']}"
            + (" (random weights)" if c["teacher"] != "none" else ""),
            f"device {c['device']} ({c['threads']} threads, load avg {c['loadavg']}), batch {c['batch_size']} x "
            f"3x{c['image_size']}x{c['image_size']}, precision {c['precision']}, channels_last "
            f"{c['channels_last']}; median of {c['steps']} steps per variant, timed in interleaved rounds after "
            f"{c['warmup']} warm-up step(s)"
            + (f"; each step trains {c['sweep']} students (bench --sweep)" if c.get("sweep") else ""),
        ]
        mem_header = {"cuda_max_allocated": "peak MB (cuda alloc)", "rss_per_variant": "peak RSS MB",
                      "rss_process": "proc peak RSS MB"}[c["mem_kind"]]
        ratio_header = "x sweep_sequential" if c.get("sweep") else "x imperative"
        cols = ("variant", "ms/step", "images/s", mem_header, ratio_header, "first loss", "warm-up s", "compiled")
        body = [cols]
        for r in self.rows:
            body.append((
                r["variant"], f"{r['ms_per_step']:.2f}", f"{r['images_per_s']:.0f}", f"{r['peak_mem_mb']:.0f}",
                "-" if r["ratio"] is None else f"{r['ratio']:.2f}", f"{r['first_loss']:.5f}",
                f"{r['warmup_s']:.1f}", "yes" if r["compiled"] else "no",
            ))
        widths = [max(len(row[i]) for row in body) for i in range(len(cols))]
        lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
                 for row in body]
        lines.insert(1, "-" * len(lines[0]))
        by = {r["variant"]: r for r in self.rows}
        if "cached" in by and "student_only" in by:
            floor = by["cached"]["ms_per_step"] / by["student_only"]["ms_per_step"]
            lines.append(f"cached / student_only = {floor:.2f}")
        mem_note = {
            "cuda_max_allocated": "peak memory: torch.cuda.max_memory_allocated, reset before each variant",
            "rss_per_variant": "peak memory: the process's peak RSS (VmHWM) during each variant, reset between",
            "rss_process": "peak memory: the process's peak RSS since start (the per-variant reset was refused)",
        }[c["mem_kind"]]
        return "\n".join(head + [""] + lines + [mem_note])


# --- what the variants share -----------------------------------------------------------------


@attrs.frozen(eq=False)
class _Setup:
    cfg: Config
    device: torch.device
    objective: Objective
    student: object
    student_vars: dict
    teacher: object
    teacher_vars: dict | None
    objective_params: dict
    objective_state: dict
    steps_per_epoch: int  # the schedule spans the whole benchmark: warm-up and timed steps, one "epoch"
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    shapes: object = None
    num_classes: int = 0
    sweep: int = 0  # students per sweep variant (bench --sweep K)

    def training(self, objective: Objective, *, compile: bool, teacher) -> TrainingSetup:
        """The run setup every fkd variant shares (:func:`fkd.run_setup.build_training`)."""
        cfg = self.cfg
        own = objective is self.objective
        return build_training(
            self.student, objective, attrs.evolve(cfg.train, epochs=1), params=self.student_vars["params"],
            buffers=self.student_vars["buffers"], objective_params=self.objective_params if own else None,
            objective_state=self.objective_state if own else None, teacher=teacher,
            steps_per_epoch=self.steps_per_epoch, batch_size=cfg.data.batch_size, seed=cfg.seed, augment=False,
            device=self.device, compile="on" if compile else "off", quiet=True)


def _setup(cfg: Config, device: torch.device, total_steps: int) -> _Setup:
    data = load_data(cfg.data, device=device)
    first = next(iter(data.train.batches(cfg.data.batch_size, shuffle=False, drop_last=True)), None)
    if first is None:
        raise ConfigError(f"the training set has {len(data.train)} images, fewer than one batch of "
                          f"{cfg.data.batch_size}; lower data.batch_size.")
    x, y, idx = first
    pre = preflight(cfg, data.num_classes, len(data.train), device)
    obj = pre.objective
    teacher = teacher_vars = None
    if obj.needs_teacher:
        teacher, t_params, t_buffers = build_teacher(cfg, data.num_classes, obj.teacher_feature_names,
                                                     seed=cfg.seed + 1, device=device)
        teacher_vars = {"params": t_params, "buffers": t_buffers}
    objective_params, objective_state = obj.init(pre.shapes, seed=cfg.seed, device=device)
    return _Setup(cfg, device, obj, pre.student, {"params": pre.params, "buffers": pre.buffers}, teacher,
                  teacher_vars, objective_params, objective_state, max(total_steps, 1), x, y, idx, pre.shapes,
                  data.num_classes)


# --- the variants: each builds a zero-argument "one training step" -----------------------------


@attrs.frozen(eq=False)
class _Runner:
    step_once: Callable[[], torch.Tensor]  # one training step; returns its loss (a device tensor)
    compiled: bool
    close: Callable[[], None] = lambda: None


def _imperative(s: _Setup) -> _Runner:
    training = s.training(s.objective, compile=False, teacher=None)  # its schedule and layout
    distiller = load_imperative_baseline().ImperativeDistiller(
        s.objective, s.student, s.student_vars, s.cfg.train.optimizer, teacher=s.teacher,
        teacher_vars=s.teacher_vars, regressors=s.objective_params.get("feature", {}), schedule=training.schedule,
        precision=s.cfg.train.precision, channels_last=training.channels_last, device=s.device)
    return _Runner(lambda: distiller.train_step(s.x, s.y), compiled=False, close=distiller.close)


class _OneBatch:
    """The benchmark batch as a source for :func:`fkd.cache.compute_outputs`."""

    def __init__(self, x, y, idx):
        self.x, self.y, self.idx = x, y, idx

    def batches(self, batch_size, *, shuffle=False, **_):
        yield self.x, self.y, self.idx


def _functional(s: _Setup, *, compile: bool, objective: Objective, use_teacher: bool, cached: bool) -> _Runner:
    training = s.training(objective, compile=compile, teacher=s.teacher if use_teacher else None)
    step = training.step
    teacher_vars = training.layout(s.teacher_vars) if use_teacher else None  # once, not per step
    lookup = None
    if cached:
        logits, feats = compute_outputs(s.teacher, s.teacher_vars, _OneBatch(s.x, s.y, s.idx),
                                        batch_size=s.x.shape[0], precision=s.cfg.train.precision, device=s.device)
        # Rows 0..B-1 of a memory cache of the whole split: the benchmark batch is the first, unshuffled.
        rows = torch.zeros(int(s.idx.max()) + 1, dtype=torch.int64, device=s.device)
        rows[s.idx] = torch.arange(s.idx.shape[0], device=s.device)
        cache = TeacherCache(logits[rows], {k: v[rows] for k, v in feats.items()}, "memory", s.device)
        lookup = cache.lookup
    cudagraphs = compile and s.device.type == "cuda" and s.cfg.train.compile_mode == "reduce-overhead"
    holder = {"state": training.state}

    def step_once() -> torch.Tensor:
        batch = {"x": s.x, "y": s.y, "idx": s.idx}
        if lookup is not None:
            batch.update(lookup(s.idx))
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        holder["state"], metrics = step(holder["state"], batch, teacher_vars)
        return metrics["loss"]

    return _Runner(step_once, compiled=compile)


def _sweep_runner(s: _Setup, *, strategy: str | None, tensors_in_state: bool) -> _Runner:
    """One step of ``s.sweep`` students (seeds ``cfg.seed + i``) on the benchmark batch, as ``fkd sweep``
    runs them (a :class:`~fkd.population.Population` with ``strategy`` "vmap" or "loop" and freeze-on-diverge,
    term numbers as tensors in each state) or as K plain single-student steps one after another
    (``strategy=None``). The teacher's outputs come from a cache, as in a sweep with a deterministic view;
    every variant follows ``train.compile``."""
    training = s.training(s.objective, compile=False, teacher=None)
    hyper = {"terms": s.objective.hyper_defaults()} if tensors_in_state else None
    states = [student_state(attrs.evolve(s.cfg, seed=s.cfg.seed + i), s.objective, s.shapes, s.num_classes,
                            s.steps_per_epoch, training.layout, hyper, s.device) for i in range(s.sweep)]
    batch = {"x": s.x, "y": s.y, "idx": s.idx}
    if s.objective.needs_teacher:
        logits, feats = compute_outputs(s.teacher, s.teacher_vars, _OneBatch(s.x, s.y, s.idx),
                                        batch_size=s.x.shape[0], precision=s.cfg.train.precision, device=s.device)
        batch.update(teacher_logits=logits, teacher_features=feats)
    train = s.cfg.train
    if strategy is not None:
        population = Population(s.sweep, strategy)
        step = maybe_compile(population.wrap(freeze_diverged(training.step)), train.compile, s.device.type,
                             train.compile_mode)
        holder = {"states": population.gather(states)}
        batches = [batch] * s.sweep

        def step_once() -> torch.Tensor:
            holder["states"], metrics = step(holder["states"], batches, None)
            return metrics["loss"].sum()
    else:
        step = maybe_compile(training.step, train.compile, s.device.type, train.compile_mode)
        holder = {"states": states}

        def step_once() -> torch.Tensor:
            out = [step(st, batch, None) for st in holder["states"]]
            holder["states"] = [o[0] for o in out]
            return sum(o[1]["loss"] for o in out)

    return _Runner(step_once, compiled=should_compile(train.compile, s.device.type))


def sweep_variants(device: torch.device) -> tuple[str, ...]:
    """``bench --sweep K``: ``sweep`` (as ``fkd sweep`` runs on this device), ``sweep_sequential`` (K plain
    steps), and ``sweep_vmap`` when ``sweep`` chose another strategy."""
    chosen = choose_strategy("auto", device)
    return ("sweep_sequential", "sweep") + (("sweep_vmap",) if chosen != "vmap" else ())


def _follows_config(s: _Setup) -> bool:
    return should_compile(s.cfg.train.compile, s.device.type)


#: variant name -> runner builder, in the report's order.
RUNNERS: dict[str, Callable[[_Setup], _Runner]] = {
    "imperative": _imperative,
    "functional": lambda s: _functional(s, compile=False, objective=s.objective, use_teacher=True, cached=False),
    "compiled": lambda s: _functional(s, compile=True, objective=s.objective, use_teacher=True, cached=False),
    "student_only": lambda s: _functional(s, compile=_follows_config(s), objective=from_weights({"ce": 1.0}),
                                          use_teacher=False, cached=False),
    "cached": lambda s: _functional(s, compile=_follows_config(s), objective=s.objective, use_teacher=False,
                                    cached=True),
    "sweep": lambda s: _sweep_runner(s, strategy=choose_strategy("auto", s.device), tensors_in_state=True),
    "sweep_sequential": lambda s: _sweep_runner(s, strategy=None, tensors_in_state=False),
    "sweep_vmap": lambda s: _sweep_runner(s, strategy="vmap", tensors_in_state=True),
}
SWEEP_VARIANTS = ("sweep", "sweep_sequential", "sweep_vmap")
VARIANTS = tuple(v for v in RUNNERS if v not in SWEEP_VARIANTS)


def _build_runner(name: str, s: _Setup) -> _Runner:
    return RUNNERS[name](s)


# --- measuring -------------------------------------------------------------------------------


class _PeakMemory:
    """Peak memory of one variant; see the module docstring for what it is on each device."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        else:
            self.kind = "rss_per_variant" if self._reset_rss() else "rss_process"

    @staticmethod
    def _reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS
                f.write("5")
            return True
        except OSError:
            return False

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "rss_per_variant":
            self._reset_rss()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process peak


def _compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(runner: _Runner, device: torch.device, warmup: int) -> tuple[float, float]:
    """Run ``warmup`` untimed steps -> ``(their wall seconds, the first step's loss)``."""
    _synchronize(device)
    t0 = time.perf_counter()
    first_loss = float(runner.step_once())  # a host sync, outside the timed steps
    for _ in range(warmup - 1):
        runner.step_once()
    _synchronize(device)
    return time.perf_counter() - t0, first_loss


BLOCK_STEPS = 5  # consecutive steps per variant in a round: enough for it to reach its steady state


def _interleaved_times(runners: dict, device: torch.device, steps: int) -> dict[str, list[float]]:
    """Milliseconds of ``steps`` steps per runner, taken in rounds.

    Each round runs every variant for up to :data:`BLOCK_STEPS` consecutive steps (a variant's first
    step after another's is slower: caches and the allocator hold the other's tensors; the median
    drops it), the first variant moving on each round, so that a change in the machine's load or clock
    during the run touches all variants alike.
    """
    names = list(runners)
    cuda = device.type == "cuda"
    samples: dict[str, list] = {n: [] for n in names}
    done, r = 0, 0
    while done < steps:
        block = min(BLOCK_STEPS, steps - done)
        for name in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(block):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    runners[name].step_once()
                    end.record()
                    samples[name].append((start, end))
                else:
                    t = time.perf_counter()
                    runners[name].step_once()
                    samples[name].append((time.perf_counter() - t) * 1e3)
        done += block
        r += 1
    if cuda:
        torch.cuda.synchronize(device)
        return {n: [a.elapsed_time(b) for a, b in samples[n]] for n in names}
    return samples


def resolve_variants(variants, objective: Objective, echo: Callable[[str], None] = lambda m: None) -> tuple[str, ...]:
    """The variants to run, in the canonical order; ``None`` means all that apply to the objective.

    ``cached`` applies when a term consumes the teacher; ``imperative`` when the baseline can express
    every term (otherwise it is skipped with a message, rather than timing a different loss).
    """
    missing = load_imperative_baseline().unsupported_terms(objective)
    if variants is None:
        if missing:
            echo(f"bench: skipping 'imperative': bench/imperative.py cannot express the term(s) {', '.join(missing)}")
        return tuple(v for v in VARIANTS
                     if (v != "cached" or objective.needs_teacher) and (v != "imperative" or not missing))
    names = [v.strip() for v in variants if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ConfigError(f"unknown bench variant '{unknown[0] if unknown else ''}'; valid variants: "
                          f"{', '.join(VARIANTS)} (comma-separated).")
    if "cached" in names and not objective.needs_teacher:
        raise ConfigError("the 'cached' variant caches the teacher, but no term of this objective uses it; "
                          "drop it from --variants or pick a distillation method.")
    if "imperative" in names and missing:
        raise ConfigError(f"the imperative baseline cannot express the term(s) {', '.join(missing)}; drop "
                          "'imperative' from --variants (or add the term to bench/imperative.py).")
    return tuple(v for v in VARIANTS if v in names)


def run_bench(
    cfg: Config,
    device: torch.device | str,
    *,
    steps: int = MIN_CLI_STEPS,
    warmup: int = 3,
    variants=None,
    config_name: str = "",
    sweep: int = 0,
    echo: Callable[[str], None] = lambda message: None,
) -> BenchReport:
    """Time one training step of each variant (see the module docstring) and return the report.

    Args:
        cfg: the run's config (data, student, teacher, objective, optimizer, train.compile_mode, ...).
        steps: timed steps per variant (the CLI insists on at least 20; tests use fewer).
        warmup: untimed steps first (at least 1; compilation happens here).
        variants: names from :data:`VARIANTS`, or None for all that apply.
        sweep: K > 0 times one step of K students instead (:func:`sweep_variants`); each row's ``ratio``
            is then over ``sweep_sequential`` (K plain steps one after another).
        echo: progress messages (one per variant).
    """
    if steps < 1 or warmup < 1:
        raise ConfigError(f"bench needs steps >= 1 and warmup >= 1 (got {steps} and {warmup}).")
    device = torch.device(device)
    if sweep and variants:
        raise ConfigError("--sweep picks its own variants (sweep, sweep_sequential, sweep_vmap); drop --variants.")
    names = sweep_variants(device) if sweep else resolve_variants(variants, objective_lib.from_config(cfg.distill),
                                                                  echo)
    loadavg = "n/a"
    with contextlib.suppress(OSError):
        loadavg = " ".join(f"{v:.2f}" for v in os.getloadavg())
    setup = attrs.evolve(_setup(cfg, device, warmup + steps), sweep=sweep)
    memory = _PeakMemory(device)
    # Pass 1, one variant at a time: build, warm up (torch.compile compiles here), read its peak memory.
    warm: dict[str, dict] = {}
    for name in names:
        memory.start()
        runner = _build_runner(name, setup)
        echo(f"bench: {name}: {warmup} warm-up step(s){' (compiling)' if runner.compiled else ''}")
        try:
            warmup_s, first_loss = _warm_up(runner, device, warmup)
        finally:
            runner.close()
        warm[name] = {"peak_mem_mb": memory.peak_mb(), "first_loss": first_loss, "warmup_s": warmup_s,
                      "compiled": runner.compiled}
        del runner
    # Pass 2, all variants together: rebuilt from the same initial weights (a compiled step is found
    # in torch.compile's cache), one more warm-up step each, then the timed steps in rounds.
    echo(f"bench: timing {steps} steps of each variant, in rounds")
    runners = {name: _build_runner(name, setup) for name in names}
    try:
        for runner in runners.values():
            runner.step_once()
        graphs = _compiled_graphs()
        times = _interleaved_times(runners, device, steps)
        if _compiled_graphs() != graphs:
            echo("bench: warning: torch.compile compiled again during the timed steps; raise --warmup")
    finally:
        for runner in runners.values():
            runner.close()
    del runners
    rows = []
    for name in names:
        ms = statistics.median(times[name])
        rows.append({
            "variant": name,
            "ms_per_step": ms,
            "images_per_s": setup.x.shape[0] * (sweep or 1) / (ms / 1e3),
            **warm[name],
            **({"students": sweep} if sweep else {}),
            "steps": steps,
            "ms_min": min(times[name]),
        })
    reference = "sweep_sequential" if sweep else "imperative"
    base = next((r["ms_per_step"] for r in rows if r["variant"] == reference), None)
    for r in rows:
        r["ratio"] = None if base is None else r["ms_per_step"] / base
    obj = setup.objective
    context = {
        "config": config_name or cfg.name,
        "device": str(device),
        "batch_size": int(setup.x.shape[0]),
        "image_size": int(setup.x.shape[-1]),
        "student": cfg.student.arch,
        "teacher": cfg.teacher.arch if obj.needs_teacher else "none",
        "method": cfg.distill.preset,
        "weights": ", ".join(f"{k} {w:g}" for k, w in obj.weights.items()),
        "precision": cfg.train.precision,
        "channels_last": uses_channels_last(cfg.train, device),
        "steps": steps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "loadavg": loadavg,
        "mem_kind": memory.kind,
        "sweep": sweep,
    }
    return BenchReport(rows, context)
