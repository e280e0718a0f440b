"""Run configuration: TOML files parsed into frozen, validated attrs classes.

A config file is a TOML document whose tables mirror the classes below::

    name = "feature"           # run name: the run directory is runs/<name> unless --out
    seed = 0
    [data]     ...  -> DataConfig
    [teacher]  ...  -> TeacherConfig  (its [teacher.train] fits the teacher)
    [student]  ...  -> ModelConfig
    [train]    ...  -> TrainConfig    (how the student is trained)
    [distill]  ...  -> DistillConfig

Every key is optional (the defaults below apply). Unknown keys, wrong types and out-of-range
values raise :class:`~fkd.errors.ConfigError` naming the dotted key, e.g.
``data.batch_size must be >= 1 (got 0)``. ``--set a.b=value`` overrides use the same checks.
"""

from __future__ import annotations

import difflib
import importlib
import math
import tomllib
import typing
from pathlib import Path
from typing import Any

import attrs

from fkd.config_files import read_config_file
from fkd.errors import ConfigError

# --- field helpers ---------------------------------------------------------------------------


def _one_of(*choices: str):
    def check(inst, attribute, value):
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(repr(c) for c in choices)} (got {value!r})")

    check.choices = choices
    return check


def _at_least(lo: float):
    def check(inst, attribute, value):
        if not value >= lo:
            raise ValueError(f"must be >= {lo} (got {value!r})")

    return check


def _positive(inst, attribute, value):
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"must be > 0 (got {value!r})")


def _unit_interval(inst, attribute, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be within [0, 1] (got {value!r})")


def _non_negative(inst, attribute, value):
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"must be >= 0 (got {value!r})")


def _int64(inst, attribute, value):
    # torch.manual_seed, the data order's hash and TOML itself all take 64-bit integers
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"must fit in 64 bits, between -2**63 and 2**63 - 1 (got {value}); pick a smaller seed")


def _plain_name(inst, attribute, value):
    # The run directory is runs/<name>, and a config may come from someone else: a name that is a path
    # ("../../x", "/home/x") would put the run anywhere. Only --out chooses an arbitrary place.
    if value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        raise ValueError(f"must be a plain name, not a path (got {value!r}): the run directory is runs/<name>; "
                         "drop '/', '\\' and '..', or choose the folder with --out")


def _field(default, *validators, help: str = "", registry: str = ""):
    """An attrs field with its ``help`` for ``fkd config --keys``.

    ``registry`` (``"module:NAME"``) says the value names an entry of that :class:`~fkd.registry.Registry`;
    :func:`from_dict` checks it and ``--keys`` lists the names. The registry is imported only then, never
    when this module is, so that reading a config does not import torchvision up front.
    """
    kwargs: dict[str, Any] = {"metadata": {"help": help, "registry": registry}}
    if validators:
        kwargs["validator"] = list(validators)
    if isinstance(default, (list, dict)):
        return attrs.field(factory=lambda d=default: type(d)(d), **kwargs)
    if attrs.has(type(default)):
        return attrs.field(factory=lambda d=default: d, **kwargs)
    return attrs.field(default=default, **kwargs)


# --- schema ----------------------------------------------------------------------------------


