"""Integer deployment export: a merged quantized model to ONNX with QuantizeLinear /
DequantizeLinear (QDQ) nodes carrying the learned LSQ step sizes, in a form that
onnxruntime runs as integer kernels (torch; ``onnx`` and ``onnxruntime`` only for saving
metadata and checking).

Two graph forms (``form=``), both computing exactly the LSQ codes of the PyTorch model:

``'fused'`` (default): what onnxruntime's CPU execution provider fuses into integer kernels.

* activation quantizer ``a_quant``: ``QuantizeLinear(x, s_a, zp) [-> Clip] ->
  DequantizeLinear``, always **uint8**: zero point 0 for unsigned codes (post-ReLU), 128 for
  signed codes (``round(x / s) + 128`` saturated to ``[0, 255]`` is exactly the int8 code
  ``clamp(round(x / s), -128, 127)`` plus 128). onnxruntime's x86 QDQ fusion takes only
  uint8 activations (its ``QDQIsInt8Allowed`` is false off ARM). An LSQ range narrower than
  the stored one (fewer than 8 bits, or the symmetric signed range) is enforced on the
  **integer codes**: a ``Clip(codes, zp - Q_N, zp + Q_P)`` on the uint8 tensor between
  QuantizeLinear and DequantizeLinear. A float ``Clip`` in front of QuantizeLinear (the
  ``'qdq'`` form) keeps the producing ``Conv`` from fusing; the integer Clip does not, so
  sub-8-bit layers run as ``QLinearConv`` with one cheap uint8 Clip between them. The codes
  are ``clamp(round(x / s_a), -Q_N, Q_P)`` exactly as in LSQ;
* weight: an integer initializer with the LSQ codes
  (:meth:`~repq_mm.quant.LSQQuantizer.quantize_to_codes`, any bit width 2..8) and
  ``DequantizeLinear(codes, s_w, zp)``, per output channel (``axis=0``) when the quantizer
  is per channel. Stored as int8 (zero point 0) or as uint8 with zero point 128
  (``weight_dtype``): x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) compute uint8 x int8
  products with ``vpmaddubsw``, which **saturates** the sum of two neighbouring products to
  int16; uint8 x uint8 does not. ``weight_dtype='auto'`` (default) stores a layer's weights
  as uint8 when ``2 * max|w_code| * max stored activation code > 32767`` (an 8-bit weight
  against 8-bit activations) and for every ``ConvInteger`` layer (onnxruntime's int8-weight
  ``ConvInteger`` is about 2.5x slower than its uint8 one on AVX2), else int8; the file is
  then exact on every CPU without any session option (onnxruntime's
  ``session.x64quantprecision=1`` makes the same conversion at load time for int8 files);
* bias of a conv that becomes ``QLinearConv``: an **int32 initializer** ``round(b / s_b)``
  + ``DequantizeLinear(codes, s_b)`` at the accumulator's scale ``s_b = s_a s_w``, the bias
  input of that kernel (onnxruntime rounds a float bias to this itself when it fuses).
  Rounding moves an output by up to ``s_b / 2``; to make that small the weight codes are
  stored multiplied by a per-channel integer ``F`` (weight scale ``s_w / F``, the same
  products: :func:`_code_factor`, e.g. ``F = 15`` for 4-bit weights), so the bias grid is
  ``F`` times finer. :func:`snap_bias_to_int32` puts a PyTorch model on the same biases.
  Linear layers become ``QGemm`` without its int32 ``C`` input, the float32 bias added after
  (exact);
* a quantized conv whose output does not go straight (or through one ``Relu``) into exactly
  one QuantizeLinear (a network output, a conv feeding a pooling / concat / several
  quantizers) cannot become ``QLinearConv`` (which needs an output scale the PyTorch model
  does not have). It is written as the integer op itself: ``ConvInteger(x codes, w codes)``
  -> ``Cast`` -> ``Mul(s_a s_w)`` -> ``Add(float32 bias)``: the exact int32 accumulator,
  then float (no bias rounding). Linear layers stay ``DequantizeLinear -> Gemm``
  (onnxruntime fuses them into ``QGemm``, with a float output when no QuantizeLinear
  follows);
* an inference ``BatchNormalization`` right after a quantized conv (a plain conv + BN
  module, e.g. a detector head's) is folded into the conv's per-output-channel weight scale
  and bias, the integer codes unchanged (:func:`_fold_batchnorm`).

``'qdq'``: the previous, plain QDQ form: every activation quantizer is one adjacent
``[Clip ->] QuantizeLinear -> DequantizeLinear`` group (float Clip to ``[-Q_N s, Q_P s]``,
int8 zero point 0 for signed codes), int8 weights, float32 biases unless ``int32_bias``.
onnxruntime fuses it for 8-bit activations only (21 of 22 RepVGG-A0 convs at W8A8, none at
W4A4); kept for tools that pattern-match adjacent Q -> DQ pairs.

Every quantizer's bit width, signedness, clamp range, storage type, zero point and clamp
op, and every layer's expected integer kernel, are recorded in the model's
``metadata_props`` (key ``repq_mm.quantizers``, JSON; ``repq_mm.form``) and returned by
:func:`export_onnx`.

The export temporarily replaces each quantizer's forward by an ``autograd.Function`` whose
``symbolic`` emits those nodes (legacy TorchScript exporter, ``dynamo=False``: the dynamo
exporter needs ``onnxscript``, and ``torch.fake_quantize_*`` export only the full 8-bit
ranges); the ``ConvInteger`` rewrite is a pass over the exported graph. Any ``nn.Module``
works given an example input: rep blocks are merged first, plain quantized layers are put on
their integer grid; outputs may be nested tuples / lists.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from repq_mm import convert_to_repq
    >>> from repq_mm.rep import RepVGGBlock
    >>> net = nn.Sequential(RepVGGBlock(3, 8, act=nn.ReLU()), nn.Flatten(), nn.Linear(512, 4))
    >>> q = convert_to_repq(net, w_bits=4, a_bits=4).eval()
    >>> _ = q(torch.randn(2, 3, 8, 8))           # initialises the step sizes
    >>> info = export_onnx(q, torch.randn(1, 3, 8, 8), 'net.onnx')  # doctest: +SKIP
    >>> [layer['kernel'] for layer in info['layers']]                # doctest: +SKIP
    ['ConvInteger', 'QGemm']
"""
from __future__ import annotations

import collections
import contextlib
import copy
import io
import json
import os.path as osp
import sys
import tempfile
import warnings
from typing import Iterable

import torch
from torch import nn

from .convert import snap_to_grid
from .io import atomic_path, flatten_tensors
from .quant import LSQQuantizer, QConv2d, QLinear
from .quant.layers import clear_weight_caches
from .rep import RepBlock

__all__ = ['export_onnx', 'export_fp32_onnx', 'quantized_export_mode', 'run_onnx',
           'compare_onnx', 'snap_bias_to_int32', 'ort_session', 'count_kernels',
           'read_quantizer_records', 'ExportError', 'DEFAULT_OPSET', 'FORMS',
           'WEIGHT_DTYPES', 'INTEGER_KERNELS']

DEFAULT_OPSET = 17
META_KEY = 'repq_mm.quantizers'
FORMS = ('fused', 'qdq')
WEIGHT_DTYPES = ('auto', 'int8', 'uint8')
#: onnxruntime kernels that compute a quantized conv / linear on integers
INTEGER_KERNELS = ('QLinearConv', 'ConvInteger', 'QGemm', 'QLinearMatMul', 'MatMulInteger',
                   'MatMulIntegerToFloat', 'DynamicQuantizeMatMul')
#: float kernels a conv / linear can end up in after onnxruntime's graph optimisation
FLOAT_KERNELS = ('Conv', 'FusedConv', 'NchwcConv', 'ConvTranspose', 'Gemm', 'FusedGemm',
                 'MatMul', 'FusedMatMul')
_CODES = 'weight_int8'
_CODES_U8 = 'weight_uint8'
_BIAS_CODES = 'bias_int32'
_INT16_MAX = 32767          # vpmaddubsw saturates a pair of u8 x s8 products to int16


class ExportError(RuntimeError):
    """The model cannot be exported as an integer model (reason names the layer)."""


