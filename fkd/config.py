"""Run configuration: the schema, and TOML read / ``--set`` overrides / write. Nothing is built here.

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

This module is a leaf: it imports only the ground floor (:mod:`fkd.errors`, :mod:`fkd.schema`,
:mod:`fkd.presets`, :mod:`fkd.config_files`). A table that chooses a component (``[train.optimizer]``,
``[student]``, ``[teacher]``, ``[data]``) keeps the keys that component owns as ``options``; they, the
registered names and every check across fields are resolved by the build layer, :mod:`fkd.build`,
whose :func:`fkd.build.load_config` is what commands call.
"""

from __future__ import annotations

import copy
import tomllib
import typing
from pathlib import Path
from typing import Any

import attrs

from fkd.config_files import MAX_DEPTH, parse_toml, read_config_file
from fkd.errors import ConfigError, shorten
from fkd.presets import PRESET_KEYS, PresetSettings, expand_preset
from fkd.schema import (WithOptions, at_least, build_attrs, field, file_path, has_options, non_negative, one_of,
                        path_problem, positive, suggest, toml_value, unit_interval, validators_of)


def int64(inst, attribute, value):
    # torch.manual_seed, the data order's hash and TOML itself all take 64-bit integers
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"must fit in 64 bits, between -2**63 and 2**63 - 1 (got {value}); pick a smaller seed")


def plain_name(inst, attribute, value):
    # The run directory is runs/<name>, and a config may come from someone else: a name that is a path
    # ("../../x", "/home/x") would put the run anywhere. Only --out chooses an arbitrary place.
    if value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        raise ValueError(f"must be a plain name, not a path (got {value!r}): the run directory is runs/<name>; "
                         "drop '/', '\\' and '..', or choose the folder with --out")
    if (problem := path_problem(value)) is not None:  # runs/<name> must be a name the file system takes
        raise ValueError(f"{problem} (got {shorten(value)!r}); shorten it, or choose the folder with --out")


#: Keywords a ``weights`` key takes besides a file path (see :func:`weights_source`).
WEIGHT_KEYWORDS = {"teacher": ("none", "imagenet", "pretrained"), "student": ("none", "imagenet", "pretrained")}
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


def weights_source(role: str):
    """Validator of ``<role>.weights``: one of :data:`WEIGHT_KEYWORDS` or the path of a weight file."""
    def check(inst, attribute, value):
        if value in WEIGHT_KEYWORDS[role] or value.lower().endswith(WEIGHT_SUFFIXES):
            file_path(inst, attribute, value)
            return
        raise ValueError(f"must be {' or '.join(repr(k) for k in WEIGHT_KEYWORDS[role])} or the path of a .pth, .pt "
                         f"or .safetensors state dict (got {shorten(value)!r})")

    check.choices = WEIGHT_KEYWORDS[role] + ("<file>.pth|.pt|.safetensors",)
    return check


# --- schema ----------------------------------------------------------------------------------


