"""Factor transfer (FT): the student's translated factor matches the teacher's paraphrased factor.

Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer", NeurIPS 2018;
the authors' code is github.com/Jangho-Kim/Factor-Transfer-pytorch (``utils.FT``, ``train_student.py``,
``Models/FeatureProjection.py``: ``Paraphraser``, ``Translator``). The paraphraser is trained first, on
the teacher's features alone, to reconstruct them (L1, ``train_Paraphraser.py``), then frozen; the
translator trains with the student.

The modules here are pure functions of a parameter dict (3x3 convolutions, padding 1, bias, LeakyReLU 0.1);
their initialisation is PyTorch's default for ``Conv2d`` / ``ConvTranspose2d`` (uniform in
``+-1/sqrt(fan_in)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["factor_transfer", "init_paraphraser", "init_translator", "paraphraser_encode",
           "paraphraser_reconstruct", "translate"]

_SLOPE = 0.1  # the authors' nn.LeakyReLU(0.1)


def factor_transfer(student_factor: Tensor, teacher_factor: Tensor) -> Tensor:
    r"""``mean_{B D} | normalize(flatten f_s) - normalize(flatten f_t) |``: the authors' ``L1Loss()(FT(f_s),
    FT(f_t))`` with ``FT(x) = F.normalize(x.view(B, -1))``.

    The paper writes the p-norm of the difference per example (p = 1); the code's ``L1Loss`` averages the
    absolute differences over ``B x D``. ``beta`` (500 in the code) is the objective's weight.

    Args:
        student_factor: ``(B, ...)``, the translator's output.
        teacher_factor: ``(B, ...)`` with the same size per example, the paraphraser's code of the teacher.
    """
    s, t = student_factor.flatten(1), teacher_factor.detach().flatten(1)
    if s.shape != t.shape:
        raise ValueError(f"factor_transfer: student factor of shape {tuple(student_factor.shape)} and teacher factor "
                         f"of shape {tuple(teacher_factor.shape)} must have the same size per example")
    return (F.normalize(s, dim=1) - F.normalize(t, dim=1)).abs().mean()


def _uniform(shape, fan_in: int, generator: torch.Generator) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def _conv_params(c_in: int, c_out: int, generator: torch.Generator, *, transposed: bool = False) -> dict:
    shape = (c_in, c_out, 3, 3) if transposed else (c_out, c_in, 3, 3)
    fan_in = shape[1] * 9  # PyTorch's fan_in reads weight.size(1) for both kinds
    return {"weight": _uniform(shape, fan_in, generator), "bias": _uniform((c_out,), fan_in, generator)}


def init_paraphraser(channels: int, factor_channels: int, generator: torch.Generator) -> dict:
    """The paraphraser's parameters: encoder ``conv0 C->C, conv1 C->F, conv2 F->F``, decoder ``deconv0
    F->F, deconv1 F->C, deconv2 C->C`` (F = round(C * rate), the factor's channels)."""
    c, f = channels, factor_channels
    return {"conv0": _conv_params(c, c, generator), "conv1": _conv_params(c, f, generator),
            "conv2": _conv_params(f, f, generator),
            "deconv0": _conv_params(f, f, generator, transposed=True),
            "deconv1": _conv_params(f, c, generator, transposed=True),
            "deconv2": _conv_params(c, c, generator, transposed=True)}


def init_translator(student_channels: int, factor_channels: int, generator: torch.Generator) -> dict:
    """The translator's parameters: ``conv0 C_s->C_s, conv1 C_s->F, conv2 F->F``."""
    c, f = student_channels, factor_channels
    return {"conv0": _conv_params(c, c, generator), "conv1": _conv_params(c, f, generator),
            "conv2": _conv_params(f, f, generator)}


def _stack(x: Tensor, params: dict, names: tuple, transposed: bool = False) -> Tensor:
    lead = x.shape[:-3]
    x = x.reshape((-1,) + tuple(x.shape[-3:]))
    conv = F.conv_transpose2d if transposed else F.conv2d
    for name in names:
        x = F.leaky_relu(conv(x, params[name]["weight"], params[name]["bias"], padding=1), _SLOPE)
    return x.reshape(tuple(lead) + tuple(x.shape[-3:]))


def paraphraser_encode(x: Tensor, params: dict) -> Tensor:
    """The teacher's factor (the authors' ``Paraphraser(x, mode=1)``): ``(B, C, H, W) -> (B, F, H, W)``."""
    return _stack(x, params, ("conv0", "conv1", "conv2"))


def paraphraser_reconstruct(x: Tensor, params: dict) -> Tensor:
    """Encoder then decoder (``mode=0``), what the paraphraser is trained on: ``(B, C, H, W) -> (B, C, H, W)``."""
    return _stack(paraphraser_encode(x, params), params, ("deconv0", "deconv1", "deconv2"), transposed=True)


def translate(x: Tensor, params: dict) -> Tensor:
    """The student's factor (the authors' ``Translator``): ``(B, C_s, H, W) -> (B, F, H, W)``."""
    return _stack(x, params, ("conv0", "conv1", "conv2"))