# --------------------------------------------------------------------------------------
# ONNX-exportable quantize / dequantize functions
# --------------------------------------------------------------------------------------
def _bshape(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


class _ActQDQ(torch.autograd.Function):
    """Fake quantization of an activation; exports as ``QuantizeLinear -> [Clip(codes) ->]
    DequantizeLinear`` (``'fused'``) or ``[Clip ->] QuantizeLinear -> DequantizeLinear``
    (``'qdq'``).

    ``scale``: 0-D (per tensor) or 1-D along ``axis`` (``axis=-1``: per tensor).
    ``lo, hi``: the float clip bounds ``-Q_N s, Q_P s`` (same shape as ``scale``), used with
    ``float_clip``. ``zp``: the stored zero point (int8 storage when ``int8_storage``, else
    uint8); with ``code_clip``, an integer Clip to the stored codes ``[code_lo, code_hi]``.
    """

    @staticmethod
    def forward(ctx, x, scale, lo, hi, qn: int, qp: int, axis: int, zp: int,
                int8_storage: bool, float_clip: bool, code_clip: bool, code_lo: int,
                code_hi: int):
        if axis < 0:
            return torch.fake_quantize_per_tensor_affine(x, float(scale), 0, -qn, qp)
        return torch.fake_quantize_per_channel_affine(
            x, scale.float(), torch.zeros(scale.shape, dtype=torch.int32), axis, -qn, qp)

    @staticmethod
    def symbolic(g, x, scale, lo, hi, qn, qp, axis, zp, int8_storage, float_clip, code_clip,
                 code_lo, code_hi):
        per_channel = axis >= 0
        dtype = torch.int8 if int8_storage else torch.uint8
        shape = (_static_len(scale),) if per_channel else ()
        zpc = g.op('Constant', value_t=torch.full(shape, zp, dtype=dtype))
        if float_clip:
            if per_channel:   # Clip takes scalars: element-wise Max / Min with shaped bounds
                x = g.op('Max', g.op('Min', x, hi), lo)
            else:
                x = g.op('Clip', x, lo, hi)
        kw = {'axis_i': axis} if per_channel else {}
        q = g.op('QuantizeLinear', x, scale, zpc, **kw)
        if code_clip:                     # the LSQ range on the integer codes (scalars)
            q = g.op('Clip', q, g.op('Constant', value_t=torch.tensor(code_lo, dtype=dtype)),
                     g.op('Constant', value_t=torch.tensor(code_hi, dtype=dtype)))
        return g.op('DequantizeLinear', q, scale, zpc, **kw)


class _WeightDQ(torch.autograd.Function):
    """``(codes - zp) * scale`` from stored integer codes; exports as
    ``DequantizeLinear(codes, scale, zp)`` (per channel along ``axis`` when ``axis >= 0``)."""

    @staticmethod
    def forward(ctx, codes, scale, axis: int, zp: int):
        s = scale if axis < 0 else _bshape(scale, axis, codes.dim())
        c = codes.to(scale.dtype)
        return (c - zp if zp else c) * s

    @staticmethod
    def symbolic(g, codes, scale, axis, zp):
        dtype = torch.uint8 if zp else torch.int8
        if axis >= 0:
            zpc = g.op('Constant', value_t=torch.full((_static_len(scale),), zp, dtype=dtype))
            return g.op('DequantizeLinear', codes, scale, zpc, axis_i=axis)
        zpc = g.op('Constant', value_t=torch.tensor(zp, dtype=dtype))
        return g.op('DequantizeLinear', codes, scale, zpc)


class _BiasDQ(torch.autograd.Function):
    """``codes * scale`` from int32 codes; exports as ``DequantizeLinear(codes, scale, 0)``
    with an int32 zero point (per output channel when ``scale`` is a vector)."""

    @staticmethod
    def forward(ctx, codes, scale, axis: int):
        return codes.to(scale.dtype) * scale

    @staticmethod
    def symbolic(g, codes, scale, axis):
        if axis >= 0:
            zp = g.op('Constant', value_t=torch.zeros(_static_len(scale), dtype=torch.int32))
            return g.op('DequantizeLinear', codes, scale, zp, axis_i=axis)
        zp = g.op('Constant', value_t=torch.zeros((), dtype=torch.int32))
        return g.op('DequantizeLinear', codes, scale, zp)


def _static_len(v) -> int:
    t = v.type()
    sizes = t.sizes() if hasattr(t, 'sizes') else None
    if not sizes or sizes[0] is None:
        raise ExportError('per-channel scale without a static length')
    return int(sizes[0])


# --------------------------------------------------------------------------------------
# preparing the model
# --------------------------------------------------------------------------------------
def _act_storage(q: LSQQuantizer, form: str) -> dict:
    """Storage of an activation quantizer's codes: ``storage``, ``zero_point``, the stored
    range ``[zp - Q_N, zp + Q_P]`` and how a narrower LSQ range is enforced (``clamp_op``:
    ``'Clip(codes)'`` on the integers, ``'Clip'`` / ``'Min/Max'`` on floats, ``None``)."""
    qn, qp = q.qrange
    signed = bool(q.is_signed)
    if form == 'fused':
        storage, zp, lo_store, hi_store = 'uint8', (128 if signed else 0), 0, 255
    else:
        storage = 'int8' if signed else 'uint8'
        zp, lo_store, hi_store = 0, (-128 if signed else 0), (127 if signed else 255)
    narrower = (zp - qn, zp + qp) != (lo_store, hi_store)
    if zp - qn < lo_store or zp + qp > hi_store:
        raise ExportError(f'LSQ range [{-qn}, {qp}] does not fit {storage}')
    clamp_op = None
    if narrower:
        clamp_op = 'Clip(codes)' if form == 'fused' else (
            'Min/Max' if q.per_channel else 'Clip')
    return dict(storage=storage, zero_point=zp, stored_range=[zp - qn, zp + qp],
                clamp_op=clamp_op)


def _describe(name: str, q: LSQQuantizer, kind: str, form: str) -> dict:
    qn, qp = q.qrange
    signed = bool(q.is_signed) if kind == 'act' else True
    s = q.scale().detach().float().flatten().cpu()
    rec = dict(name=name, kind=kind, bits=q.bits, signed=signed,
               per_channel=bool(q.per_channel), axis=q.ch_axis if q.per_channel else None,
               clamp=[-qn, qp], storage='int8', zero_point=0, clip=False,
               scale=[float(v) for v in s] if s.numel() <= 16 else
               dict(n=s.numel(), min=float(s.min()), max=float(s.max())))
    if kind == 'act':
        st = _act_storage(q, form)
        rec.update(st, clip=st['clamp_op'] is not None)
    return rec


def _layer_quantizers(model: nn.Module):
    """``(module name, layer or None, quantizer, kind)`` of every enabled quantizer; raises
    for weight quantizers outside ``QConv2d`` / ``QLinear``."""
    layers = {id(m): (n, m) for n, m in model.named_modules() if isinstance(m, (QConv2d,
                                                                                  QLinear))}
    w_of = {}
    for lname, m in layers.values():
        if m.w_quant is not None:
            w_of[id(m.w_quant)] = (lname, m)
    out, seen = [], set()
    for name, q in model.named_modules():
        if not isinstance(q, LSQQuantizer) or id(q) in seen or not q.enabled:
            continue
        seen.add(id(q))
        if id(q) in w_of:
            out.append((name, w_of[id(q)][1], q, 'weight'))
        elif name.rsplit('.', 1)[-1] == 'w_quant':
            raise ExportError(f'{name}: a weight quantizer outside QConv2d / QLinear (merge '
                              'the model first, repq_mm.merge_model)')
        else:
            out.append((name, None, q, 'act'))
        if not q.is_initialized:
            raise ExportError(f'{name}: LSQ quantizer is not initialised (train, calibrate '
                              'or load a checkpoint first)')
    return out


_INT32_BIAS_LIMIT = 2 ** 30   # |bias code| bound: leaves int32 headroom for the accumulator


def _per_channel(t: torch.Tensor, n: int) -> torch.Tensor:
    """A scalar or ``(n,)`` tensor as ``(n,)``."""
    return t.reshape(-1).expand(n) if t.numel() == 1 else t.reshape(n)


@torch.no_grad()
def _int32_bias_scale(name: str, layer: nn.Module, with_weight_scale: bool = False,
                      factor=None):
    """``s_a s_w / F`` (per output channel with per-channel weights or a code factor ``F``,
    see :func:`_code_factor`) for a layer whose bias is stored as int32 codes: one with a
    bias, a weight quantizer and a per-tensor activation quantizer; ``None`` for other
    layers (``with_weight_scale``: ``(s_b, s_w / F)``).

    An output channel whose weight codes are all zero (a dead channel; LSQ then drives its
    step towards 0) may have a bias that does not fit at ``s_a s_w``; any weight scale gives
    it the same (zero) weights, so its ``s_w`` is raised until ``|b| / (s_a s_w) = 2^30``.
    Raises when a channel with non-zero codes has a bias code beyond ``2^30``."""
    aq, wq = layer.a_quant, layer.w_quant
    if layer.bias is None or wq is None or aq is None or not aq.enabled or aq.per_channel:
        return None
    if not aq.is_initialized:
        raise ExportError(f'{name}: activation quantizer not initialised')
    dev = layer.bias.device
    s_w = wq.scale().detach().float().to(dev)
    if not wq.per_channel:
        s_w = s_w.reshape(())              # per tensor: a scalar bias scale
    if factor is not None:
        f = torch.as_tensor(factor, dtype=torch.float32, device=dev)
        n_out = layer.weight.shape[0]
        if f.numel() > 1 or s_w.dim():
            s_w = _per_channel(s_w, n_out) / _per_channel(f, n_out)
        else:
            s_w = s_w / f.reshape(())
    s_a = aq.scale().detach().float().reshape(()).to(dev)
    b = layer.bias.detach().float()
    over = (b / (s_a * s_w)).abs() > _INT32_BIAS_LIMIT
    if bool(over.any()):
        codes, _ = wq.quantize_to_codes(layer.weight.detach().float())
        zero = (codes.flatten(1) == 0).all(1) if s_w.dim() else (codes == 0).all().reshape(())
        if bool((over & ~zero).any()):
            bad = torch.nonzero((over & ~zero).reshape(-1)).flatten().tolist()[:8]
            raise ExportError(f'{name}: bias does not fit int32 at scale s_a s_w (output '
                              f'channel(s) {bad})')
        s_w = torch.where(over, b.abs() / (s_a * _INT32_BIAS_LIMIT), s_w)
    s_b = s_a * s_w
    return (s_b, s_w) if with_weight_scale else s_b


@torch.no_grad()
def _code_factor(layer: nn.Module, codes: torch.Tensor, a_max: int, u8: bool):
    """Per output channel the largest integer ``F`` such that the weight codes times ``F``
    still fit the int8 range (``|F c| <= 127``), u8 x s8 products cannot saturate
    (``2 F max|c| a_max <= 32767``, int8 storage) and the int32 bias code at scale
    ``s_a s_w / F`` stays below ``2^30``. Storing ``F c`` with weight scale ``s_w / F``
    gives the same products up to the factor ``F`` in the integer accumulator, but an
    ``F`` times finer int32 bias grid (``QLinearConv`` / ``QGemm`` take the bias at the
    accumulator's scale): the bias rounding error shrinks ``F``-fold (e.g. 15 for 4-bit
    weights against 4-bit activations). Dead channels (all codes 0) get 1."""
    m = codes.flatten(1).abs().amax(1).to(torch.int64)
    mm = m.clamp(min=1)
    f = 127 // mm
    if not u8:
        f = torch.minimum(f, _INT16_MAX // (2 * a_max * mm))
    if layer.bias is not None:
        s_w = _per_channel(layer.w_quant.scale().detach().float(), codes.shape[0])
        s_a = layer.a_quant.scale().detach().float().reshape(())
        b = layer.bias.detach().float().abs().clamp(min=1e-30)
        room = torch.floor(_INT32_BIAS_LIMIT * s_a * s_w / b).clamp(min=1, max=127)
        f = torch.minimum(f, room.to(torch.int64))
    f = torch.where(m == 0, torch.ones_like(f), f)
    return f.clamp(min=1)


def _factor_value(f) -> int | list[int]:
    f = [int(v) for v in torch.as_tensor(f).reshape(-1)]
    return f[0] if len(set(f)) == 1 else f


@torch.no_grad()
def snap_bias_to_int32(model: nn.Module, layers=None) -> int:
    """Put the bias of every layer exported with an int32 bias on its grid,
    ``round(b / s_b) * s_b`` with ``s_b = s_a s_w / F``, in place: the PyTorch model that the
    integer ONNX model computes. ``layers``: the layers to snap, a dict ``{name: code factor
    F}`` (the records' ``code_factor``, see :func:`read_quantizer_records`) or names
    (``F = 1``); default every layer that can have one, ``F = 1``. Returns the number of
    layers changed."""
    if layers is not None and not isinstance(layers, dict):
        layers = {name: 1 for name in layers}
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, (QConv2d, QLinear)) and (layers is None or name in layers):
            s_b = _int32_bias_scale(name, m, factor=None if layers is None else layers[name])
            if s_b is not None:
                m.bias.copy_(torch.round(m.bias.float() / s_b) * s_b)
                n += 1
    return n


def _max_stored_act(layer: nn.Module, form: str) -> int:
    aq = layer.a_quant
    if aq is None or not aq.enabled:
        return 255
    return _act_storage(aq, form)['stored_range'][1]


@contextlib.contextmanager
def quantized_export_mode(model: nn.Module, int32_bias: bool = False, form: str = 'qdq',
                          weight_dtype: str = 'int8'):
    """Inside the context every enabled quantizer of ``model`` (merged: ``QConv2d`` /
    ``QLinear`` weights and activation quantizers) computes through the exportable
    functions above in the graph form ``form`` (with ``int32_bias``, so do the biases of
    layers with weight and per-tensor activation quantizers); yields the list of quantizer
    records. ``model`` is restored after."""
    if form not in FORMS:
        raise ExportError(f'unknown form {form!r}; expected one of {FORMS}')
    if weight_dtype not in WEIGHT_DTYPES:
        raise ExportError(f'unknown weight_dtype {weight_dtype!r}; expected one of '
                          f'{WEIGHT_DTYPES}')
    recs, undo = [], []
    order: list[str] = []
    try:
        for name, layer, q, kind in _layer_quantizers(model):
            rec = _describe(name, q, kind, form)
            recs.append(rec)
            qn, qp = q.qrange
            s = q.scale().detach().float()
            axis = q.ch_axis if q.per_channel else -1
            if axis < 0:
                s = s.reshape(())
            if kind == 'weight':
                codes, _ = layer.w_quant.quantize_to_codes(layer.weight.detach().float())
                if codes.dtype != torch.int8:
                    raise ExportError(f'{name}: codes do not fit int8')
                lname = name.rsplit('.', 1)[0] if '.' in name else ''
                rec['layer'] = lname
                rec['op'] = 'Conv' if isinstance(layer, QConv2d) else 'Gemm'
                wmax = int(codes.abs().max()) if codes.numel() else 0
                u8 = weight_dtype == 'uint8' or (
                    weight_dtype == 'auto' and
                    2 * wmax * _max_stored_act(layer, form) > _INT16_MAX)
                rec.update(storage='uint8' if u8 else 'int8', zero_point=128 if u8 else 0)
                aq = layer.a_quant
                factor = None
                if form == 'fused' and aq is not None and aq.enabled and not aq.per_channel:
                    f = _code_factor(layer, codes, _max_stored_act(layer, form), u8)
                    if bool((f > 1).any()):
                        factor = f
                        codes = (codes.to(torch.int16) *
                                 f.reshape([-1] + [1] * (codes.dim() - 1))).to(torch.int8)
                        rec['code_factor'] = _factor_value(f)
                attr = _CODES_U8 if u8 else _CODES
                for a in (_CODES, _CODES_U8):
                    if hasattr(layer, a):
                        raise ExportError(f'{name}: the layer already has an attribute {a!r}')
                stored = (codes.to(torch.int16) + 128).to(torch.uint8) if u8 else codes
                # a (persistent) buffer: exported as the initializer '<layer>.weight_[u]int8'
                layer.register_buffer(attr, stored.to(layer.weight.device))
                scale = s.to(layer.weight.device)
                if factor is not None:        # weight scale s_w / F, per output channel
                    scale = _per_channel(scale, codes.shape[0]) / factor.to(scale)
                    axis = 0
                overflow = None
                try:
                    s_bw = _int32_bias_scale(name, layer, True, factor) if int32_bias \
                        else None
                except ExportError as e:      # a live channel whose bias code passes 2^30
                    if form != 'fused':
                        raise
                    s_bw, overflow = None, str(e)
                if s_bw is not None:          # dead channels: a scale their bias fits
                    scale = s_bw[1].reshape(scale.shape).to(scale)

                def qweight(layer=layer, scale=scale, axis=axis, attr=attr, zp=128 if u8 else 0):
                    return _WeightDQ.apply(getattr(layer, attr), scale, axis, zp)
                layer.quantized_weight = qweight
                undo.append(lambda layer=layer, attr=attr: (
                    layer.__dict__.pop('quantized_weight', None),
                    layer._buffers.pop(attr, None)))
                s_b = None if s_bw is None else s_bw[0]
                rec['bias'] = None if layer.bias is None else 'float32'
                if overflow:                  # kept float: added after ConvInteger, exact
                    rec['bias_note'] = overflow
                    warnings.warn(f'{overflow}: its bias stays float32 (the layer cannot be '
                                  'QLinearConv / QGemm)')
                if s_b is not None:
                    b = layer.bias.detach().float() / s_b
                    layer.register_buffer(_BIAS_CODES, torch.round(b).to(torch.int32))
                    rec['bias'] = 'int32'

                    def qbias(layer=layer, s_b=s_b):
                        return _BiasDQ.apply(getattr(layer, _BIAS_CODES), s_b,
                                             0 if s_b.dim() else -1)
                    layer.quantized_bias = qbias
                    undo.append(lambda layer=layer: (
                        layer.__dict__.pop('quantized_bias', None),
                        layer._buffers.pop(_BIAS_CODES, None)))
            else:
                float_clip = rec['clamp_op'] in ('Clip', 'Min/Max')
                code_clip = rec['clamp_op'] == 'Clip(codes)'
                code_lo, code_hi = rec['stored_range']
                int8_storage = rec['storage'] == 'int8'
                lo, hi = (-qn * s), (qp * s)

                def qact(x, s=s, lo=lo, hi=hi, qn=qn, qp=qp, axis=axis, zp=rec['zero_point'],
                         int8_storage=int8_storage, float_clip=float_clip,
                         code_clip=code_clip, code_lo=code_lo, code_hi=code_hi, name=name):
                    order.append(name)
                    dev = x.device
                    if axis >= 0:      # Min / Max bounds broadcast along the channel axis
                        ax = axis % x.dim()
                        shape = [-1] + [1] * (x.dim() - ax - 1)
                        lo, hi = lo.reshape(shape), hi.reshape(shape)
                        axis = ax
                    return _ActQDQ.apply(x, s.to(dev), lo.to(dev), hi.to(dev), qn, qp, axis,
                                         zp, int8_storage, float_clip, code_clip, code_lo,
                                         code_hi)
                q.forward = qact
                undo.append(lambda q=q: q.__dict__.pop('forward', None))
        model.__dict__['_onnx_act_order'] = order
        yield recs
    finally:
        for u in reversed(undo):
            u()
        model.__dict__.pop('_onnx_act_order', None)


class _TensorMode(nn.Module):
    """Calls an OpenMMLab ``BaseModel`` with ``mode='tensor'`` (plain modules as they are)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, mode='tensor')


def _prepare(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode, rep blocks merged, plain quantized weights on the grid."""
    from .convert import find_rep_blocks, merge_model
    model = copy.deepcopy(model).eval()
    if any(isinstance(m, RepBlock) for m in model.modules()) or find_rep_blocks(model):
        model = merge_model(model, inplace=True).eval()
    snap_to_grid(model)
    clear_weight_caches(model)                # copied with the model: stale after the merge
    return model


def _wrap(model: nn.Module) -> nn.Module:
    """An mmengine ``BaseModel`` is exported through ``mode='tensor'`` (without importing
    mmengine: a model can only be a ``BaseModel`` when mmengine is already imported)."""
    mm_model = sys.modules.get('mmengine.model')
    if mm_model is not None and isinstance(model, mm_model.BaseModel):
        return _TensorMode(model)
    return model


def _export(module, args, f, opset, dynamic_batch, input_names, output_names):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        kw = {}
        if dynamic_batch:
            kw['dynamic_axes'] = {n: {0: 'batch'} for n in input_names + output_names}
        torch.onnx.export(module, args, f, dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=output_names,
                          do_constant_folding=True, **kw)


def _output_names(module, args) -> list[str]:
    with torch.no_grad():
        out = module(*args)
    n = len(flatten_tensors(out))
    return ['output'] if n == 1 else [f'output_{i}' for i in range(n)]



# --------------------------------------------------------------------------------------
# graph passes
# --------------------------------------------------------------------------------------
class _Graph:
    """Producer / consumer / constant lookups over an ONNX graph."""

    def __init__(self, proto):
        from onnx import numpy_helper
        g = proto.graph
        self.g = g
        self.prod = {o: n for n in g.node for o in n.output}
        self.cons = collections.defaultdict(list)
        for n in g.node:
            for i in n.input:
                if i:
                    self.cons[i].append(n)
        self.outputs = {o.name for o in g.output}
        self.inits = {i.name: i for i in g.initializer}
        self.const = {}
        for n in g.node:
            if n.op_type == 'Constant' and n.attribute and n.attribute[0].name == 'value':
                self.const[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        for name, init in self.inits.items():
            self.const[name] = numpy_helper.to_array(init)
        # the exporter replaces a bitwise duplicate initializer by Identity(first copy)
        for n in g.node:
            if n.op_type == 'Identity' and n.input[0] in self.const:
                self.const[n.output[0]] = self.const[n.input[0]]

    def only_consumer(self, name: str):
        users = self.cons.get(name, [])
        if name in self.outputs or len(users) != 1:
            return None
        return users[0]


def _codes_name(prefix: str, layer: str, storage: str) -> str:
    """The initializer name of a layer's weight codes in the exported graph."""
    attr = _CODES_U8 if storage == 'uint8' else _CODES
    return f'{prefix}{layer}.{attr}' if layer else f'{prefix}{attr}'


def _fuses_into_qlinear(G: _Graph, conv) -> bool:
    """Whether onnxruntime can turn ``DQ -> conv -> [Relu ->] Q`` into ``QLinearConv``:
    the conv's only consumer is a per-tensor QuantizeLinear, or one Relu whose only
    consumer is a per-tensor QuantizeLinear with zero point 0 (the type's minimum: the Relu
    is then redundant)."""
    def per_tensor(q) -> bool:          # QLinearConv has one output scale
        s = G.const.get(q.input[1])
        return s is not None and s.size == 1
    u = G.only_consumer(conv.output[0])
    if u is None:
        return False
    if u.op_type == 'QuantizeLinear':
        return per_tensor(u)
    if u.op_type != 'Relu':
        return False
    q = G.only_consumer(u.output[0])
    if q is None or q.op_type != 'QuantizeLinear' or len(q.input) < 3 or not per_tensor(q):
        return False
    zp = G.const.get(q.input[2])
    return zp is not None and str(zp.dtype) == 'uint8' and int(zp.max()) == 0


def _fold_batchnorm(proto, recs: list[dict], prefix: str = '',
                    float_bias: dict | None = None) -> int:
    """Form ``'fused'``: fold an inference ``BatchNormalization`` that follows a quantized
    conv (a plain ``ConvModule`` conv -> BN, e.g. a detector head) into the conv, leaving
    the integer weight codes unchanged: with ``k = gamma / sqrt(var + eps)`` per output
    channel, the weight scale becomes ``s_w |k|`` (per output channel; the codes of a channel
    with ``k < 0`` are negated, which is exact unless a code is the lowest one, -128) and the
    bias ``(b - mean) k + beta``, stored as int32 codes at ``s_a s_w |k|``. The conv can
    then become ``QLinearConv``. ``float_bias``: ``{layer: float bias}`` of the PyTorch
    layers (updated with the folded bias, for a ``ConvInteger`` that adds it in float).
    Sets ``rec['folded_bn']``; returns the number folded."""
    float_bias = {} if float_bias is None else float_bias
    import numpy as np
    from onnx import helper, numpy_helper
    G = _Graph(proto)
    by_codes = {_codes_name(prefix, r['layer'], r['storage']): r
                for r in recs if r['kind'] == 'weight'}
    new_inits, drop, n_folded = [], set(), 0
    for node in G.g.node:
        if node.op_type != 'Conv' or len(node.input) < 2:
            continue
        dw = G.prod.get(node.input[1])
        rec = by_codes.get(dw.input[0]) if dw is not None and \
            dw.op_type == 'DequantizeLinear' else None
        bn = G.only_consumer(node.output[0])
        if rec is None or bn is None or bn.op_type != 'BatchNormalization' or \
                len(bn.output) != 1 or any(a.name == 'training_mode' and a.i
                                           for a in bn.attribute):
            continue
        dx = G.prod.get(node.input[0])
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        db = G.prod.get(bias) if bias else None
        consts = [G.const.get(v) for v in bn.input[1:5]]
        if dx is None or dx.op_type != 'DequantizeLinear' or \
                G.const.get(dx.input[1]) is None or G.const[dx.input[1]].size != 1 or \
                any(c is None for c in consts) or \
                (bias and (db is None or db.op_type != 'DequantizeLinear')):
            continue
        eps = next((a.f for a in bn.attribute if a.name == 'epsilon'), 1e-5)
        gamma, beta, mean, var = (c.astype(np.float64) for c in consts)
        k = gamma / np.sqrt(var + eps)
        codes = G.const[dw.input[0]]
        zp = G.const[dw.input[2]]
        zp0 = int(zp.flat[0]) if zp.size else 0
        c_out = codes.shape[0]
        signed = codes.astype(np.int64) - zp0          # the LSQ codes
        neg = k < 0
        if neg.any() and (signed[neg] == -128).any():
            continue                         # -(-128) does not fit: leave the BN as it is
        signed[neg] = -signed[neg]
        s_w = np.broadcast_to(G.const[dw.input[1]].astype(np.float64).reshape(-1),
                              (c_out,))
        s_w_new = (s_w * np.abs(k)).astype(np.float32)
        s_x = float(G.const[dx.input[1]].reshape(()))
        b = float_bias.get(rec['layer'])
        b = np.zeros(c_out) if b is None else b.astype(np.float64)
        b_new = (b - mean) * k + beta
        over = np.abs(b_new / (np.float64(np.float32(s_x)) * s_w_new)) > _INT32_BIAS_LIMIT
        dead = (signed.reshape(c_out, -1) == 0).all(1)
        if (over & ~dead).any():
            continue                         # the bias does not fit int32: keep the BN
        s_w_new = np.where(over, np.abs(b_new) / (np.float32(s_x) * _INT32_BIAS_LIMIT),
                           s_w_new).astype(np.float32)     # dead channels: any scale
        s_b = (np.float32(s_x) * s_w_new).astype(np.float32)
        b_codes = np.round(b_new / s_b.astype(np.float64))
        layer = rec['layer']
        names = dict(w=_codes_name(prefix, f'{layer}.bn_folded' if layer else 'bn_folded',
                                   rec['storage']), ws=f'{prefix}{layer}.weight_scale_bn',
                     wz=f'{prefix}{layer}.weight_zero_point_bn', b=f'{prefix}{layer}.bias_int32',
                     bs=f'{prefix}{layer}.bias_scale_bn', bz=f'{prefix}{layer}.bias_zero_point_bn')
        if names['b'] in G.const:        # an int32 bias of the layer itself: a new name
            names['b'] = f'{prefix}{layer}.bias_int32_bn'
        new_inits += [
            numpy_helper.from_array((signed + zp0).astype(codes.dtype), names['w']),
            numpy_helper.from_array(s_w_new, names['ws']),
            numpy_helper.from_array(np.full(c_out, zp0, zp.dtype), names['wz']),
            numpy_helper.from_array(b_codes.astype(np.int32), names['b']),
            numpy_helper.from_array(s_b, names['bs']),
            numpy_helper.from_array(np.zeros(c_out, np.int32), names['bz'])]
        dw_new = f'{dw.output[0]}_bn'
        db_new = f'{node.output[0]}_bias_bn'
        new_dq = [helper.make_node('DequantizeLinear', [names['w'], names['ws'], names['wz']],
                                   [dw_new], name=f'{dw.name}_bn', axis=0),
                  helper.make_node('DequantizeLinear', [names['b'], names['bs'], names['bz']],
                                   [db_new], name=f'{node.name}/BiasDQ_bn', axis=0)]
        G.g.node.extend(new_dq)
        while len(node.input) < 3:
            node.input.append('')
        node.input[1], node.input[2] = dw_new, db_new
        node.output[0] = bn.output[0]
        drop.add(id(bn))
        for d in (dw, db):
            if d is not None and len(G.cons[d.output[0]]) == 1:
                drop.add(id(d))
        # the layer's weight codes now live in the folded initializer
        rec['folded_bn'] = bn.name or True
        rec['codes_initializer'] = names['w']
        rec['bias'] = 'int32 (BatchNormalization folded)'
        float_bias[rec['layer']] = b_new.astype(np.float32)
        n_folded += 1
    keep = [n for n in G.g.node if id(n) not in drop]
    del G.g.node[:]
    G.g.node.extend(keep)
    G.g.initializer.extend(new_inits)
    _topo_sort(proto)
    _drop_unused(proto)
    return n_folded


def _topo_sort(proto) -> None:
    """Put the graph's nodes in a topological order (new nodes were appended)."""
    g = proto.graph
    avail = {i.name for i in g.input} | {i.name for i in g.initializer} | {''}
    pending, done = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                done.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ExportError('the rewritten graph has a cycle or a missing input')
        pending = rest
    del g.node[:]
    g.node.extend(done)


def _integer_rewrite(proto, recs: list[dict], prefix: str = '',
                     float_bias: dict | None = None, u8_conv_integer: bool = True) -> None:
    """Form ``'fused'``: every quantized conv that onnxruntime cannot fuse into
    ``QLinearConv`` becomes ``ConvInteger -> Cast -> Mul(s_a s_w) -> Add(float bias)`` (the
    bias from ``float_bias``, ``{layer: float32 bias}``: exact, no int32 rounding); with
    ``u8_conv_integer`` its weight codes are stored as uint8 + 128 (onnxruntime's
    ``ConvInteger`` is about 2.5x slower with int8 weights, measured on AVX2);
    sets each weight record's ``kernel`` (the integer kernel expected after onnxruntime's
    optimisation: ``QLinearConv`` / ``ConvInteger`` / ``QGemm``, or ``None`` for a layer
    that stays float, e.g. with a per-channel activation quantizer)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    float_bias = {} if float_bias is None else float_bias
    G = _Graph(proto)
    by_codes = {r.get('codes_initializer') or _codes_name(prefix, r['layer'], r['storage']): r
                for r in recs if r['kind'] == 'weight'}
    new_nodes, new_inits, dropped = [], [], set()
    for node in G.g.node:
        rec = None
        if node.op_type in ('Conv', 'Gemm') and len(node.input) >= 2:
            dw = G.prod.get(node.input[1])
            if dw is not None and dw.op_type == 'DequantizeLinear':
                rec = by_codes.get(dw.input[0])
        if rec is None:
            new_nodes.append(node)
            continue
        dx = G.prod.get(node.input[0])
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        db = G.prod.get(bias) if bias else None
        x_ok = dx is not None and dx.op_type == 'DequantizeLinear' and \
            G.const.get(dx.input[1]) is not None and G.const[dx.input[1]].ndim == 0
        int_bias = bias is None or (db is not None and db.op_type == 'DequantizeLinear')
        float_b = not int_bias and rec['layer'] in float_bias
        if not x_ok or not (int_bias or float_b):
            rec['kernel'] = None       # float: no per-tensor integer input / no int32 bias
            new_nodes.append(node)
            continue
        if node.op_type == 'Gemm':
            # QGemm (float output) without C, then the float32 bias: exact (an int32 C
            # would round it to the s_a s_w grid)
            rec['kernel'] = 'QGemm'
            new_nodes.append(node)
            if bias:
                b = float_bias.get(rec['layer'])
                if b is None:
                    raise ExportError(f'{rec["layer"]}: no float bias for the Gemm')
                y = node.output[0]
                node.output[0] = f'{y}_nobias'
                del node.input[2:]
                bname = f'{prefix}{rec["layer"]}.bias_float'
                new_inits.append(numpy_helper.from_array(b.astype(np.float32), bname))
                new_nodes.append(helper.make_node('Add', [f'{y}_nobias', bname], [y],
                                                  name=f'{node.name or rec["layer"]}/AddBias'))
                rec['bias'] = 'float32'
                if db is not None and len(G.cons[db.output[0]]) == 1 and \
                        db.output[0] not in G.outputs:
                    dropped.add(id(db))
            continue
        if int_bias and _fuses_into_qlinear(G, node):
            rec['kernel'] = 'QLinearConv'
            new_nodes.append(node)
            continue
        # ConvInteger(x codes, w codes, x zp, w zp) -> Cast -> Mul(scale) -> Add(float bias)
        base = node.name or rec['layer']
        w_codes = G.const[dw.input[0]]
        w_zp = G.const[dw.input[2]]
        if w_zp.size and (w_zp != w_zp.flat[0]).any():
            raise ExportError(f'{rec["layer"]}: weight zero points differ between channels')
        zp_w = np.array(w_zp.flat[0] if w_zp.size else 0, w_zp.dtype)
        w_name = dw.input[0]
        if u8_conv_integer and w_codes.dtype == np.int8:
            w_codes = (w_codes.astype(np.int16) + 128).astype(np.uint8)
            zp_w = np.array(128, np.uint8)
            w_name = _codes_name(prefix, rec['layer'] + ('.bn_folded' if rec.get('folded_bn')
                                                         else ''), 'uint8')
            new_inits.append(numpy_helper.from_array(w_codes, w_name))
            rec.update(storage='uint8', zero_point=128, codes_initializer=w_name)
        c_out = w_codes.shape[0]
        spatial = (1,) * (w_codes.ndim - 2)
        wzp_name = f'{prefix}{rec["layer"]}.weight_zero_point'
        new_inits.append(numpy_helper.from_array(zp_w, wzp_name))
        y = node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        acc = f'{y}_int32'
        new_nodes.append(helper.make_node('ConvInteger', [dx.input[0], w_name,
                                                          dx.input[2], wzp_name], [acc],
                                          name=f'{base}/ConvInteger', **attrs))
        s_y = (G.const[dx.input[1]].astype(np.float32) *
               G.const[dw.input[1]].astype(np.float32)).astype(np.float32)
        sname = f'{prefix}{rec["layer"]}.output_scale'
        new_inits.append(numpy_helper.from_array(
            s_y.reshape((1, c_out) + spatial) if s_y.size > 1 else s_y.reshape(()), sname))
        new_nodes.append(helper.make_node('Cast', [acc], [f'{y}_float'], to=TensorProto.FLOAT,
                                          name=f'{base}/Cast'))
        b = float_bias.get(rec['layer']) if bias else None
        if bias and b is None:
            raise ExportError(f'{rec["layer"]}: no float bias for the ConvInteger form')
        new_nodes.append(helper.make_node('Mul', [f'{y}_float', sname],
                                          [y if b is None else f'{y}_scaled'],
                                          name=f'{base}/Scale'))
        if b is not None:
            bname = f'{prefix}{rec["layer"]}.bias_float'
            new_inits.append(numpy_helper.from_array(
                b.astype(np.float32).reshape((1, c_out) + spatial), bname))
            new_nodes.append(helper.make_node('Add', [f'{y}_scaled', bname], [y],
                                              name=f'{base}/AddBias'))
            rec['bias'] = 'float32 (BatchNormalization folded)' if rec.get('folded_bn') \
                else 'float32'
        rec['kernel'] = 'ConvInteger'
        dropped.add(id(node))
        for d in (dx, dw, db):                 # DQ nodes nobody else reads
            if d is not None and all(id(u) in dropped for u in G.cons[d.output[0]]) and \
                    d.output[0] not in G.outputs:
                dropped.add(id(d))
    keep = [n for n in new_nodes if id(n) not in dropped]
    del G.g.node[:]
    G.g.node.extend(keep)
    G.g.initializer.extend(new_inits)
    _drop_unused(proto)


def _drop_unused(proto) -> None:
    """Remove Constant / Identity nodes and initializers that no node or graph output
    reads."""
    g = proto.graph
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type in ('Constant', 'Identity') and
                n.output[0] not in used]
        if not dead:
            break
        ids = {id(n) for n in dead}
        keep = [n for n in g.node if id(n) not in ids]
        del g.node[:]
        g.node.extend(keep)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep_init = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_init)


def _name_qdq_nodes(proto, act_order: list[str]) -> None:
    """Name the activation QuantizeLinear nodes after their quantizer (trace order), the
    integer Clip behind each (``'fused'`` form) ``<quantizer>/CodeClip#i``, for readable
    graphs and :func:`compare_onnx`."""
    qnodes = [n for n in proto.graph.node if n.op_type == 'QuantizeLinear']
    if len(qnodes) != len(act_order):
        raise ExportError(f'{len(act_order)} activation quantizers traced but '
                          f'{len(qnodes)} QuantizeLinear nodes in the graph')
    G = _Graph(proto)
    for i, (n, name) in enumerate(zip(qnodes, act_order)):
        n.name = f'{name}/QuantizeLinear#{i}'
        u = G.only_consumer(n.output[0])
        if u is not None and u.op_type == 'Clip' and len(u.input) == 3 and \
                all(G.const.get(v) is not None and G.const[v].dtype == G.const[n.input[2]].dtype
                    for v in u.input[1:]):
            u.name = f'{name}/CodeClip#{i}'


def _code_tensors(proto) -> list[tuple[str, str, object, int | None]]:
    """``(quantizer name, tensor holding its stored codes, zero point array, axis)`` for
    every named activation QuantizeLinear (the integer Clip's output when there is one)."""
    G = _Graph(proto)
    clips = {n.name: n for n in G.g.node if '/CodeClip#' in n.name}
    out = []
    for n in G.g.node:
        if n.op_type != 'QuantizeLinear' or '/QuantizeLinear#' not in n.name:
            continue
        name, idx = n.name.split('/QuantizeLinear#')
        clip = clips.get(f'{name}/CodeClip#{idx}')
        zp = G.const.get(n.input[2]) if len(n.input) > 2 else None
        axis = next((a.i for a in n.attribute if a.name == 'axis'), None)
        out.append((name, clip.output[0] if clip is not None else n.output[0], zp,
                    axis if zp is not None and zp.ndim == 1 else None))
    return out


def _atomic_save(model_proto, path: str) -> None:
    import onnx
    with atomic_path(path) as tmp:
        onnx.save(model_proto, tmp)


_FORM_TEXT = {
    'fused': 'fused: activations uint8 QuantizeLinear (zero point 0 unsigned, 128 signed) -> '
             'Clip on the uint8 codes for sub-8-bit / symmetric ranges -> DequantizeLinear; '
             'weights int8 (zp 0) or uint8 (zp 128) codes + DequantizeLinear; int32 biases at '
             's_a*s_w; convs that cannot become QLinearConv as ConvInteger -> Add(bias) -> '
             'Cast -> Mul(s_a*s_w)',
    'qdq': 'qdq: activations [Clip ->] QuantizeLinear -> DequantizeLinear (uint8 unsigned, '
           'int8 signed, zero point 0); weights int8 codes + DequantizeLinear',
}


@torch.no_grad()
def export_onnx(model: nn.Module, example_input, path: str, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, input_names: Iterable[str] = ('input',),
                metadata: dict | None = None, int32_bias: bool | None = None,
                form: str = 'fused', weight_dtype: str = 'auto') -> dict:
    """Export a quantized model as an integer ONNX model (QDQ format) to ``path``.

    Args:
        model: any module holding ``QConv2d`` / ``QLinear`` with initialised LSQ quantizers
            (rep blocks are merged on a copy; ``model`` is not changed). An OpenMMLab
            ``BaseModel`` is called with ``mode='tensor'``.
        example_input: a tensor or a tuple of tensors.
        path: output file (written atomically).
        opset: ONNX opset (>= 13 for per-channel ``DequantizeLinear``).
        dynamic_batch: make dimension 0 of inputs and outputs dynamic.
        metadata: extra ``metadata_props`` (string values).
        int32_bias: store the biases of quantized layers as int32 codes at scale
            ``s_a s_w`` (see the module docstring); default: yes for ``form='fused'`` (which
            requires them), no for ``'qdq'``.
        form: ``'fused'`` (onnxruntime integer kernels) or ``'qdq'`` (plain Q -> DQ pairs).
        weight_dtype: ``'auto'``, ``'int8'`` or ``'uint8'`` (zero point 128) weight codes
            (``'fused'``; ``'qdq'`` always stores int8).

    Returns:
        ``dict(path, quantizers=[records], layers=[dict(name, op, kernel, weights, bias)],
        form, int8, uint8, int32, float (initializer counts and *_bytes), weight_codes,
        weight_codes_bytes, size, input_names, output_names)``.

    Raises:
        ExportError: an uninitialised quantizer, a weight quantizer outside a quantized
            layer, an unknown form, or a graph whose quantized weights did not come out as
            integer initializers.
    """
    import onnx
    if opset < 13:
        raise ExportError(f'opset {opset} < 13: per-channel DequantizeLinear needs opset 13')
    if form not in FORMS:
        raise ExportError(f'unknown form {form!r}; expected one of {FORMS}')
    if int32_bias is None:
        int32_bias = form == 'fused'
    if form == 'fused' and not int32_bias:
        raise ExportError("form='fused' stores biases as int32 codes (the bias of "
                          "QLinearConv / QGemm); use form='qdq' for float32 biases")
    if form == 'qdq' and weight_dtype == 'uint8':
        raise ExportError("form='qdq' stores int8 weight codes (weight_dtype='uint8' needs "
                          "form='fused')")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    prepared = _prepare(model)
    module = _wrap(prepared)
    input_names = list(input_names)
    with quantized_export_mode(prepared, int32_bias, form,
                               weight_dtype if form == 'fused' else 'int8') as recs:
        order = prepared.__dict__['_onnx_act_order']
        output_names = _output_names(module, args)
        order.clear()
        buf = io.BytesIO()
        _export(module, args, buf, opset, dynamic_batch, input_names, output_names)
        act_order = list(order)
    proto = onnx.load_from_string(buf.getvalue())
    _name_qdq_nodes(proto, act_order)
    w_recs = [r for r in recs if r['kind'] == 'weight']
    if form == 'fused':
        prefix = 'model.' if module is not prepared else ''
        float_bias = {name: m.bias.detach().float().cpu().numpy()
                      for name, m in prepared.named_modules()
                      if isinstance(m, (QConv2d, QLinear)) and m.bias is not None}
        _fold_batchnorm(proto, recs, prefix, float_bias)
        _integer_rewrite(proto, recs, prefix, float_bias, weight_dtype == 'auto')
        floats = [r['layer'] for r in w_recs if r.get('kernel') is None]
        if floats:
            warnings.warn(f'{len(floats)} quantized layer(s) stay float in the exported graph '
                          f'(no per-tensor integer input): {", ".join(floats[:8])}')
    stats = _initializer_stats(proto)
    G = _Graph(proto)
    prefix = 'model.' if module is not prepared else ''
    missing = [r['layer'] for r in w_recs
               if (r.get('codes_initializer') or _codes_name(prefix, r['layer'], r['storage']))
               not in G.const]
    if missing:
        raise ExportError(f'the weight codes of {len(missing)} quantized layer(s) are not '
                          f'integer constants of the exported graph: {", ".join(missing[:8])}')
    n_b = sum(r.get('bias') == 'int32' for r in recs)
    if n_b and not stats['int32']:        # (identical bias codes share one initializer)
        raise ExportError(f'{n_b} int32 biases but no int32 initializer in the exported '
                          'graph')
    meta = {META_KEY: json.dumps(recs),
            'repq_mm.form': _FORM_TEXT[form],
            'repq_mm.bias': 'int32 codes at scale s_a*s_w + DequantizeLinear' if int32_bias
                            else 'float32',
            **{k: str(v) for k, v in (metadata or {}).items()}}
    try:
        from . import __version__
        meta['repq_mm.version'] = __version__
    except ImportError:  # pragma: no cover
        pass
    for k, v in meta.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(proto)
    _atomic_save(proto, path)
    layers = [dict(name=r['layer'], op=r['op'], kernel=r.get('kernel'), weights=r['storage'],
                   bias=r['bias'], folded_bn=r.get('folded_bn')) for r in w_recs]
    return dict(path=osp.abspath(path), quantizers=recs, layers=layers, form=form,
                size=osp.getsize(path), input_names=input_names, output_names=output_names,
                **stats)


@torch.no_grad()
def export_fp32_onnx(model: nn.Module, example_input, path: str, opset: int = DEFAULT_OPSET,
                     dynamic_batch: bool = True, input_names=('input',)) -> dict:
    """The same (merged) model with every quantizer disabled, as a plain float32 ONNX
    model: the size / speed reference for :func:`export_onnx`."""
    import onnx
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    prepared = _prepare(model)
    for m in prepared.modules():
        if isinstance(m, LSQQuantizer):
            m.enabled = False
    module = _wrap(prepared)
    input_names = list(input_names)
    output_names = _output_names(module, args)
    buf = io.BytesIO()
    _export(module, args, buf, opset, dynamic_batch, input_names, output_names)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    _atomic_save(proto, path)
    return dict(path=osp.abspath(path), size=osp.getsize(path), input_names=input_names,
                output_names=output_names, **_initializer_stats(proto))


def _initializer_stats(proto) -> dict:
    import onnx
    TP = onnx.TensorProto
    out = dict(int8=0, uint8=0, float=0, int32=0, int8_bytes=0, uint8_bytes=0,
               float_bytes=0, int32_bytes=0, weight_codes=0, weight_codes_bytes=0)
    for init in proto.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        if init.name in (_CODES, _CODES_U8) or init.name.endswith(('.' + _CODES,
                                                                    '.' + _CODES_U8)):
            out['weight_codes'] += 1
            out['weight_codes_bytes'] += n
        if init.data_type == TP.INT8:
            out['int8'] += 1
            out['int8_bytes'] += n
        elif init.data_type == TP.UINT8:
            out['uint8'] += 1
            out['uint8_bytes'] += n
        elif init.data_type == TP.INT32:
            out['int32'] += 1
            out['int32_bytes'] += 4 * n
        elif init.data_type == TP.FLOAT:
            out['float'] += 1
            out['float_bytes'] += 4 * n
    return out


def read_quantizer_records(path_or_proto) -> list[dict]:
    """The quantizer records stored in an exported file's metadata (``[]`` if none)."""
    import onnx
    proto = onnx.load(path_or_proto) if isinstance(path_or_proto, str) else path_or_proto
    meta = {p.key: p.value for p in proto.metadata_props}
    return json.loads(meta[META_KEY]) if META_KEY in meta else []


# --------------------------------------------------------------------------------------
# running and checking
# --------------------------------------------------------------------------------------
def ort_session(path_or_proto, optimize: bool = True, threads: int = 1,
                optimized_model_path: str | None = None, precise_u8s8: bool = False):
    """An onnxruntime CPU ``InferenceSession``: ``optimize`` -> ``ORT_ENABLE_ALL`` (the
    integer kernels), else ``ORT_DISABLE_ALL`` (the graph as written); ``threads`` intra-op
    threads (inter-op 1); ``optimized_model_path``: where onnxruntime writes its optimised
    graph; ``precise_u8s8``: ``session.x64quantprecision=1`` (u8u8 instead of saturating
    u8s8 products on x86 without VNNI)."""
    import onnx
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_model_path:
        opts.optimized_model_filepath = optimized_model_path
    if precise_u8s8:
        opts.add_session_config_entry('session.x64quantprecision', '1')
    if not isinstance(path_or_proto, (str, onnx.ModelProto)):
        raise TypeError('ort_session takes a path or an onnx.ModelProto')
    data = path_or_proto if isinstance(path_or_proto, str) else \
        path_or_proto.SerializeToString()
    return ort.InferenceSession(data, opts, providers=['CPUExecutionProvider'])


def count_kernels(path_or_proto, threads: int = 1, precise_u8s8: bool = False) -> dict:
    """The node types of onnxruntime's optimised graph (``ORT_ENABLE_ALL``, CPU) of a
    model: ``dict(ops=Counter, integer=number of integer conv / linear kernels,
    float=number of float conv / linear kernels)``."""
    import onnx
    with tempfile.TemporaryDirectory() as d:
        opt = osp.join(d, 'optimized.onnx')
        ort_session(path_or_proto, True, threads, opt, precise_u8s8)
        ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    return dict(ops=dict(ops), integer=sum(ops[k] for k in INTEGER_KERNELS),
                float=sum(ops[k] for k in FLOAT_KERNELS))


def _session(path_or_proto, extra_outputs: list[str] = (), optimize: bool = False,
             threads: int = 1):
    import onnx
    proto = onnx.load(path_or_proto) if isinstance(path_or_proto, str) else path_or_proto
    if extra_outputs:
        proto = copy.deepcopy(proto)
        have = {o.name for o in proto.graph.output}
        for name in extra_outputs:
            if name not in have:
                proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return proto, ort_session(proto, optimize, threads)


def run_onnx(path: str, *inputs, optimize: bool = False, threads: int = 1) -> list:
    """Run an ONNX file with onnxruntime (CPU; by default the graph as written, one
    thread; ``optimize``: onnxruntime's fused integer kernels); returns the outputs."""
    _, sess = _session(path, optimize=optimize, threads=threads)
    feeds = {i.name: t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t
             for i, t in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feeds)


def _int32_layers(recs: list[dict]) -> dict:
    """``{layer: code factor}`` of the layers a file stores int32 biases for."""
    return {r.get('layer', r['name'].rsplit('.', 1)[0]): r.get('code_factor', 1) for r in recs
            if r['kind'] == 'weight' and r.get('bias') == 'int32'}


@torch.no_grad()
def compare_onnx(model: nn.Module, path: str, inputs: torch.Tensor,
                 int32_bias: bool | None = None, optimized: bool = False,
                 threads: int = 1) -> dict:
    """Compare the exported integer model with the PyTorch fake-quant merged model.

    Runs ``inputs`` (a batch) through onnxruntime (the codes of every activation quantizer
    as extra outputs: the QuantizeLinear's, or the integer Clip's behind it, minus the zero
    point) and through PyTorch twice. The PyTorch model's biases are first put on the int32
    grid (:func:`snap_bias_to_int32`) for the layers the file stores int32 biases for (read
    from its metadata; ``int32_bias=True`` / ``False``: every layer that can have one /
    none): the model the file computes; ``bias_effect`` is the max |output change| that
    made (``None`` when nothing was snapped).

    * **layer by layer** (the check): every activation quantizer in PyTorch gets, as its
      output, the codes onnxruntime produced there (teacher forcing), so each layer sees the
      same integer input in both engines. ``act_codes``: per quantizer, the max |code
      difference| and share of differing codes between PyTorch's own rounding and
      onnxruntime's (float summation order can flip a code at a rounding boundary: at most
      1 for a correct export). ``diffs``: per model output, max |ONNX - PyTorch|;
      ``tolerances``: one quantization step of the input of the quantized layer that
      produces it, ``|c| * s_a * max_o sum_i |W_oi|`` for the layer whose output the model
      output is (a multiple ``c`` of, e.g. a detector's box distances times the stride),
      else the largest such bound of all layers; ``one_step``: the largest tolerance;
      ``within_one_step``: every output within its tolerance; ``max_abs``: max of ``diffs``;
    * **end to end** (reported): ``free``: the same numbers with each engine running on its
      own codes. In a deep network, the single-code flips of the first layers propagate, so
      these can be several steps without any export error.

    The graph runs as written (``ORT_DISABLE_ALL``). With ``optimized``, the same
    layer-by-layer check is repeated on onnxruntime's optimised graph (``ORT_ENABLE_ALL``:
    ``QLinearConv`` / ``ConvInteger`` / ``QGemm``, with ``threads`` threads), reported under
    ``deployed`` with the node counts of that graph (``kernels``; reading the codes back
    adds graph outputs, which can keep a few nodes from fusing, so the counts are those of
    the graph that was checked) and its end-to-end outputs against the unoptimised ones
    (``vs_graph``).

    ``argmax_agree``: share of samples with the same top-1 (2-D outputs, end to end).
    """
    import numpy as np
    import onnx
    prepared = _prepare(model)
    module = _wrap(prepared)
    proto = onnx.load(path)
    recs = read_quantizer_records(proto)
    if int32_bias is None:
        snap = _int32_layers(recs)
    elif int32_bias:
        snap = None
    else:
        snap = []
    bias_effect = None
    if snap is None or snap:
        before = [t.detach().float() for t in flatten_tensors(module(inputs))]
        snap_bias_to_int32(prepared, snap)
        after = [t.detach().float() for t in flatten_tensors(module(inputs))]
        bias_effect = max((float((a - b).abs().max()) for a, b in zip(after, before)
                           if a.numel()), default=0.0)
    codes = _code_tensors(proto)
    feeds = {proto.graph.input[0].name: inputs.cpu().numpy()}

    def run_ort(optimize: bool):
        _, sess = _session(proto, [t for _, t, _, _ in codes], optimize, threads)
        outs = sess.run(None, feeds)
        n_out = len(outs) - len(codes)
        got, ort_codes = outs[:n_out], {}
        for (name, _, zp, axis), c in zip(codes, outs[n_out:]):
            c = c.astype(np.int64)
            if zp is not None:
                zz = zp.astype(np.int64)
                c = c - (zz.reshape([-1] + [1] * (c.ndim - 1 - axis)) if axis is not None
                         else zz)
            ort_codes.setdefault(name, []).append(c)
        return got, ort_codes

    got, ort_codes = run_ort(False)
    acts = [(n, q) for n, _, q, k in _layer_quantizers(prepared) if k == 'act']

    def run_torch(force: bool, ort_codes, got):
        seen: dict[str, list] = {n: [] for n, _ in acts}
        stats: dict[str, dict] = {}
        layer_outs = []              # (one-step bound, output) of every quantized layer
        handles = []
        for n, q in acts:
            def hook(mod, args, out, n=n):
                s = mod.scale().detach()
                if mod.per_channel:
                    s = _bshape(s, mod.ch_axis % out.dim(), out.dim())
                mine = torch.round(out / s).to(torch.int64)
                k = len(seen[n])
                seen[n].append(mine)
                theirs = ort_codes.get(n, [])
                if len(theirs) != 1 or k > 0 or tuple(theirs[0].shape) != tuple(out.shape):
                    return None               # shared quantizer: no unique ORT node
                t = torch.from_numpy(theirs[0]).to(out.device)
                d = (t - mine).abs()
                stats[n] = dict(max_diff=int(d.max()) if d.numel() else 0,
                                frac_diff=float((d > 0).float().mean()) if d.numel() else 0.0)
                return (t.to(out.dtype) * s) if force else None
            handles.append(q.register_forward_hook(hook))
        for m in prepared.modules():
            if isinstance(m, (QConv2d, QLinear)) and m.a_quant is not None \
                    and m.a_quant.enabled:
                def keep(mod, args, out):
                    layer_outs.append((_layer_one_step(mod), out.detach().float().cpu()))
                handles.append(m.register_forward_hook(keep))
        try:
            ref = [t.detach().float().cpu() for t in flatten_tensors(module(inputs))]
        finally:
            for h in handles:
                h.remove()
        diffs = [float(np.abs(a.numpy() - b).max()) if a.numel() else 0.0
                 for a, b in zip(ref, got)]
        return ref, diffs, stats, layer_outs

    ref_free, diffs_free, codes_free, _ = run_torch(False, ort_codes, got)
    ref, diffs, code_stats, layer_outs = run_torch(True, ort_codes, got)
    widest = max((b for b, _ in layer_outs), default=None)
    tols = [_output_tolerance(t, layer_outs, widest) for t in ref]
    agree = None
    if len(ref_free) == 1 and ref_free[0].dim() == 2:
        agree = float((ref_free[0].argmax(1).numpy() == got[0].argmax(1)).mean())
    within = all(tol is None or d <= tol for d, tol in zip(diffs, tols))
    known = [t for t in tols if t is not None]
    res = dict(max_abs=max(diffs, default=0.0), diffs=diffs, tolerances=tols,
               one_step=max(known) if known else None, within_one_step=within,
               act_codes=code_stats, argmax_agree=agree, num_outputs=len(ref),
               free=dict(max_abs=max(diffs_free, default=0.0), diffs=diffs_free,
                         act_codes=codes_free),
               bias_effect=bias_effect, batch=int(inputs.shape[0]), onnx_outputs=got)
    if optimized:
        got_o, codes_o = run_ort(True)
        _, diffs_o, stats_o, _ = run_torch(True, codes_o, got_o)
        checked = copy.deepcopy(proto)
        have = {o.name for o in checked.graph.output}
        for _, t, _, _ in codes:
            if t not in have:
                checked.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
        res['deployed'] = dict(
            max_abs=max(diffs_o, default=0.0), diffs=diffs_o, act_codes=stats_o,
            within_one_step=all(t is None or d <= t for d, t in zip(diffs_o, tols)),
            kernels=count_kernels(checked, threads),
            vs_graph=max((float(np.abs(a - b).max()) for a, b in zip(got_o, got)
                          if a.size), default=0.0),
            threads=threads)
    return res


def _layer_one_step(layer: nn.Module) -> float:
    """``s_a * max_o sum_i |W_oi|``: how much one step of the layer's input moves one of
    its outputs at most."""
    w = layer.weight.detach().float().flatten(1).abs().sum(1).max()
    return float(layer.a_quant.scale().detach().max() * w)


def _output_tolerance(out: torch.Tensor, layer_outs, widest):
    """One-step bound of the quantized layer whose output ``out`` is ``c`` times."""
    for bound, y in reversed(layer_outs):
        if y.shape != out.shape:
            continue
        yy = float((y * y).sum())
        if yy == 0.0:
            continue
        c = float((out * y).sum()) / yy
        scale = float(out.abs().max())
        if torch.allclose(out, c * y, rtol=1e-5, atol=1e-6 * max(scale, 1e-12)):
            return abs(c) * bound
    return widest


def summary_lines(info: dict) -> list[str]:
    """Human-readable lines for the quantizer records of :func:`export_onnx`."""
    lines = []
    for r in info['quantizers']:
        store = f'stored {r["storage"]}'
        if r['zero_point']:
            store += f' (zero point {r["zero_point"]})'
        extra = ''
        if r['kind'] == 'act' and r.get('clamp_op'):
            extra = f', {r["clamp_op"]} to {r["stored_range"]}' \
                if r['clamp_op'] == 'Clip(codes)' else f', {r["clamp_op"]}'
        if r['kind'] == 'weight':
            extra = f', bias {r.get("bias")}'
            if 'kernel' in r:
                extra += f', runs as {r["kernel"] or "float (not integer)"}'
        lines.append(f'{r["kind"]:6s} {r["name"]}: {r["bits"]}-bit '
                     f'{"signed" if r["signed"] else "unsigned"}, clamp {r["clamp"]}, '
                     f'{store}{extra}{", per channel" if r["per_channel"] else ""}')
    return lines