@attrs.frozen(init=False)
class DataConfig(WithOptions):
    """Where images come from and how they are shaped.

    Keys a data set's reader takes as keyword parameters (``test_fraction`` for digits,
    ``synthetic_size`` / ``synthetic_classes`` for synthetic, ...) are that data set's ``options``.
    """

    name: str = field("digits", help="data set", names="data set")
    root: str = field("data", file_path, help="folder holding downloaded / user data")
    image_size: int = field(32, at_least(8), help="side of the square images the models see")
    resize: int = field(0, at_least(0), help="resize shorter side to this before cropping (0: image_size)")
    crop: str = field("center", one_of("center", "random"), help="crop to image_size")
    pad: int = field(0, at_least(0), help="zero padding before a random crop (CIFAR style)")
    flip: bool = field(False, help="random horizontal flips while training")
    normalize: str = field("imagenet", one_of("imagenet", "cifar100", "none"),
                            help="per-channel normalisation (ImageNet or CIFAR-100 statistics)")
    batch_size: int = field(64, at_least(1), help="training batch size")
    eval_batch_size: int = field(256, at_least(1), help="evaluation batch size")
    in_memory: str = field("auto", one_of("auto", "always", "never"), help="hold the data set as tensors")
    num_workers: int = field(2, at_least(0), help="DataLoader workers for streamed data sets")
    download: bool = field(True, help="download torchvision data sets when missing and online")
    train_limit: int = field(0, at_least(0), help="use only the first N training images (0: all)")
    # Transfer sets and function matching: see fkd/data/transfer.py and fkd/mixup.py, docs/transfer.md.
    transfer: str = field(
        "none", one_of("none", "unlabeled"),
        help="extra unlabeled training images for the teacher-based terms (label -1; label terms skip them): "
             "'unlabeled' adds stl10's 100,000-image unlabeled split, imagefolder's root/unlabeled/ (images, "
             "no class folders) and the images whose labels label_fraction removed")
    label_fraction: float = field(
        1.0, positive, unit_interval,
        help="keep the labels of this fraction of the training split (deterministic, the same in every class "
             "and run); the rest become unlabeled with transfer = 'unlabeled', else they are dropped")
    labeled_share: float = field(
        0.0, unit_interval,
        help="with a transfer set: share of each training batch drawn from the labeled images, "
             "round(batch_size * share), the rest unlabeled, each in its own shuffled order cycled within the "
             "epoch (an epoch stays floor(N / batch_size) batches); 0: shuffle both together, as they come")
    mixup: float = field(
        0.0, non_negative,
        help="function matching: mixup alpha (0: off); one Beta(alpha, alpha) ratio per batch, the same "
             "mixed images for student and teacher, drawn from the step's key (distillation only)")
    cutmix: float = field(
        0.0, non_negative,
        help="function matching: cutmix alpha (0: off); one box per batch pasted from a shuffled partner, the "
             "same for student and teacher; with mixup too, each step picks one of the two at random")
    options: dict = field({}, help="the chosen data set's own keys (its reader's keyword parameters)", hash=False)

    def __attrs_post_init__(self) -> None:
        # Views of side resize cannot be cropped to image_size. Checked here, the one place, so that a
        # config file and a DataConfig built in code fail alike, before any data are read.
        if self.labeled_share and self.transfer == "none":
            raise ConfigError(f"data.labeled_share = {self.labeled_share} mixes labeled and unlabeled images, but "
                              "data.transfer is 'none'; set data.transfer = 'unlabeled' or data.labeled_share = 0.")
        if self.labeled_share and self.batch_size < 2:
            raise ConfigError(f"data.labeled_share = {self.labeled_share} puts labeled and unlabeled images in every "
                              f"batch, which needs data.batch_size >= 2 (got {self.batch_size}); raise "
                              "data.batch_size or set data.labeled_share = 0.")
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


@attrs.frozen(init=False)
class OptimizerConfig(WithOptions):
    """An optimizer from :mod:`fkd.optim` and its learning-rate schedule.

    ``name``, ``learning_rate``, ``schedule`` and ``clip_norm`` are fixed keys; every other key of the
    table (``momentum``, ``b1``, ``milestones``, ...) is an option of the chosen optimizer or schedule:
    a keyword parameter of its registered builder (see :mod:`fkd.build`).
    """

    name: str = field("adam", help="optimizer", names="optimizer")
    learning_rate: float = field(1e-3, positive, help="peak learning rate")
    schedule: str = field("constant", help="learning-rate schedule over the whole run",
                           names="schedule")
    clip_norm: float = field(0.0, non_negative, help="clip gradients to this global norm (0: off)")
    options: dict = field({}, help="the optimizer's and the schedule's own keys (their builders' keyword parameters)", hash=False)


