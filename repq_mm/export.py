"""Integer deployment export: a merged quantized model to ONNX with QuantizeLinear /
DequantizeLinear pairs carrying the learned LSQ step sizes (torch; ``onnx`` and
``onnxruntime`` only for saving metadata and checking).

What the exported graph contains, per quantized layer (``QConv2d`` / ``QLinear`` of
:func:`~repq_mm.convert.merge_model`):

* the activation quantizer ``a_quant``: ``QuantizeLinear(x, s_a, zp) -> DequantizeLinear``,
  zero point ``uint8 0`` (unsigned, post-ReLU) or ``int8 0`` (signed). LSQ ranges narrower
  than the storage type (fewer than 8 bits, or the symmetric signed range) get a ``Clip`` to
  ``[-Q_N s_a, Q_P s_a]`` in front of the ``QuantizeLinear``, so the codes stay in
  ``[-Q_N, Q_P]`` exactly as in the PyTorch fake quantizer;
* the weight: an **int8 initializer** holding the LSQ codes
  (:meth:`~repq_mm.quant.LSQQuantizer.quantize_to_codes`, any bit width 2..8 stored on the
  int8 grid) and ``DequantizeLinear(codes, s_w, 0)``, per output channel (``axis=0``) when
  the quantizer is per channel;
* the bias in float32 (the paper does not quantize it), or with ``int32_bias=True`` as an
  **int32 initializer** ``round(b / (s_a s_w))`` and ``DequantizeLinear(codes, s_a s_w, 0)``
  (per output channel with per-channel weights): the integer-engine convention (the
  accumulator's scale), for layers with a per-tensor activation quantizer. Rounding moves an
  output by at most ``s_a s_w / 2``, far below one activation step.

Every quantizer's bit width, signedness, clamp range and storage type is recorded in the
model's ``metadata_props`` (key ``repq_mm.quantizers``, JSON) and returned by
:func:`export_onnx`.

The export temporarily replaces each quantizer's forward by an ``autograd.Function`` whose
``symbolic`` emits those nodes (legacy TorchScript exporter, ``dynamo=False``: the dynamo
exporter needs ``onnxscript``, and ``torch.fake_quantize_*`` export only the full 8-bit
ranges). Any ``nn.Module`` works given an example input: rep blocks are merged first, plain
quantized layers are put on their integer grid; outputs may be nested tuples / lists.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from repq_mm import convert_to_repq
    >>> from repq_mm.rep import RepVGGBlock
    >>> net = nn.Sequential(RepVGGBlock(3, 8, act=nn.ReLU()), nn.Flatten(), nn.Linear(512, 4))
    >>> q = convert_to_repq(net, w_bits=4, a_bits=4).eval()
    >>> _ = q(torch.randn(2, 3, 8, 8))           # initialises the step sizes
    >>> info = export_onnx(q, torch.randn(1, 3, 8, 8), 'net.onnx')  # doctest: +SKIP
    >>> info['int8']                   # doctest: +SKIP
    2
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import os.path as osp
import tempfile
import warnings
from typing import Iterable

import torch
from torch import nn

from .convert import snap_to_grid
from .quant import LSQQuantizer, QConv2d, QLinear
from .rep import RepBlock

__all__ = ['export_onnx', 'export_fp32_onnx', 'quantized_export_mode', 'run_onnx',
           'compare_onnx', 'ExportError', 'DEFAULT_OPSET']

DEFAULT_OPSET = 17
META_KEY = 'repq_mm.quantizers'
_CODES = 'weight_int8'
_BIAS_CODES = 'bias_int32'


class ExportError(RuntimeError):
    """The model cannot be exported as an integer model (reason names the layer)."""


# --------------------------------------------------------------------------------------
# ONNX-exportable quantize / dequantize functions
# --------------------------------------------------------------------------------------
def _zero_point(signed: bool, shape=()) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.int8 if signed else torch.uint8)


def _bshape(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


class _ActQDQ(torch.autograd.Function):
    """Fake quantization of an activation; exports as
    ``[Clip ->] QuantizeLinear -> DequantizeLinear``.

    ``scale``: 0-D (per tensor) or 1-D along ``axis`` (``axis=-1``: per tensor).
    ``lo, hi``: the float clip bounds ``-Q_N s, Q_P s`` (same shape as ``scale``), used when
    ``clip``.
    """

    @staticmethod
    def forward(ctx, x, scale, lo, hi, qn: int, qp: int, axis: int, signed: bool,
                clip: bool):
        if axis < 0:
            return torch.fake_quantize_per_tensor_affine(x, float(scale), 0, -qn, qp)
        return torch.fake_quantize_per_channel_affine(
            x, scale.float(), torch.zeros(scale.shape, dtype=torch.int32), axis, -qn, qp)

    @staticmethod
    def symbolic(g, x, scale, lo, hi, qn, qp, axis, signed, clip):
        per_channel = axis >= 0
        n = None if not per_channel else _static_len(scale)
        zp = g.op('Constant', value_t=_zero_point(signed, (n,) if per_channel else ()))
        if clip:
            if per_channel:   # Clip takes scalars: element-wise Max / Min with shaped bounds
                x = g.op('Max', g.op('Min', x, hi), lo)
            else:
                x = g.op('Clip', x, lo, hi)
        kw = {'axis_i': axis} if per_channel else {}
        q = g.op('QuantizeLinear', x, scale, zp, **kw)
        return g.op('DequantizeLinear', q, scale, zp, **kw)


class _WeightDQ(torch.autograd.Function):
    """``codes * scale`` from int8 codes; exports as ``DequantizeLinear(codes, scale, 0)``
    (per channel along ``axis`` when ``axis >= 0``)."""

    @staticmethod
    def forward(ctx, codes, scale, axis: int):
        s = scale if axis < 0 else _bshape(scale, axis, codes.dim())
        return codes.to(scale.dtype) * s

    @staticmethod
    def symbolic(g, codes, scale, axis):
        if axis >= 0:
            zp = g.op('Constant', value_t=_zero_point(True, (_static_len(scale),)))
            return g.op('DequantizeLinear', codes, scale, zp, axis_i=axis)
        zp = g.op('Constant', value_t=_zero_point(True))
        return g.op('DequantizeLinear', codes, scale, zp)


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
def _describe(name: str, q: LSQQuantizer, kind: str) -> dict:
    qn, qp = q.qrange
    signed = bool(q.is_signed) if kind == 'act' else True
    lo_store, hi_store = (-128, 127) if signed else (0, 255)
    s = q.scale().detach().float().flatten().cpu()
    return dict(name=name, kind=kind, bits=q.bits, signed=signed,
                per_channel=bool(q.per_channel), axis=q.ch_axis if q.per_channel else None,
                clamp=[-qn, qp], storage='int8' if signed else 'uint8',
                clip=(-qn, qp) != (lo_store, hi_store) if kind == 'act' else False,
                scale=[float(v) for v in s] if s.numel() <= 16 else
                dict(n=s.numel(), min=float(s.min()), max=float(s.max())))


def _layer_quantizers(model: nn.Module):
    """``(module name, layer or None, quantizer name, quantizer, kind)`` of every enabled
    quantizer; raises for weight quantizers outside ``QConv2d`` / ``QLinear``."""
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


def _int32_bias_scale(name: str, layer: nn.Module):
    """``s_a s_w`` (per output channel with per-channel weights) for a layer whose bias is
    stored as int32 codes: one with a bias, a weight quantizer and a per-tensor activation
    quantizer; ``None`` for other layers. Raises when a code would not fit int32."""
    aq, wq = layer.a_quant, layer.w_quant
    if layer.bias is None or wq is None or aq is None or not aq.enabled or aq.per_channel:
        return None
    if not aq.is_initialized:
        raise ExportError(f'{name}: activation quantizer not initialised')
    s_b = (aq.scale().detach().float().reshape(()) * wq.scale().detach().float()).to(
        layer.bias.device)
    if (layer.bias.detach().float() / s_b).abs().max() > float(2 ** 31 - 1):
        raise ExportError(f'{name}: bias does not fit int32 at scale s_a s_w')
    return s_b


@torch.no_grad()
def snap_bias_to_int32(model: nn.Module) -> int:
    """Put the bias of every layer exported with an int32 bias (``int32_bias=True``) on its
    grid, ``round(b / (s_a s_w)) * s_a s_w``, in place: the PyTorch model that the integer
    ONNX model computes. Returns the number of layers changed."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, (QConv2d, QLinear)):
            s_b = _int32_bias_scale(name, m)
            if s_b is not None:
                m.bias.copy_(torch.round(m.bias.float() / s_b) * s_b)
                n += 1
    return n