@attrs.frozen
class DataConfig:
    """Where images come from and how they are shaped."""

    name: str = _field("digits", help="data set", registry="fkd.data.datasets:DATASETS")
    root: str = _field("data", help="folder holding downloaded / user data")
    image_size: int = _field(32, _at_least(8), help="side of the square images the models see")
    resize: int = _field(0, _at_least(0), help="resize shorter side to this before cropping (0: image_size)")
    crop: str = _field("center", _one_of("center", "random"), help="crop to image_size")
    pad: int = _field(0, _at_least(0), help="zero padding before a random crop (CIFAR style)")
    flip: bool = _field(False, help="random horizontal flips while training")
    normalize: str = _field("imagenet", _one_of("imagenet", "cifar100", "none"),
                            help="per-channel normalisation (ImageNet or CIFAR-100 statistics)")
    batch_size: int = _field(64, _at_least(1), help="training batch size")
    eval_batch_size: int = _field(256, _at_least(1), help="evaluation batch size")
    in_memory: str = _field("auto", _one_of("auto", "always", "never"), help="hold the data set as tensors")
    num_workers: int = _field(2, _at_least(0), help="DataLoader workers for streamed data sets")
    download: bool = _field(True, help="download torchvision data sets when missing and online")
    test_fraction: float = _field(0.2, _positive, help="digits: share held out for testing")
    train_limit: int = _field(0, _at_least(0), help="use only the first N training images (0: all)")
    synthetic_size: int = _field(256, _at_least(1), help="synthetic: images per split")
    synthetic_classes: int = _field(10, _at_least(2), help="synthetic: number of classes")
    # Transfer sets and function matching: see fkd/data/transfer.py and fkd/mixup.py, README "Transfer sets".
    transfer: str = _field(
        "none", _one_of("none", "unlabeled"),
        help="extra unlabeled training images for the teacher-based terms (label -1; label terms skip them): "
             "'unlabeled' adds stl10's 100,000-image unlabeled split, imagefolder's root/unlabeled/ (images, "
             "no class folders) and the images whose labels label_fraction removed")
    label_fraction: float = _field(
        1.0, _positive, _unit_interval,
        help="keep the labels of this fraction of the training split (deterministic, the same in every class "
             "and run); the rest become unlabeled with transfer = 'unlabeled', else they are dropped")
    labeled_share: float = _field(
        0.0, _unit_interval,
        help="with a transfer set: share of each training batch drawn from the labeled images, "
             "round(batch_size * share), the rest unlabeled, each in its own shuffled order cycled within the "
             "epoch (an epoch stays floor(N / batch_size) batches); 0: shuffle both together, as they come")
    mixup: float = _field(
        0.0, _non_negative,
        help="function matching: mixup alpha (0: off); one Beta(alpha, alpha) ratio per batch, the same "
             "mixed images for student and teacher, drawn from the step's key (distillation only)")
    cutmix: float = _field(
        0.0, _non_negative,
        help="function matching: cutmix alpha (0: off); one box per batch pasted from a shuffled partner, the "
             "same for student and teacher; with mixup too, each step picks one of the two at random")

    def __attrs_post_init__(self) -> None:
        # Views of side resize cannot be cropped to image_size. Checked here, the one place, so that a
        # config file and a DataConfig built in code fail alike, before any data are read.
        if self.labeled_share and self.transfer == "none":
            raise ConfigError(f"data.labeled_share = {self.labeled_share} mixes labeled and unlabeled images, but "
                              "data.transfer is 'none'; set data.transfer = 'unlabeled' or data.labeled_share = 0.")
        if self.labeled_share >= 1:
            raise ConfigError("data.labeled_share must be below 1 (a batch of labeled images only has no room for "
                              "the transfer set); use e.g. 0.5, or 0 to shuffle both together.")
        if self.resize and self.resize < self.image_size:
            raise ConfigError(f"data.resize = {self.resize} is smaller than data.image_size = {self.image_size}; "
                              "set data.resize to 0 or to at least image_size.")

    @property
    def mixes(self) -> bool:
        """True when the step mixes images (function matching: ``mixup`` or ``cutmix``): the teacher then
        runs live on the mixed view, which no cache can hold."""
        return self.mixup > 0 or self.cutmix > 0

    @property
    def augments(self) -> bool:
        """True when the training view is random (so teacher outputs cannot be cached): whether the
        training :class:`~fkd.data.transforms.BatchTransform` ``is_random``."""
        from fkd.data.transforms import BatchTransform

        return BatchTransform.for_split(self, train=True).is_random


