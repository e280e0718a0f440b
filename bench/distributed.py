"""Images per second of data-parallel distillation for 1, 2, ... processes (torchrun, one thread each).

::

    python bench/distributed.py --config configs/logit.toml --procs 1,2
    python bench/distributed.py --config configs/logit.toml --procs 1 --device cuda   # one GPU

For each process count N the script starts ``torchrun --standalone --nproc_per_node=N`` on itself (with
``OMP_NUM_THREADS=1`` unless ``--threads`` says otherwise) and each worker trains the config's student
the way ``fkd distill`` does under torchrun: its slice of every global batch of ``data.batch_size``,
teacher outputs from the cache (built sharded over the ranks), gradients summed inside the step. After
``--warmup`` untimed steps it times ``--steps`` steps between two barriers (the last one waits for the
state on the host) and rank 0 reports ``steps * batch_size / seconds``: global images per second, so
the N-process figure compares directly with the 1-process one (N = 1 is the plain single-process path:
torchrun with one process leaves fkd undistributed).

The teacher has random weights (like ``fkd bench``): a step's cost does not depend on their values. The
all-reduce volume per step is the student's gradient bytes plus a few scalars, reported as
``allreduce_mb``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    import torch

    from fkd import distributed
    from fkd.cache import build_cache
    from fkd.build import load_config
    from fkd.data import load_data
    from fkd.device import resolve_device
    from fkd.distill_setup import preflight
    from fkd.loop import steps_per_epoch
    from fkd.models.from_config import build_teacher
    from fkd.pytree import tree_leaves
    from fkd.run_setup import build_training

    cfg = load_config(args.config, args.set, device=args.device)
    device = distributed.init_from_env(resolve_device(cfg.device))
    world = distributed.world()
    data = load_data(cfg.data, device=device)
    pre = preflight(cfg, data.num_classes, len(data.train), device)
    obj, batch_size = pre.objective, cfg.data.batch_size
    lookup, teacher = None, None
    if obj.needs_teacher:
        teacher, t_params, t_buffers = build_teacher(cfg, data.num_classes, obj.teacher_feature_names, device=device)
        t_vars = {"params": t_params, "buffers": t_buffers}
        lookup = build_cache(teacher, t_vars, data.train, mode="memory", key="bench", cache_dir=".",
                             batch_size=cfg.data.eval_batch_size, precision=cfg.train.precision, device=device,
                             echo=lambda m: None).lookup
    params, state = obj.init(pre.shapes, seed=cfg.seed, device=device)
    training = build_training(pre.student, obj, cfg.train, params=pre.params, buffers=pre.buffers,
                              objective_params=params, objective_state=state,
                              steps_per_epoch=steps_per_epoch(len(data.train), batch_size), batch_size=batch_size,
                              seed=cfg.seed, augment=False, device=device, quiet=True)
    state = training.state

    def batches():
        epoch = 0
        while True:
            for x, y, idx in data.train.batches(batch_size, shuffle=True, epoch=epoch, seed=cfg.seed, drop_last=True):
                lo, hi = world.part(y.shape[0])
                batch = {"x": x[lo:hi], "y": y[lo:hi], "idx": idx[lo:hi]}
                if lookup is not None:
                    batch.update(lookup(batch["idx"]))
                yield batch
            epoch += 1

    stream = batches()
    for _ in range(args.warmup):
        state, _ = training.step(state, next(stream))
    int(state["step"])
    world.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, _ = training.step(state, next(stream))
    int(state["step"])  # waits for the device
    world.barrier()
    seconds = time.perf_counter() - t0
    if world.is_main:
        grad_bytes = sum(t.numel() * t.element_size() for t in tree_leaves(state["params"]))
        print("RESULT " + json.dumps({
            "processes": world.size, "device": str(device), "threads": torch.get_num_threads(),
            "student": cfg.student.arch, "batch_size": batch_size, "steps": args.steps,
            "images_per_s": args.steps * batch_size / seconds, "ms_per_step": 1e3 * seconds / args.steps,
            "allreduce_mb": grad_bytes / 1e6 if world.parallel else 0.0,
        }), flush=True)
    distributed.shutdown()


def launch(args, procs: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", __file__,
           "--worker", "--config", str(args.config), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += [a for s in args.set for a in ("--set", s)] + (["--device", args.device] if args.device else [])
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{procs} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[0].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "logit.toml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", help="cpu (default: the config's) or cuda")
    parser.add_argument("--procs", default="1,2", help="process counts to time, e.g. 1,2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results = [launch(args, int(n)) for n in args.procs.split(",")]
    if args.json:
        print("\n".join(json.dumps(r) for r in results))
        return
    base = results[0]["images_per_s"]  # the speed-up is against the first process count asked for
    header = ("processes", "device", "images/s", "ms/step", "speed-up", "all-reduce MB/step")
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, (9, 6, 9, 8, 8, 18))))
    for r in results:
        print(f"{r['processes']:>9}  {r['device']:>6}  {r['images_per_s']:>9.0f}  {r['ms_per_step']:>8.1f}  "
              f"{r['images_per_s'] / base:>7.2f}x  {r['allreduce_mb']:>18.2f}")
    print(f"{results[0]['student']}, global batch {results[0]['batch_size']}, {results[0]['steps']} timed steps, "
          f"{results[0]['threads']} thread(s) per process")


if __name__ == "__main__":
    main()
