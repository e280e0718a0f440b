"""The field's benchmark protocol, timed: CIFAR-100, 240 epochs of 50,000 images, batch 64 -- how long?

Run from the repository root (no download, no network: the data are synthetic, made on the device)::

    python bench/protocol.py --config configs/cifar100/resnet32x4_resnet8x4/kd.toml --members 8
    python bench/protocol.py --config configs/cifar100/resnet32x4_resnet8x4/kd.toml --device cpu \\
        --images 2048 --steps 3 --windows 3 --variants imperative,eager,population --members 2 --json

On CIFAR-100-shaped synthetic data (``--images`` uint8 views of 3 x R x R, default 50,000, and
``--test-images`` for the test split, default 10,000, 100 classes, drawn on the device itself) it
measures the steady-state training rate in images/s of each variant:

======================  ============================================================================
``imperative``          the authors' style (``bench/imperative.py``): ``nn.Module``, forward hooks for
                        features, ``loss.backward()``, ``torch.optim`` (foreach), teacher under no_grad
``cudagraphs``          fkd's pure step compiled with ``mode="reduce-overhead"``: replayed as CUDA graphs
``population``          ``--members`` K students in one step, as ``fkd sweep --seeds K`` trains them
                        (:class:`fkd.population.Population`: vmapped on CUDA, a loop on a CPU; shared
                        batches and one teacher pass when the view is random), compiled with CUDA graphs
                        on CUDA, eager on a CPU
``eager``               fkd's pure step (:func:`fkd.step.make_train_step`), not compiled
``compiled``            the same step under ``torch.compile`` (mode ``default``)
``tf32``                ``cudagraphs`` with ``train.precision = "tf32"`` (TF32 tensor cores)
``bf16_channels_last``  ``cudagraphs`` with bf16 autocast and the channels_last layout
``cached``              ``cudagraphs`` (on a CPU: compiled, no graphs) with the teacher's outputs read from a cache on
                        the device -- which fkd uses only for a deterministic view: with the protocol's
                        random crop and flip the teacher must see each augmented image and runs live
======================  ============================================================================

They run in this order (most telling first, so a time limit cuts the least) or in ``--variants``'
order. Every variant takes its batches the way a run does, from the training set held on the device: the
epoch's order, crop-with-padding and flip drawn on the device, the cache lookup where there is one --
the imperative loop too, so it is spared its usual DataLoader and the comparison favours it. The
teacher has random weights (the cost of a step does not depend on their values).

Timing: ``--warmup`` untimed steps (compilation happens here), then ``--windows`` timed windows of
``--steps`` steps each, the device synchronised only at each window's ends; the rate is the median
window's. Variants a device cannot run (CUDA graphs, TF32, bf16 + channels_last on a CPU) are listed
as skipped, with the reason.

The projection, for each variant: ``epochs * (train epoch + evaluation of the test split)`` plus, for
``cached``, building the cache once; an epoch is ``floor(50,000 / batch)`` steps, as the protocol's
full data set has, whatever ``--images`` generated. Evaluation is timed as a run does it (compiled on
CUDA, ``data.eval_batch_size`` images a batch, padded to one shape), the teacher's pass over the
training set (what building a cache costs) at the same batch size. For K seeds a single-student
variant takes K runs one after another; the population trains them together.

``--json`` prints one JSON object per variant (with ``device``, ``precision``, ``variant``) instead of
the table. Precision is each row's own: ``fp32`` is PyTorch's default float32 (on CUDA cuDNN may use
TF32 for convolutions by default; ``tf32_cudnn`` / ``tf32_matmul`` in each row say what was allowed).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attrs  # noqa: E402 -- after the clone is on the path
import torch  # noqa: E402

from fkd.build import load  # noqa: E402
from fkd.cache import TeacherCache, compute_outputs, teacher_batch_outputs  # noqa: E402
from fkd.clone_files import load_clone_module  # noqa: E402
from fkd.data.batches import InMemorySource  # noqa: E402
from fkd.data.transforms import BatchTransform, augments  # noqa: E402
from fkd.device import resolve_device  # noqa: E402
from fkd.distill_setup import preflight  # noqa: E402
from fkd.errors import ConfigError, FkdError  # noqa: E402
from fkd.evaluate import evaluate_model  # noqa: E402
from fkd.loop import steps_per_epoch  # noqa: E402
from fkd.models.from_config import build_teacher  # noqa: E402
from fkd.population import Population, choose_strategy, freeze_diverged  # noqa: E402
from fkd.run_setup import build_training  # noqa: E402
from fkd.step import float32_math, make_eval_step, maybe_compile  # noqa: E402
from fkd.sweep.runner import student_state  # noqa: E402

PROTOCOL_TRAIN = 50_000  # CIFAR-100's training split: the projection's epoch, whatever --images made
PROTOCOL_TEST = 10_000
NUM_CLASSES = 100


@attrs.frozen
class Variant:
    """How one variant trains: compiled or not, ``torch.compile``'s mode, precision, layout, students per
    step, the teacher live or cached, and whether it needs CUDA."""

    name: str
    compile: bool = False
    mode: str = "default"
    precision: str = "fp32"
    channels_last: bool = False
    population: bool = False
    cached: bool = False
    imperative: bool = False
    cuda_only: str = ""  # the reason it is skipped elsewhere


VARIANTS = {  # most telling first, so that a time limit cuts the least
    "imperative": Variant("imperative", imperative=True),
    "cudagraphs": Variant("cudagraphs", compile=True, mode="reduce-overhead",
                          cuda_only="CUDA graphs need a CUDA device"),
    "population": Variant("population", compile=True, mode="reduce-overhead", population=True),
    "eager": Variant("eager"),
    "compiled": Variant("compiled", compile=True),
    "tf32": Variant("tf32", compile=True, mode="reduce-overhead", precision="tf32",
                    cuda_only="TF32 tensor cores are a CUDA feature"),
    "bf16_channels_last": Variant("bf16_channels_last", compile=True, mode="reduce-overhead", precision="bf16",
                                  channels_last=True,
                                  cuda_only="fkd applies bf16 autocast and channels_last for speed on CUDA only"),
    "cached": Variant("cached", compile=True, mode="reduce-overhead", cached=True),
}


def on_device(variant: Variant, device: torch.device) -> Variant:
    """The variant as it runs on ``device``: on a CPU, compiled ones drop CUDA graphs (a CUDA feature) and
    the population stays eager, as ``fkd sweep`` runs it there (``train.compile = "auto"``)."""
    if device.type == "cuda":
        return variant
    if variant.population:
        return attrs.evolve(variant, compile=False, mode="default")
    return attrs.evolve(variant, mode="default")


# --- the synthetic protocol ----------------------------------------------------------------------


@attrs.frozen(eq=False)
class Bench:
    """What every variant shares: the config, device, objective, the student's initial weights, the
    teacher (random weights), the synthetic splits on the device, and the protocol's numbers."""

    cfg: object
    device: torch.device
    objective: object
    student: object
    params: dict
    buffers: dict
    shapes: object
    teacher: object
    teacher_vars: dict | None
    train: InMemorySource
    test: InMemorySource
    steps_per_epoch: int  # of the protocol's 50,000 images

    @property
    def batch_size(self) -> int:
        return self.cfg.data.batch_size

    @property
    def augment(self) -> bool:
        return augments(self.cfg.data)