@attrs.frozen
class OptimizerConfig:
    """An optimizer from :mod:`fkd.optim` and its learning-rate schedule."""

    name: str = _field("adam", help="optimizer", registry="fkd.optim:OPTIMIZERS")
    learning_rate: float = _field(1e-3, _positive, help="peak learning rate")
    momentum: float = _field(0.0, _unit_interval, help="sgd momentum")
    nesterov: bool = _field(False, help="sgd Nesterov momentum")
    weight_decay: float = _field(0.0, _non_negative, help="weight decay (decoupled for adamw)")
    b1: float = _field(0.9, _unit_interval, help="adam beta1")
    b2: float = _field(0.999, _unit_interval, help="adam beta2")
    eps: float = _field(1e-8, _positive, help="adam epsilon")
    schedule: str = _field("constant", help="learning-rate schedule over the whole run",
                           registry="fkd.schedules:SCHEDULES")
    warmup_epochs: float = _field(0.0, _non_negative, help="warmup_cosine: warmup length in epochs")
    milestones: list = _field([], help="multistep: epochs at which the rate is multiplied by gamma")
    gamma: float = _field(0.1, _positive, help="multistep: decay factor")
    clip_norm: float = _field(0.0, _non_negative, help="clip gradients to this global norm (0: off)")


