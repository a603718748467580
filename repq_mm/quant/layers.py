"""Quantized plain layers: ``QConv2d`` and ``QLinear`` (LSQ on weights and input)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .config import QConfig
from .lsq import LSQQuantizer


class _EvalWeightCache:
    """Caches the quantized weight while not training, keyed on tensor versions and on the
    settings (``enabled``, ``bits``, ...) of the quantizers it depends on (the weight's; with
    ``int_bias`` the input's too), so that inference does not re-quantize (or re-merge) the
    weight on every call. Not used while training, while gradients are needed, or inside
    ``torch.compile`` (which traces the computation)."""

    def _cached(self, key_tensors, compute, quantizer=None):
        if self.training or torch.is_grad_enabled() and any(
                t.requires_grad for t in key_tensors):
            self.__dict__['_wcache'] = None
            return compute()
        if torch.compiler.is_compiling():
            return compute()
        key = tuple((id(t), t._version, t.device) for t in key_tensors)
        for q in (quantizer if isinstance(quantizer, (list, tuple)) else (quantizer, )):
            if q is not None:
                key += (q.state_key(),)
        cache = self.__dict__.get('_wcache')
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, compute())
            self.__dict__['_wcache'] = cache
        return cache[1]


def int_grid_bias(bias: torch.Tensor | None, w_quant: LSQQuantizer | None,
                  a_quant: LSQQuantizer | None) -> torch.Tensor | None:
    """``bias`` on the integer accumulator's grid, ``round(b / (s_a s_w)) * s_a s_w``
    (per output channel with per-channel weights), straight-through (gradient 1 to the
    bias, none to the step sizes): the int32 bias of an integer conv / GEMM
    (``QLinearConv``, ``QGemm``), so that the fake-quant model computes what the integer
    kernel computes. Unchanged (returned as is) without a bias, without an enabled weight and
    per-tensor activation quantizer, or before they are initialised.

    Example:
        >>> qcfg = QConfig(w_bits=4, a_bits=4, int_bias=True)
        >>> conv = QConv2d.from_float(nn.Conv2d(3, 8, 3), qcfg)
        >>> _ = conv(torch.randn(2, 3, 8, 8))          # initialises the step sizes
        >>> s = conv.a_quant.scale() * conv.w_quant.scale()
        >>> b = conv.quantized_bias()
        >>> bool(torch.equal(b, torch.round(conv.bias / s) * s))
        True
    """
    if bias is None or w_quant is None or a_quant is None or not w_quant.enabled or \
            not a_quant.enabled or a_quant.per_channel or not w_quant.is_initialized or \
            not a_quant.is_initialized:
        return bias
    s = a_quant.scale().detach().float().reshape(()) * \
        w_quant.scale().detach().float().reshape(-1)
    b = bias.float()
    b = b + (torch.round(b / s) * s - b).detach()
    return b.to(bias.dtype)


def clear_weight_caches(model: nn.Module) -> None:
    """Drop every eval-mode merged / quantized weight cache in ``model``."""
    for m in model.modules():
        if isinstance(m, _EvalWeightCache):
            m.__dict__['_wcache'] = None


class QConv2d(nn.Conv2d, _EvalWeightCache):
    """``nn.Conv2d`` with LSQ fake quantizers on its weight (``w_quant``) and its input
    (``a_quant``). Either may be ``None`` (not quantized). ``int_bias``: the bias on the integer
    accumulator's grid (:func:`int_grid_bias`).

    Example:
        >>> conv = nn.Conv2d(3, 8, 3, padding=1)
        >>> qconv = QConv2d.from_float(conv, QConfig(w_bits=4, a_bits=4))
        >>> qconv(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 8, 8, 8])
    """

    def __init__(self, *args, w_quant: LSQQuantizer | None = None,
                 a_quant: LSQQuantizer | None = None, int_bias: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.w_quant = w_quant
        self.a_quant = a_quant
        self.int_bias = bool(int_bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, qcfg: QConfig) -> 'QConv2d':
        if conv.padding_mode != 'zeros':
            raise ValueError(f'QConv2d supports padding_mode="zeros" only, got '
                             f'{conv.padding_mode!r}')
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                w_quant=qcfg.weight_quantizer(conv.out_channels), a_quant=qcfg.act_quantizer(),
                int_bias=qcfg.int_bias, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(conv.weight)
            if conv.bias is not None:
                q.bias.copy_(conv.bias)
        return q

    def quantized_weight(self) -> torch.Tensor:
        if self.w_quant is None:
            return self.weight
        return self._cached([self.weight, self.w_quant.step],
                            lambda: self.w_quant(self.weight), self.w_quant)

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias the layer adds: on the int32 grid with ``int_bias``
        (:func:`int_grid_bias`), else as it is (the integer export rounds it, see
        :mod:`repq_mm.export`)."""
        if self.int_bias:
            return int_grid_bias(self.bias, self.w_quant, self.a_quant)
        return self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + (', int_bias=True' if self.int_bias else '')

    def forward(self, x):
        if self.a_quant is not None:
            x = self.a_quant(x)
        return self._conv_forward(x, self.quantized_weight(), self.quantized_bias())


class QLinear(nn.Linear, _EvalWeightCache):
    """``nn.Linear`` with LSQ fake quantizers on weight and input (see :class:`QConv2d`).

    Example:
        >>> fc = QLinear.from_float(nn.Linear(16, 10), QConfig(w_bits=8, a_bits=8))
        >>> fc(torch.randn(4, 16)).shape
        torch.Size([4, 10])
    """

    def __init__(self, *args, w_quant: LSQQuantizer | None = None,
                 a_quant: LSQQuantizer | None = None, int_bias: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.w_quant = w_quant
        self.a_quant = a_quant
        self.int_bias = bool(int_bias)

    @classmethod
    def from_float(cls, fc: nn.Linear, qcfg: QConfig) -> 'QLinear':
        q = cls(fc.in_features, fc.out_features, fc.bias is not None,
                w_quant=qcfg.weight_quantizer(fc.out_features), a_quant=qcfg.act_quantizer(),
                int_bias=qcfg.int_bias, device=fc.weight.device, dtype=fc.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(fc.weight)
            if fc.bias is not None:
                q.bias.copy_(fc.bias)
        return q

    def quantized_weight(self) -> torch.Tensor:
        if self.w_quant is None:
            return self.weight
        return self._cached([self.weight, self.w_quant.step],
                            lambda: self.w_quant(self.weight), self.w_quant)

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias the layer adds: on the int32 grid with ``int_bias``
        (:func:`int_grid_bias`), else as it is (the integer export rounds it, see
        :mod:`repq_mm.export`)."""
        if self.int_bias:
            return int_grid_bias(self.bias, self.w_quant, self.a_quant)
        return self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + (', int_bias=True' if self.int_bias else '')

    def forward(self, x):
        if self.a_quant is not None:
            x = self.a_quant(x)
        return F.linear(x, self.quantized_weight(), self.quantized_bias())


def frozen_copy(q: LSQQuantizer | None) -> LSQQuantizer | None:
    """A copy of a quantizer for deployment: same state, step size not trainable."""
    if q is None:
        return None
    q2 = copy.deepcopy(q)
    q2.step.requires_grad_(False)
    return q2
