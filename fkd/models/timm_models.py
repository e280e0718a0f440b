"""timm models by name: ``timm:<name>`` in ``student.arch`` / ``teacher.arch``.

timm (``pip install 'fkd[timm]'``) is optional: nothing here imports it until a ``timm:`` name is built,
and without it such a name is one :class:`ConfigError` naming the extra.

* **Options.** The builder of a ``timm:`` name (:func:`timm_builder`) takes the keyword options most
  timm configs set as ``[student]`` / ``[teacher]`` keys (``img_size``, ``patch_size``, ``embed_dim``,
  ``depth``, ``num_heads``, ``drop_rate``, ``drop_path_rate``; 0 means timm's own default, the key is
  then not passed) and ``timm_args``, a table of any other keyword argument of that timm model
  (``timm_args = { mlp_ratio = 2.0, class_token = false }``), passed to ``timm.create_model`` as is.
  ``img_size = 0`` on a model that takes an image size (ViT, DeiT, Swin, ...) means ``data.image_size``.
* **Weights.** Always ``pretrained=False`` (random init from the run's seed) unless the config says
  ``weights = "pretrained"``: then timm's default pretrained tag (or the tag in the name,
  ``timm:resnet18.a1_in1k``) is read from the local Hugging Face cache (``$HF_HOME/hub``) or torch
  hub's cache, never downloaded (:func:`pretrained_file`); when it is not there, the error says so at
  once. A head of another size is left to timm, which drops the pretrained classifier then.
* **Features** come from the same FX extraction as torchvision models
  (:func:`fkd.models.zoo.with_features`), traced with timm's own leaf modules and functions
  (:func:`tracer_kwargs`, timm's ``_features_fx`` registry): names are module paths (``blocks.1``,
  ``stages.2``) or FX node names, listed in the error for a wrong one.
* **Distilled DeiT** (``deit_*_distilled_*``, Touvron et al. 2021): the train-mode graph's logits are
  the class token's head (``head``), the distillation token's head is the feature ``head_dist``, and
  eval mode returns timm's average of the two (:func:`train_logits_node`).
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Callable

from torch import nn

from fkd.errors import CheckpointError, ConfigError

#: The prefix of a timm model name in a config: ``student.arch = "timm:vit_tiny_patch16_224"``.
PREFIX = "timm:"

#: The options of :func:`timm_builder`'s builders whose 0 means "timm's default" (the key is not passed).
SIZE_OPTIONS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")


def is_timm_name(arch: str) -> bool:
    """Whether ``arch`` names a timm model (``timm:<name>``)."""
    return arch.startswith(PREFIX)


def import_timm():
    """The ``timm`` module, or a :class:`ConfigError` naming the extra that installs it."""
    try:
        import timm
    except ImportError:
        raise ConfigError("timm models (timm:<name>) need the timm package, which is not installed; run "
                          "pip install 'fkd[timm]' (or pip install timm).") from None
    return timm


def timm_name(arch: str, key: str = "arch") -> str:
    """The timm model name of ``timm:<name>``, checked against timm's registry (did-you-mean on a typo)."""
    timm = import_timm()
    name = arch[len(PREFIX):]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.partition(".")[0], timm.list_models(), n=3, cutoff=0.6)
        hint = (f"did you mean {' or '.join(repr(PREFIX + c) for c in close)}?" if close
                else "see timm.list_models() for the names.")
        raise ConfigError(f"{key} = '{arch}' is not a timm model; {hint}")
    return name


def timm_builder(arch: str, *, key: str = "arch") -> Callable[..., nn.Module]:
    """``builder(num_classes, image_size, **options) -> nn.Module`` for ``arch = "timm:<name>"``.

    Its keyword parameters are the config keys a timm model takes (see the module docstring).
    """
    return _builder(timm_name(arch, key))


def _builder(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, image_size: int, *, weights: str = "none", img_size: int = 0,
              patch_size: int = 0, embed_dim: int = 0, depth: int = 0, num_heads: int = 0,
              drop_rate: float = 0.0, drop_path_rate: float = 0.0, timm_args: dict = {}) -> nn.Module:  # noqa: B006
        """A timm model (``timm.create_model``) with ``num_classes`` outputs.

        Args:
            img_size: timm: input side the model is built for (ViT, DeiT, Swin, ...); 0: data.image_size
                when the model takes one
            patch_size: timm: side of a ViT's patches (0: the model's default)
            embed_dim: timm: width of a transformer's tokens (0: the model's default)
            depth: timm: number of transformer blocks (0: the model's default)
            num_heads: timm: attention heads per block (0: the model's default)
            drop_rate: timm: dropout before the classifier
            drop_path_rate: timm: stochastic depth rate
            timm_args: timm: any other keyword argument of timm.create_model for this model, as a table
                (e.g. { mlp_ratio = 2.0 })
        """
        sizes = {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth,
                 "num_heads": num_heads}
        for option, value in sizes.items():
            if value < 0:
                raise ConfigError(f"{option} must be >= 0 (got {value}); 0 keeps timm's default.")
        kwargs = {k: v for k, v in sizes.items() if v}
        if drop_rate:
            kwargs["drop_rate"] = drop_rate
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        clash = sorted(set(timm_args) & {*kwargs, "num_classes", "pretrained"})
        if clash:
            raise ConfigError(f"timm_args sets '{clash[0]}', which fkd sets itself; use the key of its own "
                              "(or data's number of classes) instead of timm_args.")
        kwargs.update(timm_args)
        return create(name, num_classes, weights=weights, default_img_size=image_size, **kwargs)

    return build