@contextlib.contextmanager
def quantized_export_mode(model: nn.Module, int32_bias: bool = False):
    """Inside the context every enabled quantizer of ``model`` (merged: ``QConv2d`` /
    ``QLinear`` weights and activation quantizers) computes through the exportable
    functions above (with ``int32_bias``, so do the biases of layers with weight and
    per-tensor activation quantizers); yields the list of quantizer records. ``model`` is
    restored after."""
    recs, undo = [], []
    order: list[str] = []
    try:
        for name, layer, q, kind in _layer_quantizers(model):
            rec = _describe(name, q, kind)
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
                if hasattr(layer, _CODES):
                    raise ExportError(f'{name}: the layer already has an attribute {_CODES!r}')
                # a (persistent) buffer: exported as the initializer '<layer>.weight_int8'
                layer.register_buffer(_CODES, codes.to(layer.weight.device))
                scale = s.to(layer.weight.device)

                def qweight(layer=layer, scale=scale, axis=axis):
                    return _WeightDQ.apply(getattr(layer, _CODES), scale, axis)
                layer.quantized_weight = qweight
                undo.append(lambda layer=layer: (layer.__dict__.pop('quantized_weight', None),
                                                 layer._buffers.pop(_CODES, None)))
                s_b = _int32_bias_scale(name, layer) if int32_bias else None
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
                signed, clip = rec['signed'], rec['clip']
                lo, hi = (-qn * s), (qp * s)

                def qact(x, s=s, lo=lo, hi=hi, qn=qn, qp=qp, axis=axis, signed=signed,
                         clip=clip, name=name):
                    order.append(name)
                    dev = x.device
                    if axis >= 0:      # Min / Max bounds broadcast along the channel axis
                        ax = axis % x.dim()
                        shape = [-1] + [1] * (x.dim() - ax - 1)
                        lo, hi = lo.reshape(shape), hi.reshape(shape)
                        axis = ax
                    return _ActQDQ.apply(x, s.to(dev), lo.to(dev), hi.to(dev), qn, qp, axis,
                                         signed, clip)
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
    for m in model.modules():                 # drop eval-mode weight caches
        if '_wcache' in m.__dict__:
            m.__dict__['_wcache'] = None
    return model