def synthetic_views(n: int, side: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 (3, side, side) views and int64 labels in [0, 100), drawn on ``device`` (no host copy)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    views = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, device=device, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (n,), device=device, generator=generator)
    return views, labels


def setup(cfg, device: torch.device, images: int, test_images: int) -> Bench:
    data = cfg.data
    side = data.resize or data.image_size
    if images < data.batch_size:
        raise ConfigError(f"--images {images} is fewer than one batch of data.batch_size = {data.batch_size}; "
                          "raise --images or lower data.batch_size.")
    views, labels = synthetic_views(images, side, device, seed=0)
    train = InMemorySource(views, labels, BatchTransform.for_split(data, train=True), device)
    views, labels = synthetic_views(test_images, side, device, seed=1)
    test = InMemorySource(views, labels, BatchTransform.for_split(data, train=False), device)
    pre = preflight(cfg, NUM_CLASSES, images, device)
    teacher = teacher_vars = None
    if pre.objective.needs_teacher:
        teacher, t_params, t_buffers = build_teacher(cfg, NUM_CLASSES, pre.objective.teacher_feature_names,
                                                     seed=cfg.seed + 1, device=device)
        teacher_vars = {"params": t_params, "buffers": t_buffers}
    return Bench(cfg, device, pre.objective, pre.student, pre.params, pre.buffers, pre.shapes, teacher, teacher_vars,
                 train, test, steps_per_epoch(PROTOCOL_TRAIN, data.batch_size))