#: The builder's signature and help without a model name (``fkd config --keys`` shows its keys; timm may
#: be missing then).
options_template = _builder("<name>")


def create(name: str, num_classes: int, *, weights: str = "none", default_img_size: int = 0, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=..., num_classes=..., **kwargs)``; a keyword the model does not
    take is a :class:`ConfigError` naming it. ``default_img_size`` is passed as ``img_size`` when that
    key is unset and the model takes it."""
    timm = import_timm()
    pretrained_overlay = {}
    if weights == "pretrained":
        pretrained_overlay = {"pretrained_cfg_overlay": {"file": str(pretrained_file(name))}}
    elif weights != "none":
        raise ConfigError(f"weights = '{weights}' is not available for the timm model '{name}'; use 'pretrained' "
                          "(timm's weights from the local Hugging Face cache) or 'none'.")
    tries = [kwargs]
    if default_img_size and "img_size" not in kwargs:
        tries = [{**kwargs, "img_size": default_img_size}, kwargs]
    for i, extra in enumerate(tries):
        try:
            return timm.create_model(name, pretrained=weights == "pretrained", num_classes=num_classes,
                                     **pretrained_overlay, **extra)
        except TypeError as exc:
            if "unexpected keyword argument" not in str(exc):
                raise
            bad = str(exc).rpartition("argument")[2].strip(" '\"")
            if bad == "img_size" and i + 1 < len(tries):
                continue  # a model without an input size (a CNN): built without it
            raise ConfigError(f"the timm model '{name}' takes no keyword '{bad}'; remove it from the model's "
                              "table (or from its timm_args).") from None
    raise AssertionError("unreachable")


def pretrained_file(name: str) -> Path:
    """The local file of timm's pretrained weights for ``name`` (its tag's or the default one).

    Looked up without any network access: the Hugging Face cache (``huggingface_hub``'s
    ``try_to_load_from_cache`` for ``model.safetensors`` then ``pytorch_model.bin`` of the tag's
    ``hf_hub_id``, under ``$HF_HOME/hub`` or ``$HF_HUB_CACHE``), then torch hub's checkpoint folder for
    a tag that has only a URL. Not there: a :class:`CheckpointError` saying where it should be.
    """
    timm = import_timm()
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as exc:  # a tag the architecture does not have
        raise ConfigError(f"'{PREFIX}{name}': {exc} Use a tag timm lists (timm.list_pretrained('{name.partition('.')[0]}*')).") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ConfigError(f"timm has no pretrained weights for '{name}'; set weights = 'none'.")
    if cfg.file and Path(cfg.file).is_file():
        return Path(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for file in files:
            found = try_to_load_from_cache(repo, file, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        raise CheckpointError(
            f"timm's pretrained weights for '{name}' ({repo}) are not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE}{offline}; fkd never downloads them during a run: fetch them once with "
            f"network access (python -c \"import timm; timm.create_model('{name}', pretrained=True)\"), point "
            "HF_HOME at a cache that has them, or set weights = 'none'.")
    import torch

    where = Path(torch.hub.get_dir()) / "checkpoints" / cfg.url.rsplit("/", 1)[-1]
    if where.is_file():
        return where
    raise CheckpointError(f"timm's pretrained weights for '{name}' are not in torch hub's cache ({where}); fkd never "
                          "downloads them during a run: fetch them once with network access, copy the file there, "
                          "or set weights = 'none'.")


def is_timm_module(module: nn.Module) -> bool:
    """Whether ``module`` is a timm model (its class comes from the ``timm`` package)."""
    return type(module).__module__.startswith("timm.")


def tracer_kwargs(module: nn.Module) -> dict:
    """``tracer_kwargs`` for torchvision's FX feature extraction: timm's registered leaf modules and
    functions that FX must not trace into (empty for a model that is not timm's)."""
    if not is_timm_module(module) or "timm" not in sys.modules:
        return {}
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules

    return {"leaf_modules": list(get_notrace_modules()), "autowrap_functions": list(get_notrace_functions())}


def distillation_head(module: nn.Module) -> str | None:
    """The distillation token's head of a timm distilled model (``head_dist`` of DeiT), else None.

    timm names a model's classifiers in ``pretrained_cfg["classifier"]``; a distilled DeiT has two,
    ``("head", "head_dist")`` (Touvron et al. 2021, Sec. 4: class token and distillation token).
    """
    if not is_timm_module(module):
        return None
    heads = (getattr(module, "pretrained_cfg", None) or {}).get("classifier")
    return heads[1] if isinstance(heads, (tuple, list)) and len(heads) == 2 else None


def train_logits_node(module: nn.Module) -> str | None:
    """The FX node that is the model's logits in training when it is not the graph's output: the class
    token's head of a distilled DeiT (its distillation head is then read as a feature, see
    :func:`distillation_head`); None for every other model."""
    if distillation_head(module) is None:
        return None
    return module.pretrained_cfg["classifier"][0]
