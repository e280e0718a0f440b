"""The command line: parse options, load the config, call the library. Nothing else lives here."""

from __future__ import annotations

import errno
import functools
import json
import shlex
import signal
import sys
from pathlib import Path

import click

from fkd.config import dumps
from fkd.errors import FkdError, shorten

EXIT_USAGE = 2


def friendly_errors(fn):
    """Turn fkd's user errors into one line on stderr and exit code 2; Ctrl-C into a resume hint."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from fkd import distributed
        from fkd.loop import Interrupted

        try:
            result = fn(*args, **kwargs)
        except (FkdError, RuntimeError) as exc:  # under torchrun, one line for the job
            if not isinstance(exc, FkdError) and not distributed.lost_peer(exc):
                raise  # not a failed collective: a bug, shown with its traceback
            line = distributed.error_line(exc)
            if line is not None:
                click.echo(line, err=True)
            sys.exit(EXIT_USAGE if isinstance(exc, FkdError) else 1)
        except OSError as exc:  # a path the file system cannot take (--out, --config, PATH): one line
            if exc.errno != errno.ENAMETOOLONG:
                raise
            click.echo(f"error: the path '{shorten(exc.filename or '')}' is too long for the file system "
                       f"({exc.strerror}); shorten it.", err=True)
            sys.exit(EXIT_USAGE)
        except Interrupted as exc:
            if distributed.is_main():
                ctx = click.get_current_context()
                click.echo(f"\n{exc}; checkpoint saved. Resume with: {_resume_command(ctx)}", err=True)
            sys.exit(128 + exc.signum)
        except KeyboardInterrupt:
            click.echo("\ninterrupted.", err=True)
            sys.exit(128 + signal.SIGINT)
        distributed.shutdown()
        return result

    return wrapper


def _resume_command(ctx: click.Context) -> str:
    """The command that continues this run, from the options it was given, quoted for a POSIX shell."""
    args = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in ("resume", "overwrite") or value is None or value is False:
            continue
        if isinstance(param, click.Argument):
            args.append(str(value))
        elif param.is_flag:
            args.append(param.opts[0])
        else:
            for item in value if param.multiple else [value]:
                args += [param.opts[0], str(item)]
    from fkd.distributed import launcher_words

    return shlex.join([*launcher_words(), ctx.info_name, *args, "--resume"])


def run_options(fn):
    """Options every training command takes."""
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="TOML config file (see configs/)."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config key, e.g. --set train.epochs=3 (repeatable; type-checked)."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path),
                     help="Run directory (default: runs/<name>)."),
        click.option("--seed", type=int, help="Seed for initialisation, data order and augmentation."),
        click.option("--device", help="auto (default: cuda when present), cpu, cuda or cuda:N."),
        click.option("--resume", is_flag=True, help="Continue the run in the run directory from its last checkpoint."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
        click.option("--verbose", is_flag=True, help="Also print the resolved config (always written to "
                     "RUN/config.toml; `config` prints it without running)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _setup(config_path, overrides, out, seed, device, verbose):
    """The resolved config, run directory, device and rank-0 echo; the config is printed only when verbose
    (the command's start line says what will happen)."""
    from fkd import distributed
    from fkd.rundir import RunDir
    from fkd.device import resolve_device
    from fkd.build import load

    resolved = load(config_path, overrides, seed=seed, device=device)  # the one build of the run
    cfg = resolved.config
    run = RunDir(out if out is not None else Path("runs") / cfg.name)
    dev = distributed.init_from_env(resolve_device(cfg.device))  # under torchrun: join the job
    echo = distributed.echo_main(click.echo)
    if verbose:
        echo(f"# resolved config ({config_path or 'defaults'}; device {dev}{distributed.describe()}; "
             f"run directory {run.path})")
        echo(dumps(cfg))
    return resolved, run, dev, echo


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fkd")
def main():
    """fkd: knowledge distillation in the functional, JAX style (torch.func).

    \b
    Quickstart (offline, CPU, about three minutes with the teacher's fit; `make demo` from a clone):
      python cli.py distill --config configs/feature.toml
    """
    from fkd.runtime import tune_cpu_allocator

    tune_cpu_allocator()


@main.command()
@run_options
@click.option("--overwrite", is_flag=True, help="Replace an existing teacher checkpoint (teacher.checkpoint).")
@friendly_errors
def teacher(config_path, overrides, out, seed, device, resume, quiet, verbose, overwrite):
    """Fit a teacher (linear probe, finetune or from scratch) and write its checkpoint.

    \b
    Writes to the run directory: config.toml, metrics.jsonl, checkpoints/latest.pt,
    summary.json, curves.png; the teacher itself goes to teacher.checkpoint, which is never
    replaced unless --overwrite is given or the run that wrote it is resumed.

    \b
    Examples:
      python cli.py teacher --config configs/teacher.toml
      python cli.py teacher --config configs/stl10/teacher.toml --device cuda
      python cli.py teacher --config configs/teacher.toml --set teacher.train.epochs=3
    """
    from fkd.data import load_data
    from fkd.teacher import fit_teacher

    resolved, run, dev, echo = _setup(config_path, overrides, out, seed, device, verbose)
    cfg = resolved.config
    data = load_data(cfg.data, device=dev)
    fit_teacher(cfg, data, dev, run, resume=resume, overwrite=overwrite, quiet=quiet, echo=echo)


@main.command()
@run_options
@friendly_errors
def distill(config_path, overrides, out, seed, device, resume, quiet, verbose):
    """Train a student against a teacher (or alone, with distill.method = "none").

    Fits the teacher first when its checkpoint is missing and teacher.fit_if_missing is true.
    The loss is a preset (distill.method) or your own mix of terms (distill.method = "terms" with
    [distill.terms.<name>] tables; `python cli.py config --keys` lists them). Terms defined in your
    own Python file are used by naming it in distill.imports: fkd imports it, which runs its code,
    so name only files you trust; fkd imports nothing a config does not name.

    A config with [[stages]] is a pipeline: its stages (teacher fits and distillations, a stage's
    teacher possibly an earlier stage's model) run in order, each in OUT/<stage> (default
    runs/<name>/<stage>); run it again to skip finished stages and resume an interrupted one.

    \b
    Writes to the run directory: config.toml, metrics.jsonl, checkpoints/latest.pt,
    summary.json, curves.png.

    \b
    Examples:
      python cli.py distill --config configs/feature.toml
      python cli.py distill --config configs/logit.toml --set distill.temperature=4
      python cli.py distill --config configs/baseline.toml --out runs/my-baseline
      python cli.py distill --config configs/feature.toml --resume
      python cli.py distill --config configs/paradigms/teacher_assistant.toml
    """
    from fkd.distill import run_distill
    from fkd.stages import is_pipeline_file, run_pipeline_file

    if is_pipeline_file(config_path):  # [[stages]]: each stage in its own run directory under --out
        run_pipeline_file(config_path, overrides, out=out, seed=seed, device=device, quiet=quiet, echo=click.echo)
        return
    resolved, run, dev, echo = _setup(config_path, overrides, out, seed, device, verbose)
    run_distill(resolved.config, run, dev, resume=resume, quiet=quiet, echo=echo, objective=resolved.objective)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML config file every student starts from (see configs/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key for every student (repeatable; type-checked).")
@click.option("--seeds", default="3", show_default=True, metavar="N|S1,S2,...",
              help="Seeds 0..N-1, or a comma-separated list of seeds.")
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2,...",
              help="Values of one config key to sweep (repeatable: the grid is the product).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Sweep directory (default: runs/<name>-sweep).")
@click.option("--device", help="auto (default: cuda when present), cpu, cuda or cuda:N.")
@click.option("--strategy", type=click.Choice(["auto", "vmap", "loop"]), default="auto", show_default=True,
              help="How a group's students share the step: vmap stacks them, loop calls it per student "
                   "(auto: vmap on CUDA, loop on CPUs, where it was measured faster).")
@click.option("--chunk", type=click.IntRange(min=1), help="At most this many students stacked at once "
              "(default: all, or what fits in GPU memory when vmapped).")
@click.option("--save", type=click.Choice(["none", "best", "all"]), default="none", show_default=True,
              help="Also write students' final weights to DIR/students/ (readable by `evaluate`).")
@click.option("--resume", is_flag=True, help="Continue the sweep in the sweep directory from its checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def sweep(config_path, overrides, seeds, grid, out, device, strategy, chunk, save, resume, quiet):
    """Train many students in one process: seeds x grid points, with mean, std and 95% intervals.

    Students that differ only in numbers inside the step (seed, term weights, temperature, learning
    rate) train together with one step function; other differences (architecture, features, batch
    size, ...) split the sweep into groups that run one after another. A KD weight of 0 (or
    distill.method = "none") is the baseline the table compares with. A pipeline config ([[stages]])
    runs whole once per seed, in DIR/seed-<s>/<stage>, and the table has one row per stage.

    \b
    Writes to the sweep directory: config.toml, grid.json, sweep.jsonl (one line per student and
    epoch), sweep_summary.json, sweep.png, checkpoints/latest.pt, students/ (with --save).

    \b
    Examples:
      python cli.py sweep --config configs/logit.toml --seeds 5
      python cli.py sweep --config configs/logit.toml --seeds 3 \\
          --grid distill.temperature=1,2,4,8 --grid distill.alpha=0,0.5,0.9
      python cli.py sweep --config configs/feature.toml --seeds 3,7,11 --save best
      python cli.py sweep --config configs/logit.toml --seeds 5 --resume
    """
    from fkd.device import resolve_device
    from fkd.errors import ConfigError
    from fkd.rundir import RunDir
    from fkd.stages import is_pipeline_file, run_pipeline_seeds
    from fkd.sweep.plan import in_chunks, parse_grid, parse_seeds, plan_sweep
    from fkd.sweep.runner import auto_chunk, choose_strategy, run_sweep

    if is_pipeline_file(config_path):  # [[stages]]: the whole pipeline once per seed, each stage a run directory
        given = [name for name, on in (("--grid", grid), ("--chunk", chunk), ("--save", save != "none"),
                                       ("--strategy", strategy != "auto")) if on]
        if given:
            raise ConfigError(f"{given[0]} does not apply to a pipeline, which sweeps seeds only (each stage keeps its "
                           "weights in its run directory); drop it, or sweep one stage's config.toml.")
        run_pipeline_seeds(config_path, list(overrides), parse_seeds(seeds), out=out, device=device, quiet=quiet,
                           echo=click.echo)
        return
    plan = plan_sweep(config_path, list(overrides), parse_seeds(seeds), parse_grid(list(grid)), device=device)
    base = plan.groups[0].base.config
    from fkd import distributed

    dev = distributed.init_from_env(resolve_device(base.device))  # under torchrun: join the job
    echo = distributed.echo_main(click.echo)
    chosen = choose_strategy(strategy, dev)
    plan = in_chunks(plan, chunk if chunk is not None else auto_chunk(plan, chosen, dev))
    run = RunDir(out if out is not None else Path("runs") / f"{base.name}-sweep")
    run_sweep(plan, run, dev, strategy=chosen, save=save, resume=resume, quiet=quiet, echo=echo)


@main.command("config")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML config file (default: the built-in defaults).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--keys", is_flag=True, help="List every key with its default and meaning instead (with --config, "
              "also the keys of the terms its distill.imports register).")
@friendly_errors
def show_config(config_path, overrides, keys):
    """Print the resolved config (defaults + file and its extends + --set) as TOML, or every key with --keys.

    Loading a config imports the files its distill.imports names: that runs their code, so name
    only term files you trust.

    \b
    Examples:
      python cli.py config --config configs/feature.toml --set distill.beta=0.5
      python cli.py config --keys
      python cli.py config --keys --config my_terms.toml
    """
    from fkd.build import help_text, load_config

    if keys:
        if config_path is not None or overrides:
            load_config(config_path, overrides)  # registers what its distill.imports define
        rows = help_text()
        width = max(len(key) for key, _, _ in rows)
        for key, default, meaning in rows:
            click.echo(f"{key.ljust(width)}  {meaning} (default {default})")
        return
    click.echo(dumps(load_config(config_path, overrides)), nl=False)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Evaluate on this config's data instead of the config saved with the checkpoint.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key of that config, e.g. --set data.root=/mnt/data (repeatable).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Also write the report to DIR/evaluation.json.")
@click.option("--device", help="auto (default: cuda when present), cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads the latency is timed with (batch 1).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a report.")
@friendly_errors
def evaluate(path, config_path, overrides, out, device, threads, as_json):
    """Test accuracy, per-class accuracy, parameter count, size and CPU latency of PATH.

    PATH is a run directory or a checkpoint file written by fkd; the data come from the config
    saved with it unless --config / --set say otherwise. PATH may also be a file written by
    `fkd export` (.pt2 or .onnx): it runs in its own runtime on the CPU. torch.export.load
    unpickles parts of a .pt2 file, so evaluate only .pt2 files you trust.

    \b
    Examples:
      python cli.py evaluate runs/feature
      python cli.py evaluate runs/digits-teacher/teacher.pt --json
      python cli.py evaluate runs/stl10-logit --set data.root=/mnt/datasets --out reports/stl10-logit
      python cli.py evaluate runs/baseline/export/student-int8.onnx --config configs/baseline.toml
    """
    from fkd.evaluate import evaluate_path, write_report
    from fkd.device import resolve_device
    from fkd.export.exported_file import is_exported_file

    if is_exported_file(path):
        from fkd.export.evaluate_exported import evaluate_exported

        result = evaluate_exported(path, config_path=config_path, overrides=list(overrides), threads=threads)
    else:
        result = evaluate_path(path, resolve_device(device or "auto"), config_path=config_path,
                               overrides=list(overrides), threads=threads)
    if out is not None:
        click.echo(f"report written to {write_report(result, out)}", err=True)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{result['arch']} on {result['data']} ({result['checkpoint']})")
    click.echo(f"  test accuracy  {result['test_acc']:.2%} over {result['test_images']} images")
    params = "unknown" if result["params"] is None else f"{result['params']:,}"
    click.echo(f"  parameters     {params}  ({result['size_bytes'] / 1e6:.2f} MB)")
    click.echo(f"  CPU latency    {result['cpu_latency']['text']}")
    click.echo("  per class      " + "  ".join(
        f"{name}: {'n/a' if acc is None else f'{acc:.0%}'}" for name, acc in result["per_class_acc"].items()))


@main.command("export")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["pt2", "onnx"]), required=True,  # fkd.export FORMATS
              help="pt2: torch.export program; onnx: ONNX for onnxruntime (needs the [export] extra).")
