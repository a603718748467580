"""Per-layer bit-width sensitivity, weight-size accounting and budgeted mixed precision
(torch only; the OpenMMLab command line is ``tools/analysis_tools/sensitivity.py``).

* :func:`quantized_layers`: the quantized layers of a converted model (``QConv2d`` /
  ``QLinear`` with a weight quantizer, RepQ :class:`~repq_mm.rep.RepBlock` s), by module
  name, with what their size depends on.
* :func:`layer_weight_bytes`, :func:`model_weight_bytes`: deployed weight size in bytes
  (convention below).
* :func:`low_bit_quantizers`: fresh weight / activation quantizers at a lower bit width for
  every layer, initialised by a calibration callable (e.g. ``repq_mm.mm.calibrate_lsq``) on
  a copy of the model, with the model's own init rule (``init='lsq'`` or ``'mse'``).
* :func:`layer_sensitivity`: a measure (task loss, metric ...) of the model with each layer
  alone switched to those quantizers, the others left as they are.
* :func:`select_by_bytes` (exact 0/1 knapsack) and :func:`select_top_k`: which layers stay
  at the high bit width for a budget.

Weight-size convention (:func:`layer_weight_bytes`): a quantized layer holding ``n`` weight
elements (a rep block: its merged kernel, ``C_out * C_in / groups * k_h * k_w``) at ``b``
bits takes ``ceil(b * n / 8)`` bytes of packed codes, plus 4 bytes (float32) per weight step
size (``C_out`` per channel, else one), 4 bytes per bias element (a rep block always has
its merged bias) and 4 bytes per activation step size. Everything else in the model counts
as stored (:func:`other_bytes`: parameters and floating-point buffers at their element size,
e.g. a BN outside rep blocks; a rep block without quantizers in its merged float32 form).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from repq_mm import convert_to_repq
    >>> from repq_mm.rep import RepVGGBlock
    >>> net = convert_to_repq(nn.Sequential(RepVGGBlock(4, 8), nn.Flatten(),
    ...                                     nn.Linear(8 * 6 * 6, 10)), w_bits=8, a_bits=8)
    >>> [(layer.name, layer.kind, layer.elements) for layer in quantized_layers(net)]
    [('0', 'RepVGGBlock', 288), ('2', 'QLinear', 2880)]
    >>> layer_weight_bytes(quantized_layers(net)[0], w_bits=4)   # 144 + 4 + 32 + 4
    184
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from torch import nn

from .quant import LSQQuantizer, QConv2d, QLinear, check_bits
from .rep import RepBlock

__all__ = ['QLayer', 'quantized_layers', 'layer_weight_bytes', 'other_bytes',
           'model_weight_bytes', 'plan_weight_bytes', 'low_bit_quantizers', 'use_quantizers',
           'layer_sensitivity', 'select_by_bytes', 'select_top_k']

#: bytes of a float32 step size / bias element
FLOAT_BYTES = 4


@dataclass
class QLayer:
    """A quantized layer and what its deployed size depends on.

    Attributes:
        name: module name (relative to the module given to :func:`quantized_layers`).
        kind: class name (``'QConv2d'``, ``'QLinear'``, ``'RepVGGBlock'`` ...).
        elements: weight elements of the deployed layer (rep block: merged kernel).
        out_channels: output channels / features.
        bias: the deployed layer has a bias.
        per_channel: one weight step size per output channel.
        w_bits, a_bits: bit widths of its quantizers (``a_bits`` ``None``: no activation
            quantizer).
        a_scales: activation step sizes (elements of the quantizer's step).
        module: the layer itself.
    """

    name: str
    kind: str
    elements: int
    out_channels: int
    bias: bool
    per_channel: bool
    w_bits: int
    a_bits: int | None
    a_scales: int
    module: nn.Module = field(repr=False, compare=False)

    def to_dict(self) -> dict:
        """JSON-ready fields (no module)."""
        return dict(name=self.name, kind=self.kind, elements=self.elements,
                    out_channels=self.out_channels, bias=self.bias,
                    per_channel=self.per_channel, w_bits=self.w_bits, a_bits=self.a_bits,
                    a_scales=self.a_scales)


def _is_quantized_layer(m: nn.Module) -> bool:
    if isinstance(m, (QConv2d, QLinear)):
        return m.w_quant is not None
    return isinstance(m, RepBlock) and m.repq and m.w_quant is not None


def _merged_elements(blk: RepBlock) -> int:
    kh, kw = blk.kernel_size
    return blk.out_channels * (blk.in_channels // blk.groups) * kh * kw


def quantized_layers(model: nn.Module) -> list[QLayer]:
    """The quantized layers of ``model`` in registration order (the order
    :func:`~repq_mm.convert.convert_to_repq` uses for ``first_bits`` / ``last_bits``); a
    shared module once, under its first name. Names are those ``layer_bits`` matches when
    ``model`` is the converted module (e.g. a ``RepQModel``'s ``architecture``).

    Layers: ``QConv2d`` / ``QLinear`` with a weight quantizer, and rep blocks in RepQ mode
    with quantizers (their deployed form is one conv with the merged kernel).
    """
    out = []
    for name, m in model.named_modules():
        if not _is_quantized_layer(m):
            continue
        if isinstance(m, RepBlock):
            elements, out_ch, bias = _merged_elements(m), m.out_channels, True
        else:
            elements, out_ch = m.weight.numel(), m.weight.shape[0]
            bias = m.bias is not None
        a = m.a_quant
        out.append(QLayer(name=name, kind=type(m).__name__, elements=elements,
                          out_channels=out_ch, bias=bias, per_channel=bool(m.w_quant.per_channel),
                          w_bits=m.w_quant.bits, a_bits=None if a is None else a.bits,
                          a_scales=0 if a is None else a.step.numel(), module=m))
    return out


def layer_weight_bytes(layer: QLayer, w_bits: int | None = None) -> int:
    """Deployed bytes of ``layer`` with weights at ``w_bits`` (default: its own): packed
    codes ``ceil(w_bits * elements / 8)`` + float32 weight step sizes (``out_channels``
    per channel, else 1) + float32 bias + float32 activation step sizes."""
    bits = layer.w_bits if w_bits is None else check_bits(w_bits)
    codes = math.ceil(bits * layer.elements / 8)
    scales = layer.out_channels if layer.per_channel else 1
    bias = layer.out_channels if layer.bias else 0
    return codes + FLOAT_BYTES * (scales + bias + layer.a_scales)


def other_bytes(model: nn.Module) -> int:
    """Bytes of everything in ``model`` that is not a quantized layer, as stored:
    parameters and floating-point buffers at their element size (integer buffers such as
    ``num_batches_tracked`` are not weights). A rep block without quantizers counts in its
    merged form (kernel + bias, in its parameters' dtype); the ``act`` of a rep block (e.g.
    an SE) is walked like any module."""
    seen: set[int] = set()
    total = 0

    def walk(m: nn.Module) -> None:
        nonlocal total
        if id(m) in seen:
            return
        seen.add(id(m))
        if isinstance(m, RepBlock):
            if not _is_quantized_layer(m):
                size = next(m.parameters()).element_size()
                total += size * (_merged_elements(m) + m.out_channels)
            walk(m.act)                      # branches / post_bn / quantizers are merged
            return
        if _is_quantized_layer(m):           # weight, bias, quantizers: layer_weight_bytes
            return
        total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        total += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False)
                     if b.is_floating_point())
        for c in m.children():
            walk(c)

    walk(model)
    return total


def plan_weight_bytes(layers: Sequence[QLayer], w_bits: dict[str, int],
                      other: int = 0) -> int:
    """Total bytes with layer ``name`` at ``w_bits[name]`` (every layer must be given) plus
    ``other`` (:func:`other_bytes`)."""
    missing = [layer.name for layer in layers if layer.name not in w_bits]
    if missing:
        raise KeyError(f'no weight bit width for layer(s) {missing[:5]}')
    return other + sum(layer_weight_bytes(layer, w_bits[layer.name]) for layer in layers)


def model_weight_bytes(model: nn.Module) -> dict:
    """``{'total', 'quantized', 'other', 'layers': {name: bytes}}`` of ``model`` at its own
    bit widths (see the module docstring for the convention)."""
    layers = {layer.name: layer_weight_bytes(layer) for layer in quantized_layers(model)}
    other = other_bytes(model)
    quantized = sum(layers.values())
    return dict(total=quantized + other, quantized=quantized, other=other, layers=layers)


# --------------------------------------------------------------------------------------
# low-bit quantizers and the sensitivity loop
# --------------------------------------------------------------------------------------
def _fresh_quantizer(q: LSQQuantizer | None, bits: int) -> LSQQuantizer | None:
    """An uninitialised quantizer like ``q`` (signedness rule, granularity, init rule,
    implementation) at ``bits``."""
    if q is None:
        return None
    new = LSQQuantizer(bits, signed=q.signed_mode, per_channel=q.per_channel,
                       ch_axis=q.ch_axis, symmetric=q.symmetric, impl=q.impl,
                       num_channels=q.step.numel() if q.per_channel else None,
                       init=q.init_method).to(q.step.device)
    if hasattr(q, 'name'):
        new.name = q.name
    return new


def _drop_weight_cache(m: nn.Module) -> None:
    """Forget an eval-mode quantized-weight cache (``_EvalWeightCache``)."""
    if '_wcache' in m.__dict__:
        m.__dict__['_wcache'] = None


def low_bit_quantizers(model: nn.Module, w_bits: int, a_bits: int,
                       calibrate: Callable[[nn.Module], object], root: str = ''
                       ) -> dict[str, tuple[LSQQuantizer, LSQQuantizer | None]]:
    """Weight / activation quantizers at ``w_bits`` / ``a_bits`` for every quantized layer
    of ``model.get_submodule(root)``, initialised the way the model initialises its own.

    A deep copy of ``model`` gets fresh, uninitialised quantizers (same signedness rule,
    granularity, ``init`` rule and implementation as the originals) in every layer;
    ``calibrate(copy)`` must initialise them, e.g.
    ``lambda m: calibrate_lsq(m, loader, num_batches)`` (which runs the batches with every
    quantizer disabled, so each layer's step depends only on the float model and the data,
    as in PTQ). ``model`` is not changed. Returns ``{layer name: (w_quant, a_quant)}``.

    Raises:
        RuntimeError: a quantizer the calibration did not initialise (named).
    """
    check_bits(w_bits)
    check_bits(a_bits)
    twin = copy.deepcopy(model)
    sub = twin.get_submodule(root) if root else twin
    layers = quantized_layers(sub)
    for layer in layers:
        m = layer.module
        m.w_quant = _fresh_quantizer(m.w_quant, w_bits)
        m.a_quant = _fresh_quantizer(m.a_quant, a_bits)
        _drop_weight_cache(m)
    calibrate(twin)
    out = {}
    for layer in layers:
        m = layer.module
        missed = [k for k, q in (('w_quant', m.w_quant), ('a_quant', m.a_quant))
                  if q is not None and not q.is_initialized]
        if missed:
            raise RuntimeError(f'calibration did not initialise {missed} of layer '
                               f'{layer.name!r} (it never ran on the calibration batches)')
        out[layer.name] = (m.w_quant, m.a_quant)
    return out


@contextlib.contextmanager
def use_quantizers(layer: nn.Module, w_quant: LSQQuantizer | None,
                   a_quant: LSQQuantizer | None) -> Iterator[None]:
    """Within the block, ``layer`` uses ``w_quant`` / ``a_quant`` (its own are put back
    after, also on error)."""
    old = layer.w_quant, layer.a_quant
    layer.w_quant, layer.a_quant = w_quant, a_quant
    _drop_weight_cache(layer)
    try:
        yield
    finally:
        layer.w_quant, layer.a_quant = old
        _drop_weight_cache(layer)


def layer_sensitivity(model: nn.Module, low: dict[str, tuple], measure: Callable[[nn.Module],
                      float], higher_is_better: bool = False, root: str = '',
                      log: Callable[[str], object] | None = None) -> tuple[float, list[dict]]:
    """The change of ``measure(model)`` when one layer alone uses its ``low`` quantizers
    (:func:`low_bit_quantizers`), every other layer keeping its own.

    Returns ``(baseline, [{'name', 'value', 'delta'}, ...])`` in layer order, where
    ``delta`` is the degradation: ``value - baseline`` for a loss, ``baseline - value``
    with ``higher_is_better`` (accuracy, mAP); positive means worse.
    """
    sub = model.get_submodule(root) if root else model
    layers = quantized_layers(sub)
    unknown = [layer.name for layer in layers if layer.name not in low]
    if unknown:
        raise KeyError(f'no low-bit quantizers for layer(s) {unknown[:5]}')
    base = float(measure(model))
    if log is not None:
        log(f'baseline: {base:.6g}')
    out = []
    for i, layer in enumerate(layers):
        with use_quantizers(layer.module, *low[layer.name]):
            value = float(measure(model))
        delta = base - value if higher_is_better else value - base
        out.append(dict(name=layer.name, value=value, delta=delta))
        if log is not None:
            log(f'[{i + 1}/{len(layers)}] {layer.name}: {value:.6g} (delta {delta:+.4g})')
    return base, out


# --------------------------------------------------------------------------------------
# budgeted selection
# --------------------------------------------------------------------------------------
def select_by_bytes(costs: Sequence[int], values: Sequence[float], capacity: int
                    ) -> list[int]:
    """Exact 0/1 knapsack: the indices ``S`` maximising ``sum(values[S])`` subject to
    ``sum(costs[S]) <= capacity``; among equal values the cheapest set. Items with a value
    ``<= 0`` are never chosen (they gain nothing by the measure).

    Used with ``costs`` = extra bytes of keeping a layer at the high bit width and
    ``values`` = its sensitivity: the layers kept high minimise the summed per-layer
    degradation of the rest (the usual additivity assumption). Greedy by value per byte
    can be far from optimal (one large, very sensitive layer loses against several small
    ones); the exact solution is cheap for the tens to hundreds of layers of a network:
    dynamic programming over the Pareto frontier of (bytes, value) of partial selections
    (Nemhauser-Ullmann), whose size is bounded by the number of distinct byte totals.

    Example:
        >>> select_by_bytes([6, 5, 5], [10.0, 6.0, 6.0], 10)   # greedy would take item 0
        [1, 2]
    """
    if len(costs) != len(values):
        raise ValueError(f'{len(costs)} costs but {len(values)} values')
    for i, c in enumerate(costs):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f'costs must be non-negative ints, got {c!r} at {i}')
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(f'values must be finite, got {v!r} at {i}')
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f'capacity must be a non-negative int, got {capacity!r}')
    frontier = [(0, 0.0, 0)]                   # (bytes, value, bit mask of chosen items)
    for i, (c, v) in enumerate(zip(costs, values)):
        if v <= 0 or c > capacity:
            continue
        grown = [(b + c, val + v, mask | 1 << i) for b, val, mask in frontier
                 if b + c <= capacity]
        merged = sorted(frontier + grown, key=lambda s: (s[0], -s[1]))
        frontier, best = [], -math.inf
        for s in merged:                        # keep strictly better value per extra byte
            if s[1] > best:
                frontier.append(s)
                best = s[1]
    _, _, mask = max(frontier, key=lambda s: (s[1], -s[0]))
    return [i for i in range(len(costs)) if mask >> i & 1]


def select_top_k(values: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` largest values that are ``> 0`` (fewer when fewer are
    positive), ties in index order; returned in index order.

    Example:
        >>> select_top_k([0.1, 0.5, -1.0, 0.5], 2)
        [1, 3]
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f'k must be a non-negative int, got {k!r}')
    order = sorted((i for i, v in enumerate(values) if v > 0), key=lambda i: (-values[i], i))
    return sorted(order[:k])