def _wrap(model: nn.Module) -> nn.Module:
    try:
        from mmengine.model import BaseModel
    except ImportError:  # pragma: no cover
        return model
    return _TensorMode(model) if isinstance(model, BaseModel) else model


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
    n = len(_flatten(out))
    return ['output'] if n == 1 else [f'output_{i}' for i in range(n)]


def _flatten(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flatten(o)]
    if isinstance(obj, dict):
        return [t for k in obj for t in _flatten(obj[k])]
    return []


def _atomic_save(model_proto, path: str) -> None:
    import onnx
    path = osp.abspath(path)
    d = osp.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.', suffix='.tmp', dir=d)
    os.close(fd)
    try:
        onnx.save(model_proto, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


@torch.no_grad()
def export_onnx(model: nn.Module, example_input, path: str, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, input_names: Iterable[str] = ('input',),
                metadata: dict | None = None, int32_bias: bool = False) -> dict:
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
            ``s_a s_w`` (see the module docstring); default float32.

    Returns:
        ``dict(path, quantizers=[records], int8_initializers, float_initializers, size)``.

    Raises:
        ExportError: an uninitialised quantizer, a weight quantizer outside a quantized
            layer, or a graph whose quantized weights did not come out as int8.
    """
    import onnx
    if opset < 13:
        raise ExportError(f'opset {opset} < 13: per-channel DequantizeLinear needs opset 13')
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    prepared = _prepare(model)
    module = _wrap(prepared)
    input_names = list(input_names)
    with quantized_export_mode(prepared, int32_bias) as recs:
        order = prepared.__dict__['_onnx_act_order']
        output_names = _output_names(module, args)
        order.clear()
        buf = io.BytesIO()
        _export(module, args, buf, opset, dynamic_batch, input_names, output_names)
        act_order = list(order)
    proto = onnx.load_from_string(buf.getvalue())
    _name_qdq_nodes(proto, act_order)
    stats = _initializer_stats(proto)
    n_w = sum(r['kind'] == 'weight' for r in recs)
    if stats['int8'] < n_w:
        raise ExportError(f'{n_w} quantized weights but only {stats["int8"]} int8 '
                          'initializers in the exported graph')
    n_b = sum(r.get('bias') == 'int32' for r in recs)
    if stats['int32'] < n_b:
        raise ExportError(f'{n_b} int32 biases but only {stats["int32"]} int32 '
                          'initializers in the exported graph')
    meta = {META_KEY: json.dumps(recs),
            'repq_mm.format': 'QDQ; weights int8 codes + DequantizeLinear; activations '
                              '[Clip ->] QuantizeLinear -> DequantizeLinear; sub-8-bit ranges '
                              'stored on the int8/uint8 grid, clamp range in repq_mm.quantizers',
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
    return dict(path=osp.abspath(path), quantizers=recs, size=osp.getsize(path),
                input_names=input_names, output_names=output_names, **stats)


@torch.no_grad()
def export_fp32_onnx(model: nn.Module, example_input, path: str, opset: int = DEFAULT_OPSET,
                     dynamic_batch: bool = True, input_names=('input',)) -> dict:
    """The same (merged) model with every quantizer disabled, as a plain float32 ONNX
    model: the size reference for :func:`export_onnx`."""
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
    return dict(path=osp.abspath(path), size=osp.getsize(path), **_initializer_stats(proto))


def _initializer_stats(proto) -> dict:
    import onnx
    TP = onnx.TensorProto
    out = dict(int8=0, float=0, int8_bytes=0, float_bytes=0, int32=0, int32_bytes=0)
    for init in proto.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        if init.data_type == TP.INT8:
            out['int8'] += 1
            out['int8_bytes'] += n
        elif init.data_type == TP.INT32:
            out['int32'] += 1
            out['int32_bytes'] += 4 * n
        elif init.data_type == TP.FLOAT:
            out['float'] += 1
            out['float_bytes'] += 4 * n
    return out


def _name_qdq_nodes(proto, act_order: list[str]) -> None:
    """Name the activation QuantizeLinear nodes after their quantizer (trace order) and
    each weight's DequantizeLinear after its initializer, for readable graphs and
    :func:`compare_onnx`."""
    qnodes = [n for n in proto.graph.node if n.op_type == 'QuantizeLinear']
    if len(qnodes) == len(act_order):
        for i, (n, name) in enumerate(zip(qnodes, act_order)):
            n.name = f'{name}/QuantizeLinear#{i}'


# --------------------------------------------------------------------------------------
# running and checking
# --------------------------------------------------------------------------------------
def _session(path_or_proto, extra_outputs: list[str] = ()):
    import onnx
    import onnxruntime as ort
    proto = onnx.load(path_or_proto) if isinstance(path_or_proto, str) else path_or_proto
    if extra_outputs:
        proto = copy.deepcopy(proto)
        have = {o.name for o in proto.graph.output}
        for name in extra_outputs:
            if name not in have:
                proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    # keep Q/DQ as they are: the check compares the graph itself, not ORT's fusions
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return proto, ort.InferenceSession(proto.SerializeToString(), opts,
                                       providers=['CPUExecutionProvider'])


def run_onnx(path: str, *inputs) -> list:
    """Run an ONNX file with onnxruntime (CPU, one thread); returns the outputs (numpy)."""
    _, sess = _session(path)
    feeds = {i.name: t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t
             for i, t in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feeds)


@torch.no_grad()
def compare_onnx(model: nn.Module, path: str, inputs: torch.Tensor,
                 int32_bias: bool = False) -> dict:
    """Compare the exported integer model with the PyTorch fake-quant merged model.

    Runs ``inputs`` (a batch) through onnxruntime (every QuantizeLinear's codes as extra
    outputs) and through PyTorch twice (with ``int32_bias``, the PyTorch model's biases are
    put on their int32 grid first, :func:`snap_bias_to_int32`: the model the file computes;
    ``bias_effect`` is the max |output change| that made):

    * **layer by layer** (the check): every activation quantizer in PyTorch gets, as its
      output, the codes onnxruntime produced there (teacher forcing), so each layer sees the
      same integer input in both engines. ``act_codes``: per quantizer, the max |code
      difference| and share of differing codes between PyTorch's own rounding and ORT's
      QuantizeLinear (float summation order can flip a code at a rounding boundary: at most
      1 for a correct export). ``diffs``: per model output, max |ONNX - PyTorch|;
      ``tolerances``: one quantization step of the input of the quantized layer that
      produces it, ``|c| * s_a * max_o sum_i |W_oi|`` for the layer whose output the model
      output is (a multiple ``c`` of, e.g. a detector's box distances times the stride),
      else the largest such bound of all layers; ``one_step``: the largest tolerance;
      ``within_one_step``: every output within its tolerance; ``max_abs``: max of ``diffs``;
    * **end to end** (reported): ``free``: the same numbers with each engine running on its
      own codes. In a deep network, the single-code flips of the first layers propagate, so
      these can be several steps without any export error.

    ``argmax_agree``: share of samples with the same top-1 (2-D outputs, end to end).
    """
    import numpy as np
    import onnx
    prepared = _prepare(model)
    module = _wrap(prepared)
    bias_effect = None
    if int32_bias:
        with torch.no_grad():
            before = [t.detach().float() for t in _flatten(module(inputs))]
        snap_bias_to_int32(prepared)
        with torch.no_grad():
            after = [t.detach().float() for t in _flatten(module(inputs))]
        bias_effect = max((float((a - b).abs().max()) for a, b in zip(after, before)
                           if a.numel()), default=0.0)
    proto = onnx.load(path)
    qnodes = [n for n in proto.graph.node if n.op_type == 'QuantizeLinear']
    names = [n.name.split('/QuantizeLinear#')[0] for n in qnodes]
    _, sess = _session(proto, [n.output[0] for n in qnodes])
    outs = sess.run(None, {sess.get_inputs()[0].name: inputs.cpu().numpy()})
    got = outs[:len(outs) - len(qnodes)]
    ort_codes: dict[str, list] = {}
    for name, c in zip(names, outs[len(got):]):
        ort_codes.setdefault(name, []).append(c.astype(np.int64))
    acts = [(n, q) for n, _, q, k in _layer_quantizers(prepared) if k == 'act']

    def run_torch(force: bool):
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
            with torch.no_grad():
                ref = [t.detach().float().cpu() for t in _flatten(module(inputs))]
        finally:
            for h in handles:
                h.remove()
        diffs = [float(np.abs(a.numpy() - b).max()) if a.numel() else 0.0
                 for a, b in zip(ref, got)]
        return ref, diffs, stats, layer_outs

    ref_free, diffs_free, codes_free, _ = run_torch(False)
    ref, diffs, code_stats, layer_outs = run_torch(True)
    widest = max((b for b, _ in layer_outs), default=None)
    tols = [_output_tolerance(t, layer_outs, widest) for t in ref]
    agree = None
    if len(ref_free) == 1 and ref_free[0].dim() == 2:
        agree = float((ref_free[0].argmax(1).numpy() == got[0].argmax(1)).mean())
    within = all(tol is None or d <= tol for d, tol in zip(diffs, tols))
    known = [t for t in tols if t is not None]
    return dict(max_abs=max(diffs, default=0.0), diffs=diffs, tolerances=tols,
                one_step=max(known) if known else None, within_one_step=within,
                act_codes=code_stats, argmax_agree=agree, num_outputs=len(ref),
                free=dict(max_abs=max(diffs_free, default=0.0), diffs=diffs_free,
                          act_codes=codes_free),
                bias_effect=bias_effect, batch=int(inputs.shape[0]), onnx_outputs=got)


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
        lines.append(f'{r["kind"]:6s} {r["name"]}: {r["bits"]}-bit '
                     f'{"signed" if r["signed"] else "unsigned"}, clamp {r["clamp"]}, '
                     f'stored {r["storage"]}{", Clip" if r["clip"] else ""}'
                     f'{", per channel" if r["per_channel"] else ""}')
    return lines