@attrs.frozen
class TrainConfig:
    """How a model is trained: epochs, optimizer, and the compiled-step options."""

    epochs: int = _field(10, _at_least(1), help="passes over the training data")
    optimizer: OptimizerConfig = _field(OptimizerConfig(), help="optimizer")
    compile: str = _field("auto", _one_of("auto", "on", "off"), help="torch.compile the step (auto: on CUDA)")
    compile_mode: str = _field(
        "default", _one_of("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode",
    )
    precision: str = _field("fp32", _one_of("fp32", "bf16"), help="bf16 autocast on CUDA")
    channels_last: bool = _field(False, help="channels_last memory format on CUDA")
    log_every: int = _field(50, _at_least(1), help="steps between host syncs for the progress line")
    checkpoint_every: int = _field(0, _at_least(0), help="steps between mid-epoch checkpoints (0: per epoch)")
    sync_batchnorm: bool = _field(
        True, help="under torchrun: BatchNorm uses the moments of the whole global batch (SyncBatchNorm); "
                   "false: each process normalises its own slice")


_TEACHER_TRAIN = TrainConfig(
    epochs=5, optimizer=OptimizerConfig(name="sgd", learning_rate=1e-3, momentum=0.9)
)


@attrs.frozen
class ModelConfig:
    """A student architecture."""

    arch: str = _field("seed_cnn", help="seed_cnn, small_cnn or a torchvision model name")
    widths: list = _field([16, 32], help="small_cnn: channels per conv block")
    batch_norm: bool = _field(True, help="small_cnn: BatchNorm after each conv")


@attrs.frozen
class TeacherConfig:
    """The teacher: its architecture, weights, checkpoint and (when fitted here) training."""

    arch: str = _field("resnet18", help="torchvision model name (or seed_cnn / small_cnn)")
    widths: list = _field([32, 64, 128], help="small_cnn teacher: channels per conv block")
    batch_norm: bool = _field(True, help="small_cnn teacher: BatchNorm after each conv")
    weights: str = _field("none", _one_of("imagenet", "none"), help="starting weights for a teacher fit")
    checkpoint: str = _field("", help="fkd teacher checkpoint (written by `fkd teacher`)")
    fit_if_missing: bool = _field(False, help="distill: fit the teacher first when its checkpoint is missing")
    mode: str = _field("linear_probe", _one_of("linear_probe", "finetune", "scratch"), help="teacher fit")
    cache: str = _field("auto", _one_of("auto", "memory", "disk", "off"), help="reuse teacher outputs")
    cache_dir: str = _field(".fkd_cache", help="where disk caches of teacher outputs live")
    cache_max_gb: float = _field(
        16.0, _positive,
        help="most a teacher cache may take (GB, and never more than cache_dir's free space): when the features "
             "would not fit, only the logits are cached and the teacher runs live up to its last feature")
    train: TrainConfig = _field(_TEACHER_TRAIN, help="how the teacher is fitted")


@attrs.frozen
class DistillConfig:
    """Which distillation loss trains the student: a weighted sum of registered loss terms.

    ``method = "terms"`` takes the terms from ``[distill.terms.<name>]`` tables (``weight`` and that
    term's keys; ``fkd config --keys`` lists them). The other methods are presets that expand to terms
    (see :mod:`fkd.objective`):

    ============  ===============================================================
    none          CE                                  (the baseline student)
    logit         alpha * KD_T + (1 - alpha) * CE    (Hinton et al. 2015)
    feature       alpha * CE + beta * hint           (FitNets; the notebook's weights)
    attention     CE + beta * AT                     (Zagoruyko & Komodakis 2017)
    combined      sum of weights[term] * term
    ============  ===============================================================
    """

    method: str = _field("logit", help="distillation loss: a preset, or 'terms' for [distill.terms]",
                         registry="fkd.objective:METHODS")
    temperature: float = _field(2.0, _positive, help="presets: softmax temperature T of the KD term")
    alpha: float = _field(0.7, _unit_interval, help="logit: weight of KD; feature: weight of CE")
    beta: float = _field(0.3, _non_negative, help="feature / attention: weight of that term")
    student_features: list = _field([], help="student feature names, paired by position")
    teacher_features: list = _field([], help="teacher feature (FX node) names, paired by position")
    weights: dict = _field({}, help="combined: weight per term (ce, logit, feature, attention)")
    attention_p: float = _field(2.0, _positive, help="presets: power p of the attention map")
    terms: dict = _field({}, help="method = 'terms': one [distill.terms.<name>] table per loss term")
    imports: list = _field([], help="your own .py files or modules registering terms (or models, optimizers, ...); "
                                    "importing RUNS their code, so name only files you trust")


@attrs.frozen
class Config:
    """A whole run."""

    name: str = _field("fkd", _plain_name, help="run name (run directory runs/<name>; a plain name, not a path)")
    seed: int = _field(0, _int64, help="seed for initialisation, data order and augmentation (64-bit)")
    device: str = _field("auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    data: DataConfig = _field(DataConfig(), help="data")
    teacher: TeacherConfig = _field(TeacherConfig(), help="teacher")
    student: ModelConfig = _field(ModelConfig(), help="student")
    train: TrainConfig = _field(TrainConfig(), help="student training")
    distill: DistillConfig = _field(DistillConfig(), help="distillation loss")


# --- parsing ---------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a list", dict: "a table"}.get(tp, tp.__name__)


def _convert(value: Any, tp: Any, key: str) -> Any:
    if attrs.has(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table ([{key}]), not {value!r}.")
        return build_attrs(tp, value, key + ".")
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
        or (tp is list and isinstance(value, list))
        or (tp is dict and isinstance(value, dict))
    )
    if not ok:
        raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r}); fix it in the config or --set.")
    return float(value) if tp is float else value


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"valid keys: {', '.join(valid)}."