def endless_batches(source: InMemorySource, batch_size: int, *, seed: int, augment: bool) -> Iterator[tuple]:
    """``(x, y, idx)`` batches epoch after epoch, as a run takes them (its order, its augmentation)."""
    for epoch in itertools.count():
        yield from source.batches(batch_size, shuffle=True, epoch=epoch, seed=seed, augment=augment, drop_last=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- one iteration of each variant -----------------------------------------------------------------


def imperative_iteration(b: Bench, variant: Variant) -> Callable[[], None]:
    baseline = load_clone_module("bench/imperative.py", "the imperative baseline")
    training = build_training(b.student, b.objective, b.cfg.train, params=b.params, buffers=b.buffers,
                              steps_per_epoch=b.steps_per_epoch, batch_size=b.batch_size, seed=b.cfg.seed,
                              augment=b.augment, device=b.device, compile="off", quiet=True)
    distiller = baseline.ImperativeDistiller(
        b.objective, b.student, {"params": b.params, "buffers": b.buffers}, b.cfg.train.optimizer,
        teacher=b.teacher, teacher_vars=b.teacher_vars, schedule=training.schedule, precision=variant.precision,
        channels_last=variant.channels_last, device=b.device)
    batches = endless_batches(b.train, b.batch_size, seed=b.cfg.seed, augment=b.augment)

    def iteration() -> None:
        x, y, _ = next(batches)
        distiller.train_step(x, y)

    return iteration


def teacher_cache(b: Bench, precision: str) -> TeacherCache:
    """The teacher's outputs for every training view, in memory on the device (what a cached run reads)."""
    logits, feats = compute_outputs(b.teacher, b.teacher_vars, b.train, batch_size=b.cfg.data.eval_batch_size,
                                    precision=precision, device=b.device)
    return TeacherCache(logits, feats, "memory", b.device)


def fkd_iteration(b: Bench, variant: Variant, members: int) -> Callable[[], None]:
    train = attrs.evolve(b.cfg.train, precision=variant.precision, channels_last=variant.channels_last,
                         compile_mode=variant.mode)
    cached = variant.cached and b.objective.needs_teacher
    live_teacher = b.teacher if b.objective.needs_teacher and not cached else None
    training = build_training(b.student, b.objective, train, params=b.params, buffers=b.buffers,
                              teacher=live_teacher, steps_per_epoch=b.steps_per_epoch, batch_size=b.batch_size,
                              seed=b.cfg.seed, augment=b.augment and not cached, device=b.device,
                              compile="on" if variant.compile and not variant.population else "off", quiet=True)
    teacher_vars = training.layout(b.teacher_vars) if live_teacher is not None else None
    lookup = teacher_cache(b, variant.precision).lookup if cached else None
    augment = b.augment and not cached  # a cache holds one view per image: the deterministic one
    if not variant.population:
        step, holder = training.step, {"state": training.state}
        batches = endless_batches(b.train, b.batch_size, seed=b.cfg.seed, augment=augment)

        def iteration() -> None:
            x, y, idx = next(batches)
            batch = {"x": x, "y": y, "idx": idx, **(lookup(idx) if lookup is not None else {})}
            holder["state"], _ = step(holder["state"], batch, teacher_vars)

        return iteration
    # K students as fkd sweep trains a group: one step, their own initialisations and keys
    shared = augment and b.objective.needs_teacher  # random views, live teacher: one order, one teacher pass
    population = Population(members, choose_strategy("auto", b.device), shared_batch=shared)
    hyper = {"terms": b.objective.hyper_defaults()}
    states = population.gather([
        student_state(attrs.evolve(b.cfg, seed=b.cfg.seed + k, train=train), b.objective, b.shapes, NUM_CLASSES,
                      b.steps_per_epoch, training.layout, hyper, b.device) for k in range(members)])
    step = maybe_compile(population.wrap(freeze_diverged(training.step)), "on" if variant.compile else "off",
                         b.device.type, variant.mode)
    seeds = [b.cfg.seed] if shared else [b.cfg.seed + k for k in range(members)]
    streams = [endless_batches(b.train, b.batch_size, seed=s, augment=augment) for s in seeds]
    holder = {"states": states}
    # as fkd.sweep.runner.group_batches: students in a loop sharing a batch get the teacher's outputs from one
    # pass in the batch (vmapped, the step runs the teacher once itself: it is not batched over members)
    teacher_once = shared and population.strategy == "loop" and live_teacher is not None

    def population_iteration() -> None:
        parts = []
        for stream in streams:
            x, y, idx = next(stream)
            batch = {"x": x, "y": y, "idx": idx, **(lookup(idx) if lookup is not None else {})}
            if teacher_once:
                logits, feats = teacher_batch_outputs(b.teacher, teacher_vars, x, variant.precision)
                batch.update(teacher_logits=logits, teacher_features=feats)
            parts.append(batch)
        holder["states"], _ = step(holder["states"], parts[0] if shared else parts, teacher_vars)

    return population_iteration


# --- measuring -------------------------------------------------------------------------------------


def timed_windows(iteration: Callable[[], None], device: torch.device, *, warmup: int, steps: int,
                  windows: int) -> tuple[float, list[float]]:
    """``(warm-up seconds, seconds of each window of ``steps`` iterations)``; the device is synchronised at
    the ends of the warm-up and of each window only."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        iteration()
    synchronize(device)
    warm = time.perf_counter() - t0
    seconds = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            iteration()
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return warm, seconds


def pass_rate(run: Callable[[], None], images: int, device: torch.device, repeats: int = 2) -> float:
    """Images/s of a whole pass (``run``), the median of ``repeats`` after one untimed pass (compilation)."""
    run()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return images / statistics.median(times)


def evaluation_rate(b: Bench) -> float:
    """Test images/s of the per-epoch evaluation, as a run does it (compiled per ``train.compile``)."""
    eval_step = make_eval_step(b.student, device=b.device, compile=b.cfg.train.compile)

    def run() -> None:
        evaluate_model(b.student, b.params, b.buffers, b.test, batch_size=b.cfg.data.eval_batch_size,
                       num_classes=NUM_CLASSES, device=b.device, compile=b.cfg.train.compile, eval_step=eval_step)

    return pass_rate(run, len(b.test), b.device)


def teacher_rate(b: Bench, precision: str) -> float | None:
    """Training images/s of the teacher's eval-mode pass: the cost of building a cache."""
    if b.teacher is None:
        return None
    return pass_rate(lambda: teacher_cache(b, precision), len(b.train), b.device, repeats=1)


def tf32_flags() -> dict:
    return {"tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32)}


def measure(b: Bench, variant: Variant, members: int, *, warmup: int, steps: int, windows: int,
            echo: Callable[[str], None]) -> dict:
    """One variant's row: its rate (median window), its settings and what skipped it."""
    device = b.device
    row = {"variant": variant.name, "device": str(device), "device_name": device_name(device),
           "precision": variant.precision, "members": members if variant.population else 1,
           "batch_size": b.batch_size}
    if variant.cuda_only and device.type != "cuda":
        return {**row, "skipped": variant.cuda_only}
    if variant.cached and not b.objective.needs_teacher:
        return {**row, "skipped": "no term of this objective reads the teacher"}
    variant = on_device(variant, device)
    row.update(compiled=variant.compile, compile_mode=variant.mode if variant.compile else None,
               channels_last=variant.channels_last and device.type == "cuda",
               teacher="cached" if variant.cached else ("live" if b.objective.needs_teacher else "none"))
    echo(f"protocol: {variant.name}: {warmup} warm-up step(s){' (compiling)' if variant.compile else ''}, "
         f"then {windows} x {steps} timed")
    with float32_math(variant.precision, device):
        row.update(tf32_flags())
        if variant.imperative:
            iteration = imperative_iteration(b, variant)
        else:
            iteration = fkd_iteration(b, variant, members if variant.population else 1)
        warm, seconds = timed_windows(iteration, device, warmup=warmup, steps=steps, windows=windows)
        del iteration
    images = steps * b.batch_size * row["members"]
    rates = sorted(images / s for s in seconds)
    row.update(images_per_s=statistics.median(rates), window_images_per_s=rates, warmup_s=warm,
               steps=steps, windows=windows)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores"


def project(row: dict, *, epochs: int, steps_per_epoch_: int, batch: int, eval_rate: float, seeds: int) -> dict:
    """Projected seconds of the whole protocol: one student and ``seeds`` seeds (see the module docstring)."""
    if "images_per_s" not in row:
        return {}
    members = row["members"]
    epoch_s = steps_per_epoch_ * batch * members / row["images_per_s"]
    eval_s = PROTOCOL_TEST * members / eval_rate
    run_s = epochs * (epoch_s + eval_s) + row.get("cache_build_s", 0.0)
    if members > 1:
        return {"epoch_s": epoch_s, "eval_s": eval_s, "protocol_one_s": None, "protocol_seeds_s": run_s}
    return {"epoch_s": epoch_s, "eval_s": eval_s, "protocol_one_s": run_s, "protocol_seeds_s": run_s * seeds}


def run_protocol(cfg, device: torch.device, *, members: int = 8, variants=None, steps: int = 50, windows: int = 5,
                 warmup: int = 10, images: int = PROTOCOL_TRAIN, test_images: int = PROTOCOL_TEST,
                 echo: Callable[[str], None] = lambda m: None) -> dict:
    """Measure every variant and project the protocol; ``{"rows": [...], "context": {...}}``."""
    if steps < 1 or windows < 1 or warmup < 1 or members < 1:
        raise ConfigError(f"protocol needs --steps, --windows, --warmup and --members >= 1 (got {steps}, {windows}, "
                          f"{warmup}, {members}).")
    names = list(VARIANTS) if not variants else [v.strip() for v in variants if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ConfigError(f"unknown variant '{unknown[0] if unknown else ''}'; valid variants: "
                          f"{', '.join(VARIANTS)} (comma-separated).")
    # Eight variants compile the same step function with different settings; dynamo's default of 8
    # compilations per function would send the last ones back to eager.
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    baseline = load_clone_module("bench/imperative.py", "the imperative baseline")
    b = setup(cfg, device, images, test_images)
    if "imperative" in names and baseline.unsupported_terms(b.objective):
        echo(f"protocol: skipping 'imperative': bench/imperative.py cannot express "
             f"{', '.join(baseline.unsupported_terms(b.objective))}")
        names.remove("imperative")
    echo(f"protocol: evaluation rate over {len(b.test):,} test images")
    eval_rate = evaluation_rate(b)
    t_rate = teacher_rate(b, cfg.train.precision)
    rows = []
    for name in names:
        rows.append(measure(b, VARIANTS[name], members, warmup=warmup, steps=steps, windows=windows, echo=echo))
        got = rows[-1]
        echo(f"protocol: {name}: " + (f"skipped ({got['skipped']})" if "skipped" in got else
                                      f"{got['images_per_s']:.0f} images/s ({got['precision']})"))
    base = next((r["images_per_s"] for r in rows if r["variant"] == "imperative" and "images_per_s" in r), None)
    for r in rows:
        if "images_per_s" in r:
            r["x_imperative"] = r["images_per_s"] / base if base else None
            r["cache_build_s"] = PROTOCOL_TRAIN / t_rate if r["teacher"] == "cached" and t_rate else 0.0
            r.update(project(r, epochs=cfg.train.epochs, steps_per_epoch_=b.steps_per_epoch, batch=b.batch_size,
                             eval_rate=eval_rate, seeds=members))
            r.update(eval_images_per_s=eval_rate, teacher_pass_images_per_s=t_rate)
    loadavg = "n/a"
    try:
        loadavg = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    context = {"config": cfg.name, "device": str(device), "device_name": device_name(device),
               "student": cfg.student.arch, "teacher": cfg.teacher.arch if b.objective.needs_teacher else "none",
               "method": cfg.distill.preset, "epochs": cfg.train.epochs, "batch_size": b.batch_size,
               "steps_per_epoch": b.steps_per_epoch, "images": images, "test_images": test_images,
               "augment": b.augment, "members": members, "eval_batch_size": cfg.data.eval_batch_size,
               "eval_images_per_s": eval_rate, "teacher_pass_images_per_s": t_rate, "loadavg": loadavg,
               "torch": torch.__version__}
    return {"rows": rows, "context": context}


def minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds < 3600 * 10 else f"{seconds / 3600:.0f} h"


def table(report: dict) -> str:
    c = report["context"]
    k = c["members"]
    head = [
        f"protocol {c['config']}: {c['method']}, student {c['student']}, teacher {c['teacher']} (random weights)",
        f"device {c['device']} ({c['device_name']}, load avg {c['loadavg']}), torch {c['torch']}; synthetic "
        f"CIFAR-100-shaped data on the device ({c['images']:,} train / {c['test_images']:,} test images), batch "
        f"{c['batch_size']}, {'random crop + flip (teacher live)' if c['augment'] else 'deterministic view'}",
        f"projection: {c['epochs']} epochs x {c['steps_per_epoch']} steps + evaluation of 10,000 test images per "
        f"epoch ({c['eval_images_per_s']:.0f} img/s at batch {c['eval_batch_size']})"
        + (f"; teacher pass {c['teacher_pass_images_per_s']:.0f} img/s" if c["teacher_pass_images_per_s"] else ""),
    ]
    cols = ("variant", "precision", "compiled", "img/s", "x imperative", "epoch", f"{c['epochs']} ep, 1 student",
            f"{c['epochs']} ep, {k} seeds")
    body = [cols]
    notes = []
    for r in report["rows"]:
        if "skipped" in r:
            notes.append(f"{r['variant']}: skipped ({r['skipped']})")
            continue
        compiled = (r["compile_mode"] if r["compile_mode"] != "default" else "yes") if r["compiled"] else "no"
        name = r["variant"] + (f" (K={r['members']})" if r["members"] > 1 else "")
        body.append((name, r["precision"] + (" +CL" if r.get("channels_last") else ""), compiled,
                     f"{r['images_per_s']:.0f}", "-" if not r.get("x_imperative") else f"{r['x_imperative']:.2f}",
                     f"{r['epoch_s']:.1f} s", minutes(r["protocol_one_s"]), minutes(r["protocol_seeds_s"])))
    widths = [max(len(row[i]) for row in body) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
             for row in body]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(head + [""] + lines + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python bench/protocol.py")
    parser.add_argument("--config", required=True, help="a config, e.g. configs/cifar100/resnet32x4_resnet8x4/kd.toml")
    parser.add_argument("--members", type=int, default=8, help="K: students of the population, seeds projected")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--steps", type=int, default=50, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=5, help="timed windows (the rate is the median's)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    parser.add_argument("--images", type=int, default=PROTOCOL_TRAIN, help="synthetic training images made")
    parser.add_argument("--test-images", type=int, default=PROTOCOL_TEST, help="synthetic test images made")
    parser.add_argument("--variants", default="", help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as fkd's --set")
    parser.add_argument("--json", action="store_true", help="one JSON object per variant instead of the table")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        cfg = load(args.config, args.overrides).config
        echo = (lambda m: print(m, file=sys.stderr, flush=True))
        report = run_protocol(cfg, device, members=args.members, variants=args.variants.split(",") if args.variants
                              else None, steps=args.steps, windows=args.windows, warmup=args.warmup,
                              images=args.images, test_images=args.test_images, echo=echo)
    except FkdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for row in report["rows"]:
            print(json.dumps({**row, "config": report["context"]["config"]}))
    else:
        print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