@attrs.frozen
class TrainConfig:
    """How a model is trained: epochs, optimizer, and the compiled-step options."""

    epochs: int = field(10, at_least(1), help="passes over the training data")
    optimizer: OptimizerConfig = field(OptimizerConfig(), help="optimizer")
    compile: str = field("auto", one_of("auto", "on", "off"), help="torch.compile the step (auto: on CUDA)")
    compile_mode: str = field(
        "default", one_of("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode",
    )
    precision: str = field("fp32", one_of("fp32", "tf32", "bf16"),
                           help="fp32; tf32: float32 with TF32 tensor-core matmuls and convolutions on CUDA; "
                                "bf16: bfloat16 autocast on CUDA")
    channels_last: bool = field(False, help="channels_last memory format on CUDA")
    log_every: int = field(50, at_least(1), help="steps between host syncs for the progress line")
    checkpoint_every: int = field(0, at_least(0), help="steps between mid-epoch checkpoints (0: per epoch)")
    sync_batchnorm: bool = field(
        True, help="under torchrun: BatchNorm uses the moments of the whole global batch (SyncBatchNorm); "
                   "false: each process normalises its own slice")


_TEACHER_TRAIN = TrainConfig(
    epochs=5, optimizer=OptimizerConfig(name="sgd", learning_rate=1e-3, options={"momentum": 0.9})
)


@attrs.frozen(init=False)
class ModelConfig(WithOptions):
    """A student architecture; keys its builder takes (``widths``, ``batch_norm``) are its ``options``."""

    arch: str = field("seed_cnn", help="seed_cnn, small_cnn, a torchvision model name, timm:<name> (the timm "
                                       "extra) or module:Name (your own nn.Module class or builder)", names="model")
    weights: str = field("none", weights_source("student"),
                         help="starting weights: 'none' (random), 'imagenet' (a torchvision model's), 'pretrained' (a timm model's, from the local Hugging Face cache only), or a state dict "
                              "file for student.arch, matched strictly (a head of another size is replaced)")
    weights_prefix: str = field("", help="stripped from the weight file's keys, e.g. 'module.' (DataParallel) or "
                                         "'model.' (Lightning)")
    options: dict = field({}, help="the model's own keys (its builder's keyword parameters)", hash=False)


@attrs.frozen(init=False)
class TeacherConfig(WithOptions):
    """The teacher: its architecture, weights, checkpoint and (when fitted here) training; keys its
    builder takes (``widths``, ``batch_norm`` for small_cnn) are its ``options``."""

    arch: str = field("resnet18", help="torchvision model name, timm:<name> (the timm extra), seed_cnn / small_cnn, or "
                                       "module:Name (your own nn.Module class or builder)", names="model")
    weights: str = field("none", weights_source("teacher"),
                         help="starting weights for a teacher fit: 'none', 'imagenet', 'pretrained' (a timm model's, from the local Hugging Face cache only), or a .pth / .pt / .safetensors "
                              "state dict for teacher.arch, matched strictly (a head of another size is replaced and "
                              "fitted as teacher.mode says); with teacher.checkpoint empty, distill uses such a file as "
                              "the teacher itself")
    weights_prefix: str = field("", help="stripped from the weight file's keys, e.g. 'module.' (DataParallel) or "
                                         "'model.' (Lightning)")
    checkpoint: str = field("", file_path, help="fkd teacher checkpoint (written by `fkd teacher`)")
    fit_if_missing: bool = field(False, help="distill: fit the teacher first when its checkpoint is missing")
    mode: str = field("linear_probe", one_of("linear_probe", "finetune", "scratch"), help="teacher fit")
    source: str = field(
        "checkpoint", one_of("checkpoint", "ema"),
        help="where the teacher comes from: 'checkpoint' (teacher.checkpoint, fitted when missing and allowed), "
             "or 'ema': the moving average of the student's own weights, kept in the train state (a mean "
             "teacher: self-distillation, no checkpoint; teacher.arch is ignored)")
    decay: float = field(0.999, unit_interval, help="teacher.source = 'ema': the average's decay d per step, "
                                                     "ema <- d * ema + (1 - d) * student")
    cache: str = field("auto", one_of("auto", "memory", "disk", "off"), help="reuse teacher outputs")
    cache_dir: str = field(".fkd_cache", file_path, help="where disk caches of teacher outputs live")
    cache_max_gb: float = field(
        16.0, positive,
        help="most a teacher cache may take (GB, and never more than cache_dir's free space): when the features "
             "would not fit, only the logits are cached and the teacher runs live up to its last feature")
    train: TrainConfig = field(_TEACHER_TRAIN, help="how the teacher is fitted")
    weight: float = field(1.0, positive, help="[teachers.<name>] only: this teacher's weight in the ensemble "
                                              "(normalised over the teachers)")
    options: dict = field({}, help="the model's own keys (its builder's keyword parameters)", hash=False)


@attrs.frozen
class CohortConfig:
    """Students trained together, each from its own initialisation, that may teach each other (deep mutual
    learning: the ``mutual`` term). ``size`` members of ``[student]``'s architecture, or one
    ``[cohort.members.<name>]`` model table per member (architectures may differ)."""

    size: int = field(0, at_least(0), help="members of [student]'s architecture trained together (0: one student, no cohort)")
    members: dict = field({}, help="or one [cohort.members.<name>] table per member, with [student]'s keys "
                                   "(arch and its options): a mixed cohort", hash=False)
    strategy: str = field("auto", one_of("auto", "vmap", "loop"),
                          help="how the members' forward passes run: 'vmap' (stacked weights, one batched pass: "
                               "the members must share an architecture), 'loop', or 'auto' (vmap on CUDA when "
                               "they can, else loop)")

    @property
    def names(self) -> tuple[str, ...]:
        """The members' names: ``student1 .. studentK``, or the ``[cohort.members]`` tables' names."""
        return tuple(self.members) if self.members else tuple(f"student{k + 1}" for k in range(self.size))


@attrs.frozen(init=False)
class DistillConfig:
    """Which distillation loss trains the student: a weighted sum of registered loss terms.

    ``[distill.terms.<name>]`` tables (``weight`` and that term's keys; ``fkd config --keys`` lists them)
    are the one form past loading: ``method`` is then always ``"terms"``. The presets
    (``method = "logit"`` with ``temperature`` / ``alpha``, ...) are shorthand that :mod:`fkd.presets`
    expands to those tables when the config is read (or this class is built); ``preset`` keeps the
    name they were written with, for summaries.
    """

    method: str = field("terms", help="distillation loss: a preset (shorthand for term tables) or 'terms'",
                        names="distillation method")
    preset: str = field("terms", help="the preset the term tables were expanded from ('terms': written as tables)")
    student_features: list = field([], help="student feature names, paired by position")
    teacher_features: list = field([], help="teacher feature (FX node) names, paired by position")
    terms: dict = field({}, help="one [distill.terms.<name>] table per loss term")
    ensemble: str = field(
        "weighted", one_of("weighted", "confidence"),
        help="with [teachers.<name>] tables: how a term that reads the ensemble mixes the teachers' soft targets: "
             "'weighted' by teachers.<name>.weight, or 'confidence': per example, a teacher weighs less the "
             "higher its cross-entropy on the label (CA-MKD, Zhang et al. ICASSP 2022)")
    imports: list = field([], help="your own .py files or modules registering terms (or models, optimizers, ...); "
                                   "importing RUNS their code, so name only files you trust")

    def __init__(self, **kwargs: Any) -> None:
        self.__attrs_init__(**expand_preset(kwargs))


@attrs.frozen
class LogConfig:
    """Where a run's metrics go besides ``metrics.jsonl`` and the progress line (:mod:`fkd.log_sinks`). Each
    is optional: fkd imports tensorboard or wandb only when asked to here."""

    tensorboard: bool = field(
        False, help="write TensorBoard event files to <run>/tensorboard: loss terms, grad norm and lr every "
                    "train.log_every steps, accuracies per epoch, the config; a sweep: one run per student and its "
                    "hyper-parameters with final metrics (HParams). Needs pip install 'fkd[tensorboard]'")
    wandb: str = field("off", one_of("off", "offline", "online"),
                       help="log the same to Weights & Biases (files under <run>/wandb; 'offline' syncs nothing). "
                            "Needs pip install 'fkd[wandb]'")
    wandb_project: str = field("fkd", help="the W&B project runs are logged to")


@attrs.frozen
class Config:
    """A whole run."""

    name: str = field("fkd", plain_name, help="run name (run directory runs/<name>; a plain name, not a path)")
    seed: int = field(0, int64, help="seed for initialisation, data order and augmentation (64-bit)")
    device: str = field("auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    data: DataConfig = field(DataConfig(), help="data")
    teacher: TeacherConfig = field(TeacherConfig(), help="teacher")
    teachers: dict = field({}, help="several teachers: one [teachers.<name>] table each, with [teacher]'s keys and "
                                    "a weight; terms read their ensemble or name one (distill.terms.<term>.teacher)",
                           hash=False)
    student: ModelConfig = field(ModelConfig(), help="student")
    train: TrainConfig = field(TrainConfig(), help="student training")
    cohort: CohortConfig = field(CohortConfig(), help="students trained together")
    distill: DistillConfig = field(DistillConfig(), help="distillation loss")
    log: LogConfig = field(LogConfig(), help="logging to TensorBoard / W&B")


# --- parsing ---------------------------------------------------------------------------------


def from_dict(raw: dict) -> Config:
    """Parse a TOML dict into a :class:`Config`: keys, types and ranges checked, the preset expanded.

    Options, registered names and cross-field checks are not: :func:`fkd.build.resolve` does those.
    """
    raw = dict(raw)
    if isinstance(raw.get("distill"), dict):
        raw["distill"] = expand_preset(raw["distill"])
    teachers = raw.pop("teachers", {})
    if not isinstance(teachers, dict) or not all(isinstance(t, (dict, TeacherConfig)) for t in teachers.values()):
        raise ConfigError("teachers must hold one table per teacher, e.g. [teachers.a] arch = 'resnet18'.")
    if len(teachers) == 1:
        raise ConfigError(f"[teachers] has one teacher ({next(iter(teachers))}); an ensemble needs two or more, "
                          "and one teacher is the [teacher] table.")
    for name in teachers:
        if not name or ":" in name:
            raise ConfigError(f"teachers.{name!r}: a teacher's name must be non-empty and without ':'.")
    raw["teachers"] = {name: t if isinstance(t, TeacherConfig) else build_attrs(TeacherConfig, t, f"teachers.{name}.")
                       for name, t in teachers.items()}
    if isinstance(raw.get("cohort"), dict) and isinstance(raw["cohort"].get("members"), dict):
        cohort = dict(raw["cohort"])
        for name, member in cohort["members"].items():
            if not isinstance(member, (dict, ModelConfig)) or not name or ":" in name or "/" in name:
                raise ConfigError(f"cohort.members.{name} must be a model table ([cohort.members.<name>] arch = ...) "
                                  "under a plain name without ':' or '/'.")
        cohort["members"] = {name: m if isinstance(m, ModelConfig) else build_attrs(ModelConfig, m, f"cohort.members.{name}.")
                             for name, m in cohort["members"].items()}
        raw["cohort"] = cohort
    return build_attrs(Config, raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set key.sub=value``; the value is read as TOML, else taken as a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (got {text!r}), e.g. --set train.epochs=3.")
    key, _, value_text = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {shorten(text)!r}; write it as section.key=value.")
    path = key.split(".")
    if len(path) > MAX_DEPTH:
        raise ConfigError(f"--set {shorten(key)}: a key of {len(path)} parts, but config keys are at most "
                          f"{MAX_DEPTH} deep; check the key (python cli.py config --keys lists them).")
    return path, parse_value(value_text, f"--set {shorten(key)}")


def parse_value(text: str, where: str) -> Any:
    """A value typed on the command line, read as TOML (``3``, ``0.5``, ``[1, 2]``, ``"x"``), else taken as a
    bare string; nesting deeper than a config may is refused, naming ``where``."""
    try:
        return parse_toml(f"v = {text.strip()}", where)["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def _check_key_path(path: list[str], option: str = "--set") -> None:
    cls = Config
    for i, part in enumerate(path):
        if cls is None or not attrs.has(cls):
            if cls is dict:
                return  # free-form table (distill.weights, distill.terms: checked when the objective is built)
            raise ConfigError(f"{option} {'.'.join(path)}: '{'.'.join(path[:i])}' is not a table.")
        fields = {f.name: f for f in attrs.fields(cls) if f.name != "options"}
        if cls is DistillConfig and part in PRESET_KEYS:
            cls = typing.get_type_hints(PresetSettings)[part]
            continue
        if has_options(cls) and part not in fields:
            return  # an option of the chosen component: checked against its builder (fkd.build)
        if part not in fields:
            where = ".".join(path[:i])
            valid = list(fields) + (list(PRESET_KEYS) if cls is DistillConfig else [])
            hint = suggest(part, valid)
            raise ConfigError(f"{option} {'.'.join(path)}: no key '{part}' in {where or 'the config'}; {hint}")
        cls = typing.get_type_hints(cls)[part]
        if not attrs.has(cls) and cls is not dict and i < len(path) - 1:
            raise ConfigError(f"{option} {'.'.join(path)}: '{'.'.join(path[:i + 1])}' is not a table.")


def apply_overrides(raw: dict, overrides: list[str], option: str = "--set") -> dict:
    """A copy of ``raw`` with each ``key.sub=value`` override set (keys checked against the schema)."""
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


# --- writing ---------------------------------------------------------------------------------


def dumps(cfg: Config) -> str:
    """Serialise a config to TOML text that :func:`from_dict` reads back to an equal config (options as
    keys of their tables, the loss as its ``[distill.terms.<name>]`` tables)."""
    lines: list[str] = []

    def table(obj: Any, prefix: str) -> None:
        if prefix:
            lines.append(f"\n[{prefix}]")
        nested = []
        for f in attrs.fields(type(obj)):
            value = getattr(obj, f.name)
            if f.name == "options" and has_options(type(obj)):  # written as keys of the table itself
                lines.extend(f"{k} = {toml_value(v)}" for k, v in value.items())
            elif attrs.has(type(value)) or _is_table_of_tables(value):
                nested.append((f.name, value))
            else:
                lines.append(f"{f.name} = {toml_value(value)}")
        for name, value in nested:
            path = f"{prefix}.{name}" if prefix else name
            if attrs.has(type(value)):
                table(value, path)
            elif all(attrs.has(type(v)) for v in value.values()):  # [teachers.<name>] tables
                for key, sub in value.items():
                    table(sub, f"{path}.{key}")
            else:  # [distill.terms.<name>] tables, one per term
                for key, sub in value.items():
                    lines.append(f"\n[{path}.{key}]")
                    lines.extend(f"{k} = {toml_value(v)}" for k, v in sub.items())

    table(cfg, "")
    return "\n".join(lines) + "\n"


def _is_table_of_tables(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, dict) or attrs.has(type(v))
                                                           for v in value.values())


def schema_rows(cls=Config, prefix: str = "", defaults: Any = None, *, names=None,
                after=None) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every fixed key of the schema and the preset shorthand.

    Defaults are read from a default instance, so a nested table shows its own default (the teacher's
    optimizer is SGD, the student's Adam), not its class's. The build layer (:func:`fkd.build.help_text`)
    passes ``names(kind)``, the registered names a field may take, and ``after(key, table, field)``, rows
    to insert after a field (the options of the entry it chooses).
    """
    defaults = cls() if defaults is None else defaults
    rows = []
    for f in attrs.fields(cls):
        value = getattr(defaults, f.name)
        if f.name == "options" and has_options(cls):
            continue
        if attrs.has(type(value)):
            rows.extend(schema_rows(type(value), f"{prefix}{f.name}.", value, names=names, after=after))
            continue
        kind = f.metadata.get("names", "")
        rows.append((prefix + f.name, toml_value(value), meaning(f, names(kind) if names and kind else ())))
        if cls is DistillConfig and f.name == "preset":
            rows.extend((prefix + p.name, toml_value(p.default.factory() if isinstance(p.default, attrs.Factory)
                                                     else p.default), meaning(p) + " (expanded to [distill.terms])")
                        for p in attrs.fields(PresetSettings))
        if after is not None:
            rows.extend(after(prefix + f.name, defaults, f))
    return rows


def meaning(f: attrs.Attribute, names: tuple[str, ...] = ()) -> str:
    """A field's help, with its fixed choices or the registered ``names`` it may take."""
    choices = [c for v in validators_of(f) for c in getattr(v, "choices", ())] + list(names)
    return f.metadata.get("help", "") + (f": {' | '.join(choices)}" if choices else "")