def build_attrs(cls, raw: dict, prefix: str = ""):
    """An attrs instance of ``cls`` from a raw table, every key and value checked (errors name ``prefix + key``)."""
    fields = {f.name: f for f in attrs.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{prefix}{key}' in the config; {_suggest(key, list(fields))}")
        kwargs[key] = _convert(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a field validator
        name = _failing_field(cls, kwargs)
        raise ConfigError(f"{prefix}{name} {exc}.") from None


def _failing_field(cls, kwargs) -> str:
    """Name the field whose validator failed (attrs does not say which)."""
    for f in attrs.fields(cls):
        if f.validator is None:
            continue
        value = kwargs.get(f.name, f.default.factory() if isinstance(f.default, attrs.Factory) else f.default)
        try:
            f.validator(None, f, value)
        except ValueError:
            return f.name
    return "?"


def _check_model_name(key: str, arch: str) -> None:
    from fkd.models import model_builder  # torchvision is slow to import: only here

    model_builder(arch, key=key)


def _registry(f: attrs.Attribute):
    """The :class:`~fkd.registry.Registry` a field's value names (imported now), or None."""
    where = f.metadata.get("registry")
    if not where:
        return None
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)


def _check_registered_names(obj: Any, prefix: str = "") -> None:
    """Every field naming a registry entry (``data.name``, ``train.optimizer.schedule``, ...) names a
    registered one; otherwise a :class:`ConfigError` listing the valid names."""
    for f in attrs.fields(type(obj)):
        value = getattr(obj, f.name)
        if attrs.has(type(value)):
            _check_registered_names(value, f"{prefix}{f.name}.")
        elif (registry := _registry(f)) is not None:
            registry.get(value, key=prefix + f.name)


def _check_whole(cfg: Config) -> Config:
    """Validation that spans fields."""
    d = cfg.distill
    for key, names in (("distill.student_features", d.student_features),
                       ("distill.teacher_features", d.teacher_features), ("distill.imports", d.imports)):
        if not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{key} must be a list of strings (got {names!r}).")
    if d.imports:  # first: the user's files may register terms, models, optimizers, schedules, data sets
        from fkd.user_imports import import_user_files

        import_user_files(list(d.imports))
    _check_registered_names(cfg)
    _check_model_name("student.arch", cfg.student.arch)
    _check_model_name("teacher.arch", cfg.teacher.arch)
    if cfg.data.test_fraction >= 1:
        raise ConfigError(f"data.test_fraction must be below 1 (got {cfg.data.test_fraction}).")
    from fkd.objective import from_config  # imports torch: only here

    objective = from_config(d)  # unknown terms, keys, values and unpaired features fail here, before any run
    from fkd.mixup import check_mixing

    check_mixing(cfg.data, objective)  # function matching: a teacher term, no label term
    for key, widths in (("student.widths", cfg.student.widths), ("teacher.widths", cfg.teacher.widths)):
        if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
            raise ConfigError(f"{key} must be a non-empty list of positive integers (got {widths!r}).")
    from fkd.optim import OPTIMIZER_KEYS, OPTIMIZERS
    from fkd.schedules import SCHEDULE_KEYS, SCHEDULES

    for opt_key, opt in (("train.optimizer", cfg.train.optimizer), ("teacher.train.optimizer", cfg.teacher.train.optimizer)):
        if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in opt.milestones):
            raise ConfigError(f"{opt_key}.milestones must be a list of positive epoch numbers (got {opt.milestones!r}).")
        # a key the chosen optimizer or schedule does not take (momentum with adam) would do nothing: refuse it
        OPTIMIZERS.keywords_for(opt.name, opt, OPTIMIZER_KEYS, prefix=opt_key)
        SCHEDULES.keywords_for(opt.schedule, opt, SCHEDULE_KEYS, prefix=opt_key)
    return cfg


def from_dict(raw: dict) -> Config:
    """Build and validate a :class:`Config` from a parsed TOML dict."""
    return _check_whole(build_attrs(Config, raw))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set key.sub=value``; the value is read as TOML, else taken as a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (got {text!r}), e.g. --set train.epochs=3.")
    key, _, value_text = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {text!r}; write it as section.key=value.")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return key.split("."), value


def _check_key_path(path: list[str], option: str = "--set") -> None:
    cls = Config
    for i, part in enumerate(path):
        if cls is None or not attrs.has(cls):
            if cls is dict:
                return  # free-form table (distill.weights, distill.terms: checked when the objective is built)
            raise ConfigError(f"{option} {'.'.join(path)}: '{'.'.join(path[:i])}' is not a table.")
        fields = {f.name: f for f in attrs.fields(cls)}
        if part not in fields:
            where = ".".join(path[:i])
            valid = list(fields)
            hint = _suggest(part, valid)
            raise ConfigError(f"{option} {'.'.join(path)}: no key '{part}' in {where or 'the config'}; {hint}")
        cls = typing.get_type_hints(cls)[part]
        if not attrs.has(cls) and cls is not dict and i < len(path) - 1:
            raise ConfigError(f"{option} {'.'.join(path)}: '{'.'.join(path[:i + 1])}' is not a table.")