@click.option("--quantize", type=click.Choice(["int8"]),  # fkd.export.quantize SCHEMES
              help="Post-training static int8, calibrated on training images (onnx only).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="The exported file (default: RUN/export/student[-int8].pt2|.onnx).")
@click.option("--teacher", is_flag=True, help="Export the teacher (PATH's teacher.pt, or the teacher a "
              "student run was distilled from) instead of a student, for comparison.")
@click.option("--latency-repeats", type=click.IntRange(min=0), default=50, show_default=True,
              help="Timed calls per CPU latency figure (median); 0 skips timing.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads the latency is timed with (batch 1 and 64).")
@click.option("--overwrite", is_flag=True, help="Replace the file at --out (or the default path) if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the export.json entry instead of a summary.")
@friendly_errors
def export(path, fmt, quantize, out, teacher, latency_repeats, threads, overwrite, as_json):
    """Export a trained student to a file a serving stack loads, verified against fkd.

    PATH is a distill run directory or a student checkpoint. The file takes float32
    (batch, 3, S, S) RGB images with values pixels / 255; the run's normalisation is built
    in. It is loaded back and its logits checked against fkd's (1e-4) before it is written;
    int8 reports its test accuracy. Writes the file and an entry in export.json beside it; an
    existing file is replaced only with --overwrite.

    \b
    Examples:
      python cli.py export runs/feature --format pt2
      python cli.py export runs/feature --format onnx --quantize int8
      python cli.py export runs/feature --format onnx --teacher
      python cli.py export runs/feature/checkpoints/latest.pt --format onnx --out student.onnx
    """
    from fkd.export.latency import describe_table
    from fkd.export.pipeline import export_model

    entry = export_model(path, fmt=fmt, quantize=quantize, out=out, teacher=teacher, latency_repeats=latency_repeats,
                         latency_threads=threads, overwrite=overwrite, echo=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(entry))
        return
    click.echo(f"wrote {entry['file']} ({entry['file_size_bytes'] / 1e6:.2f} MB); report: {entry['report']}")
    click.echo(f"  test accuracy  {entry['test_acc']:.2%} (fkd's model {entry['fkd_test_acc']:.2%})")
    if entry["latency_ms_per_image"] is not None:
        for line in describe_table(entry["latency_ms_per_image"]):
            click.echo(f"  CPU latency    {line}")


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML config file (see configs/ and configs/bench/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set data.batch_size=128 (repeatable; type-checked).")
@click.option("--seed", type=int, help="Seed for initialisation.")
@click.option("--device", help="auto (default: cuda when present), cpu, cuda or cuda:N.")
@click.option("--steps", type=click.IntRange(min=20), default=20, show_default=True,
              help="Timed steps per variant (the median is reported; at least 20).")
@click.option("--warmup", type=click.IntRange(min=1), default=3, show_default=True,
              help="Untimed steps first; torch.compile compiles here.")
@click.option("--variants", metavar="A,B,...",
              help="Comma-separated subset of imperative, functional, compiled, student_only, cached "
                   "(default: all that apply).")
@click.option("--sweep", "sweep_k", type=click.IntRange(min=2), metavar="K",
              help="Time one step of K students instead: as `fkd sweep` runs them here (sweep), as K plain "
                   "steps one after another (sweep_sequential), and vmapped (sweep_vmap) when sweep is not.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line and variant instead of a table.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Also write the JSON lines to DIR/bench.jsonl.")
@friendly_errors
def bench(config_path, overrides, seed, device, steps, warmup, variants, sweep_k, as_json, out):
    """Time one training step: fkd's functional step against the imperative baseline.

    Runs from a clone of the repository: the harness and the baseline live in its bench/ folder,
    not in the installed package.

    \b
    Variants (same student weights, same batch, same device):
      imperative    nn.Module + forward hooks + loss.backward() + torch.optim
      functional    fkd's pure step, eager
      compiled      fkd's step under torch.compile (train.compile_mode)
      student_only  the student alone (CE, no teacher): the floor
      cached        distillation with the teacher's outputs from the cache
    student_only and cached follow train.compile (auto: compiled on CUDA only).
    Reports the median ms/step, images/s, peak memory and the ratio to imperative;
    progress goes to stderr.

    \b
    Examples:
      python cli.py bench --config configs/feature.toml
      python cli.py bench --config configs/logit.toml --variants imperative,functional --json
      python cli.py bench --config configs/bench/notebook224.toml --device cuda
      python cli.py bench --config configs/logit.toml --sweep 8
      python cli.py bench --config configs/bench/notebook224.toml --set train.precision=bf16 \\
          --set train.channels_last=true --set data.batch_size=128
    """
    from fkd.clone_files import load_clone_module

    run_bench = load_clone_module("bench/harness.py", "the benchmark harness").run_bench
    from fkd.device import resolve_device
    from fkd.build import load_config

    cfg = load_config(config_path, overrides, seed=seed, device=device)
    chosen = variants.split(",") if variants else None
    report = run_bench(cfg, resolve_device(cfg.device), steps=steps, warmup=warmup, variants=chosen,
                       sweep=sweep_k or 0, config_name=str(config_path or "defaults"),
                       echo=lambda m: click.echo(m, err=True))
    if out is not None:
        from fkd.rundir import ensure_writable, write_text_atomic

        ensure_writable(out, what="the bench output folder", fix="pick another with --out")
        write_text_atomic(out / "bench.jsonl", "".join(line + "\n" for line in report.json_lines()))
        click.echo(f"results written to {out / 'bench.jsonl'}", err=True)
    click.echo("\n".join(report.json_lines()) if as_json else report.table())


if __name__ == "__main__":
    main()