def apply_overrides(raw: dict, overrides: list[str], option: str = "--set") -> dict:
    """A copy of ``raw`` with each ``key.sub=value`` override set (keys checked against the schema)."""
    import copy

    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        _check_key_path(path, option)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{option} {'.'.join(path)}: '{part}' is not a table in the config.")
        node[path[-1]] = value
    return out


def read_toml(path: str | Path) -> dict:
    """Read a config file with its ``extends`` chain resolved (:func:`fkd.config_files.read_config_file`);
    a missing or malformed file is a :class:`ConfigError` naming where."""
    return read_config_file(path)


def load_config(path: str | Path | None = None, overrides: list[str] = (), **top: Any) -> Config:
    """Read ``path`` (or start from the defaults), apply ``--set`` overrides and top-level values."""
    raw = read_toml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    for key, value in top.items():
        if value is not None:
            raw[key] = value
    return from_dict(raw)


# --- writing ---------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps(cfg: Config) -> str:
    """Serialise a config to TOML text that :func:`load_config` reads back to an equal config."""
    lines: list[str] = []

    def table(obj: Any, prefix: str) -> None:
        if prefix:
            lines.append(f"\n[{prefix}]")
        nested = []
        for f in attrs.fields(type(obj)):
            value = getattr(obj, f.name)
            if attrs.has(type(value)) or _is_table_of_tables(value):
                nested.append((f.name, value))
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        for name, value in nested:
            path = f"{prefix}.{name}" if prefix else name
            if attrs.has(type(value)):
                table(value, path)
            else:  # [distill.terms.<name>] tables, one per term
                for key, sub in value.items():
                    lines.append(f"\n[{path}.{key}]")
                    lines.extend(f"{k} = {_toml_value(v)}" for k, v in sub.items())

    table(cfg, "")
    return "\n".join(lines) + "\n"


def _is_table_of_tables(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, dict) for v in value.values())


def _validators(f: attrs.Attribute) -> list:
    v = f.validator
    if v is None:
        return []
    return list(getattr(v, "_validators", [v]))


def help_text(cls=Config, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every key, for ``fkd config --keys``.

    Defaults are read from a default instance, so a nested table shows its own default (the teacher's
    optimizer is SGD, the student's Adam), not its class's.
    """
    defaults = cls() if defaults is None else defaults
    rows = []
    for f in attrs.fields(cls):
        value = getattr(defaults, f.name)
        if attrs.has(type(value)):
            rows.extend(help_text(type(value), f"{prefix}{f.name}.", value))
        else:
            rows.append((prefix + f.name, _toml_value(value), _meaning(f)))
    if cls is Config:
        rows.extend(_term_rows())
    return rows


def _meaning(f: attrs.Attribute) -> str:
    """A field's help, with its valid names when it names a registry entry or one of fixed choices."""
    choices = [c for v in _validators(f) for c in getattr(v, "choices", ())]
    if (registry := _registry(f)) is not None:
        choices += registry.names()
    return f.metadata.get("help", "") + (f": {' | '.join(choices)}" if choices else "")


def _term_rows() -> list[tuple[str, str, str]]:
    """``distill.terms.<name>.<key>`` rows for every registered loss term."""
    from fkd.terms import TERMS, config_fields

    rows = []
    for name in TERMS.names():
        cls = TERMS.get(name)
        rows.append((f"distill.terms.{name}.weight", "1.0", f"weight of the '{name}' term: {cls.summary}"))
        for f in config_fields(cls):
            rows.append((f"distill.terms.{name}.{f.name}", _toml_value(f.default), _meaning(f)))
    return rows

