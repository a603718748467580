"""Integer ONNX export (``repq_mm.export``, ``tools/export_onnx.py``) checked with
onnxruntime: both graph forms (``fused``: uint8 codes, integer Clip, int32 biases,
ConvInteger where QLinearConv cannot be used; ``qdq``: plain Q -> DQ pairs), integer weight
initializers, learned scales, outputs within one quantization step of the PyTorch
fake-quant merged model on Fashion-MNIST test images (random images when
``data/fashion_mnist`` is missing), every quantized layer an integer kernel in onnxruntime's
optimised graph; the deployment benchmark (``--quick``) and the onnxruntime accuracy tool
on a few samples. Tiny models."""
from __future__ import annotations

import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

from repq_mm import convert_to_repq, merge_model  # noqa: E402
from repq_mm.export import (META_KEY, ExportError, compare_onnx,  # noqa: E402
                            count_kernels, export_fp32_onnx, export_onnx, run_onnx)
from repq_mm.rep import RepVGGBlock  # noqa: E402

from helpers import ROOT  # noqa: E402
FMNIST = osp.join(ROOT, 'data', 'fashion_mnist', 't10k-images-idx3-ubyte')


def fmnist_images(n: int, offset: int = 0) -> np.ndarray:
    """``n`` Fashion-MNIST test images (uint8, 28x28); random ones without the data."""
    if osp.isfile(FMNIST):
        with open(FMNIST, 'rb') as f:
            f.seek(16 + offset * 784)
            return np.frombuffer(f.read(n * 784), np.uint8).reshape(n, 28, 28).copy()
    return np.random.default_rng(offset).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def to_input(imgs: np.ndarray) -> torch.Tensor:
    """Pad 28 -> 32 and normalise as the Fashion-MNIST configs do."""
    x = torch.from_numpy(imgs).float()[:, None]
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return (x - 72.94) / 90.02


def tiny_net(w_bits=4, a_bits=4, per_channel=True, symmetric=False, act_signed='auto',
             int_bias=False):
    torch.manual_seed(0)
    net = nn.Sequential(RepVGGBlock(1, 16, stride=2, act=nn.ReLU()),
                        RepVGGBlock(16, 16, act=nn.ReLU()),
                        RepVGGBlock(16, 32, stride=2, act=nn.ReLU()),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    q = convert_to_repq(net, w_bits=w_bits, a_bits=a_bits, per_channel=per_channel,
                        first_bits=8, last_bits=8, symmetric=symmetric, bn_mode='est',
                        act_signed=act_signed, int_bias=int_bias)
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    x = to_input(fmnist_images(32, 100))
    q.train()
    for i in range(3):          # a few steps so BN statistics and steps are not trivial
        loss = q(x[i * 8:(i + 1) * 8]).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return q.eval()


def _initializers(path):
    m = onnx.load(path)
    return m, {i.name: i for i in m.graph.initializer}


@pytest.mark.parametrize('w_bits,a_bits,per_channel,symmetric',
                         [(4, 4, True, False), (8, 8, False, True), (2, 3, False, False)])
def test_export_qdq_graph_and_onnxruntime(tmp_path, w_bits, a_bits, per_channel, symmetric):
    """The plain QDQ form (``form='qdq'``): float Clip in front of sub-8-bit
    QuantizeLinear, int8 zero point 0 for signed codes, float biases."""
    q = tiny_net(w_bits, a_bits, per_channel, symmetric)
    path = str(tmp_path / 'q.onnx')
    info = export_onnx(q, torch.zeros(1, 1, 32, 32), path, form='qdq')
    model, inits = _initializers(path)
    ops = [n.op_type for n in model.graph.node]
    # four quantized layers (3 merged blocks + fc): int8 codes + DequantizeLinear
    w_recs = [r for r in info['quantizers'] if r['kind'] == 'weight']
    a_recs = [r for r in info['quantizers'] if r['kind'] == 'act']
    assert len(w_recs) == len(a_recs) == 4
    codes = {k: v for k, v in inits.items() if k.endswith('weight_int8')}
    assert len(codes) == 4 and info['int8'] == 4
    assert all(v.data_type == onnx.TensorProto.INT8 for v in codes.values())
    assert not [k for k, v in inits.items() if v.data_type == onnx.TensorProto.FLOAT and
                k.endswith('weight')]                     # no float weight left
    assert ops.count('QuantizeLinear') == 4 and ops.count('DequantizeLinear') == 8
    # codes and scales are the learned ones: DequantizeLinear(codes) == merged weight
    merged = merge_model(q)
    layers = [m for m in merged.modules() if hasattr(m, 'w_quant') and m.w_quant is not None]
    for layer, rec in zip(layers, w_recs):
        c = onnx.numpy_helper.to_array(codes[rec['name'].rsplit('.', 1)[0] + '.weight_int8'])
        qn, qp = layer.w_quant.qrange
        assert c.min() >= -qn and c.max() <= qp and rec['clamp'] == [-qn, qp]
        s = layer.w_quant.scale().detach().numpy()
        s = s.reshape(-1, *[1] * (c.ndim - 1)) if per_channel else s
        with torch.no_grad():
            wq = layer.w_quant(layer.weight).numpy()       # the fake-quant weight
        np.testing.assert_allclose(c * s, wq, rtol=0, atol=1e-7)
    # per-channel DequantizeLinear carries axis=0
    dq_axes = [a.i for n in model.graph.node if n.op_type == 'DequantizeLinear'
               for a in n.attribute if a.name == 'axis']
    assert len(dq_axes) == (4 if per_channel else 0) and set(dq_axes) <= {0}
    # sub-8-bit (or symmetric) activation ranges: Clip in front; uint8 after ReLU
    # (first and last layer at 8 bits; the network input is signed, the rest post-ReLU)
    n_clip = sum(r['clip'] for r in a_recs)
    assert ops.count('Clip') == n_clip == (2 if a_bits < 8 else 0)
    assert [r['storage'] for r in a_recs] == ['int8', 'uint8', 'uint8', 'uint8']
    assert [r['bits'] for r in a_recs] == [8, a_bits, a_bits, 8]
    assert [r['clamp'] for r in a_recs][1] == [0, 2 ** a_bits - 1]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta[META_KEY]) == info['quantizers']
    assert [r['bits'] for r in json.loads(meta[META_KEY]) if r['kind'] == 'weight'] == \
        [8, w_bits, w_bits, 8]
    # onnxruntime on real images: within one quantization step, codes off by at most 1
    x = to_input(fmnist_images(8))
    res = compare_onnx(q, path, x)
    with torch.no_grad():
        ref = q(x)
    got = torch.from_numpy(run_onnx(path, x)[0])
    assert (got - ref).abs().max().item() <= res['one_step']
    assert res['max_abs'] <= res['one_step'], res
    assert all(s['max_diff'] <= 1 for s in res['act_codes'].values()), res
    assert len(res['act_codes']) == 4
    # float32 reference: same merged model, quantizers off
    fp = export_fp32_onnx(q, torch.zeros(1, 1, 32, 32), str(tmp_path / 'fp.onnx'))
    assert fp['int8'] == 0 and fp['float_bytes'] > 3 * info['int8_bytes']
    print(f'\nW{w_bits}A{a_bits}: int8 ONNX {info["size"]} B vs fp32 {fp["size"]} B; '
          f'max |ORT - torch| {res["max_abs"]:.3g} (one step {res["one_step"]:.3g})')


def _stored(model, name):
    """The constant value named ``name`` (Constant node or initializer)."""
    for n in model.graph.node:
        if n.op_type == 'Constant' and n.output[0] == name:
            return onnx.numpy_helper.to_array(n.attribute[0].t)
    for i in model.graph.initializer:
        if i.name == name:
            return onnx.numpy_helper.to_array(i)
    raise KeyError(name)


@pytest.mark.parametrize('w_bits,a_bits,per_channel,symmetric,act_signed',
                         [(4, 4, True, False, 'auto'), (8, 8, False, True, 'auto'),
                          (2, 3, False, False, 'auto'), (4, 8, True, False, 'auto'),
                          (4, 4, True, False, True)])
def test_export_fused_form_runs_as_integer_kernels(tmp_path, w_bits, a_bits, per_channel,
                                                   symmetric, act_signed):
    """The default ``fused`` form: uint8 activation codes (zero point 128 for signed ones),
    the LSQ range of sub-8-bit / symmetric codes clamped by a Clip on the uint8 codes (no
    float Clip), int32 biases; in onnxruntime's optimised graph every quantized layer is
    an integer kernel (QLinearConv, ConvInteger for the conv feeding the pooling, QGemm for
    the head) and no float conv / linear is left; the layer-by-layer check passes in the
    graph as written and in the optimised one."""
    q = tiny_net(w_bits, a_bits, per_channel, symmetric, act_signed)
    path = str(tmp_path / 'q.onnx')
    info = export_onnx(q, torch.zeros(1, 1, 32, 32), path)
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    a_recs = [r for r in info['quantizers'] if r['kind'] == 'act']
    w_recs = [r for r in info['quantizers'] if r['kind'] == 'weight']
    assert info['form'] == 'fused' and len(a_recs) == len(w_recs) == 4
    # every activation is stored as uint8; signed codes (the network input, or everything
    # with act_signed=True) with zero point 128; the stored range is zp + [-Q_N, Q_P]
    assert all(r['storage'] == 'uint8' for r in a_recs)
    assert [r['signed'] for r in a_recs] == [True] + [act_signed is True] * 3
    for r in a_recs:
        assert r['zero_point'] == (128 if r['signed'] else 0)
        assert r['stored_range'] == [r['zero_point'] + r['clamp'][0],
                                     r['zero_point'] + r['clamp'][1]]
        full = r['stored_range'] == [0, 255]
        assert r['clamp_op'] == (None if full else 'Clip(codes)') and r['clip'] == (not full)
    # the narrower ranges: integer Clips between QuantizeLinear and DequantizeLinear only
    clips = [n for n in model.graph.node if n.op_type == 'Clip']
    assert len(clips) == sum(r['clip'] for r in a_recs)
    for n in clips:
        lo, hi = _stored(model, n.input[1]), _stored(model, n.input[2])
        assert lo.dtype == hi.dtype == np.uint8 and n.name.split('/')[1].startswith('CodeClip')
        src = [m for m in model.graph.node if n.input[0] in m.output][0]
        assert src.op_type == 'QuantizeLinear'
    # weights: int8 codes; uint8 + 128 where u8 x s8 pairs could pass int16 (8-bit weights
    # against 8-bit activations) and for ConvInteger (faster in onnxruntime)
    a_max = [r['stored_range'][1] for r in a_recs]
    merged = [m for m in merge_model(q).modules() if getattr(m, 'w_quant', None) is not None]
    for r, layer, amax, m in zip(w_recs, info['layers'], a_max, merged):
        with torch.no_grad():
            w_max = int(m.w_quant.quantize_to_codes(m.weight)[0].abs().max())
        want = 'uint8' if layer['kernel'] == 'ConvInteger' or 2 * w_max * amax > 32767 \
            else 'int8'
        assert r['storage'] == layer['weights'] == want, (r, layer)
        assert r['zero_point'] == (128 if want == 'uint8' else 0)
    # int32 biases for QLinearConv; float32 added after ConvInteger and QGemm (exact)
    assert [r['bias'] for r in w_recs] == (['float32'] * 3 if act_signed is True else
                                           ['int32', 'int32', 'float32']) + ['float32']
    # QLinearConv biases: int32 codes at s_a s_w / F, F the code factor of the weights
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    modules = dict(merge_model(q).named_modules())
    for r, layer in zip(w_recs, info['layers']):
        if r['bias'] != 'int32':
            continue
        mod = modules[layer['name']]
        f = np.broadcast_to(np.asarray(r.get('code_factor', 1)), (mod.weight.shape[0],))
        s_b = float(mod.a_quant.scale().detach()) * mod.w_quant.scale().detach().numpy() / f
        np.testing.assert_array_equal(inits[f'{layer["name"]}.bias_int32'],
                                      np.round(mod.bias.detach().numpy() / s_b))
        stored = inits[f'{layer["name"]}.weight_{r["storage"]}'].astype(np.int64) - \
            r['zero_point']
        with torch.no_grad():
            codes = mod.w_quant.quantize_to_codes(mod.weight)[0].numpy()
        np.testing.assert_array_equal(stored, codes * f.reshape(-1, 1, 1, 1))
        assert np.abs(stored).max() <= 127 and f.min() >= 1
        assert r['bits'] == 8 or f.min() > 1        # 4-bit codes: a finer bias grid
    # onnxruntime: every quantized layer an integer kernel, no float conv / linear left
    # (with signed codes after the ReLUs the ReLU is not implied by the zero point, so those
    # convs are ConvInteger)
    kernels = [layer['kernel'] for layer in info['layers']]
    assert kernels == (['ConvInteger'] * 3 if act_signed is True else
                       ['QLinearConv', 'QLinearConv', 'ConvInteger']) + ['QGemm']
    k = count_kernels(path)
    assert k['integer'] == len(info['layers']) == 4 and k['float'] == 0, k
    for kern in ('QLinearConv', 'ConvInteger', 'QGemm'):
        assert k['ops'].get(kern, 0) == kernels.count(kern)
    assert 'DequantizeLinear' not in k['ops'], k        # nothing dequantized to float
    # exact: layer by layer within one step, codes off by at most one, optimised graph too
    x = to_input(fmnist_images(8))
    res = compare_onnx(q, path, x, optimized=True)
    assert res['within_one_step'] and res['max_abs'] <= res['one_step'], res
    assert len(res['act_codes']) == 4 and all(v['max_diff'] <= 1
                                              for v in res['act_codes'].values())
    dep = res['deployed']
    assert dep['within_one_step'] and all(v['max_diff'] <= 1 for v in dep['act_codes'].values())
    assert dep['kernels']['integer'] == 4 and dep['kernels']['float'] == 0
    if 'int32' in [r['bias'] for r in w_recs]:
        assert 0 <= res['bias_effect'] <= res['one_step']
    else:
        assert res['bias_effect'] is None                  # nothing rounded
    # the integer Clips do the LSQ clamping: without them the codes leave the LSQ range
    if any(r['clip'] and r['bits'] < 8 for r in a_recs[1:]):
        from repq_mm.mm.export import check_failures
        broken = onnx.load(path)
        for n in broken.graph.node:
            if '/CodeClip#' in n.name:
                del n.input[1:]                       # Clip without bounds: identity
        onnx.save(broken, str(tmp_path / 'noclip.onnx'))
        big = x * 4                          # activations beyond the LSQ ranges
        assert not check_failures(compare_onnx(q, path, big))
        bad = compare_onnx(q, str(tmp_path / 'noclip.onnx'), big)
        assert any('activation codes off' in f for f in check_failures(bad)), bad


def test_signed_codes_fuse_without_relu(tmp_path):
    """A signed activation quantizer behind a conv without ReLU (zero point 128): the conv
    still becomes QLinearConv (uint8 output with zero point 128), codes exact."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(8, 4, 1))
    q = convert_to_repq(net, w_bits=4, a_bits=4, per_channel=True)
    x = to_input(fmnist_images(8, 40))
    q.train()(x)
    q.eval()
    path = str(tmp_path / 's.onnx')
    info = export_onnx(q, x[:1], path)
    a_recs = [r for r in info['quantizers'] if r['kind'] == 'act']
    assert [r['signed'] for r in a_recs] == [True, True, False]
    assert [r['zero_point'] for r in a_recs] == [128, 128, 0]
    assert [r['stored_range'] for r in a_recs] == [[120, 135], [120, 135], [0, 15]]
    assert [layer['kernel'] for layer in info['layers']] == \
        ['QLinearConv', 'QLinearConv', 'ConvInteger']
    k = count_kernels(path)
    assert k['integer'] == 3 and k['float'] == 0 and k['ops']['QLinearConv'] == 2
    res = compare_onnx(q, path, x, optimized=True)
    assert res['within_one_step'] and res['deployed']['within_one_step']
    assert all(v['max_diff'] <= 1 for v in res['act_codes'].values())
    assert all(v['max_diff'] <= 1 for v in res['deployed']['act_codes'].values())


def test_batchnorm_after_quantized_conv_is_folded(tmp_path):
    """conv -> BN -> ReLU (a plain ConvModule, not a rep block): the inference BN is folded
    into the conv's per-channel weight scale (codes unchanged; negated where gamma < 0) and
    an int32 bias, so the conv runs as QLinearConv; exact within one step."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 4, 1))
    q = convert_to_repq(net, w_bits=4, a_bits=4, per_channel=False)
    x = to_input(fmnist_images(8, 60))
    q.train()
    for _ in range(3):
        q(x)
    q.eval()
    with torch.no_grad():
        q[1].weight[:3] *= -1                     # some negative gammas
        q[1].bias.uniform_(-0.5, 0.5)
    path = str(tmp_path / 'bn.onnx')
    info = export_onnx(q, x[:1], path)
    model = onnx.load(path)
    assert 'BatchNormalization' not in [n.op_type for n in model.graph.node]
    assert [layer['kernel'] for layer in info['layers']] == \
        ['QLinearConv', 'QLinearConv', 'ConvInteger']
    assert info['layers'][0]['folded_bn'] and not info['layers'][1]['folded_bn']
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    folded = inits['0.bn_folded.weight_int8']
    with torch.no_grad():
        codes, _ = q[0].w_quant.quantize_to_codes(q[0].weight)
    sign = np.where(q[1].weight.detach().numpy() < 0, -1, 1).reshape(-1, 1, 1, 1)
    factor = [r for r in info['quantizers'] if r['kind'] == 'weight'][0]['code_factor']
    factor = np.broadcast_to(np.asarray(factor), (8,)).reshape(-1, 1, 1, 1)
    assert (np.abs(codes.numpy() * factor) <= 127).all() and factor.min() > 1
    np.testing.assert_array_equal(folded, codes.numpy() * sign * factor)
    k = count_kernels(path)
    assert k['integer'] == 3 and k['float'] == 0 and 'BatchNormalization' not in k['ops']
    res = compare_onnx(q, path, x, optimized=True)
    assert res['within_one_step'] and res['deployed']['within_one_step'], res
    assert all(v['max_diff'] <= 1 for v in res['act_codes'].values())
    assert all(v['max_diff'] <= 1 for v in res['deployed']['act_codes'].values())


def _has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (None: not x86 / unknown)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((ln.split(':', 1)[1].split() for ln in f
                          if ln.lower().startswith('flags')), None)
    except OSError:
        return None
    if flags is None or 'sse4_1' not in flags:
        return None
    return 'avx512_vnni' in flags or 'avx_vnni' in flags


def test_weight_dtype_and_u8s8_saturation(tmp_path):
    """8-bit weights against 8-bit activations: u8 x s8 kernels of x86 CPUs without VNNI
    saturate pairs of products to int16. A layer with large weight codes and input codes
    near 255: ``weight_dtype='auto'`` stores it as uint8 (zero point 128) and onnxruntime's
    optimised graph stays exact; ``'int8'`` is exact in the graph as written, and in the
    optimised graph exactly on CPUs with VNNI (else off by more than a step)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1))
    q = convert_to_repq(net, w_bits=8, a_bits=8, per_channel=True)
    x = torch.rand(4, 4, 8, 8) * 4                     # unsigned input, codes up to 255
    q.train()(x)
    q.eval()
    with torch.no_grad():       # large weight codes of one sign, input codes up to 255
        w = q[0].weight.abs() + 0.5 * q[0].weight.abs().amax((1, 2, 3), keepdim=True)
        q[0].weight.copy_(w)
        q[0].w_quant.step.copy_(w.amax((1, 2, 3)) / 127)
        q[0].a_quant.step.fill_(float(x.max()) / 255)
    wide = x.clone()
    wide[:, :, 2:6, 2:6] = x.max()                     # many input codes at 255
    results = {}
    for wd in ('auto', 'int8', 'uint8'):
        path = str(tmp_path / f'{wd}.onnx')
        info = export_onnx(q, wide[:1], path, weight_dtype=wd)
        results[wd] = (info, compare_onnx(q, path, wide, optimized=True))
    info_auto, res_auto = results['auto']
    # the first layer's codes reach 127 against inputs up to 255: 2 * 127 * 255 > 32767;
    # the second one is a network output (ConvInteger: uint8 weights, faster)
    assert [layer['kernel'] for layer in info_auto['layers']] == ['QLinearConv', 'ConvInteger']
    assert [layer['weights'] for layer in info_auto['layers']] == ['uint8', 'uint8']
    assert [layer['weights'] for layer in results['int8'][0]['layers']] == ['int8'] * 2
    assert [layer['weights'] for layer in results['uint8'][0]['layers']] == ['uint8'] * 2
    for wd, (info, res) in results.items():
        assert res['within_one_step'] and all(v['max_diff'] <= 1
                                              for v in res['act_codes'].values()), wd
    for wd in ('auto', 'uint8'):
        dep = results[wd][1]['deployed']
        assert dep['within_one_step'] and all(v['max_diff'] <= 1
                                              for v in dep['act_codes'].values()), wd
    vnni = _has_vnni()
    if vnni is not None:
        dep = results['int8'][1]['deployed']
        exact = dep['within_one_step'] and all(v['max_diff'] <= 1
                                               for v in dep['act_codes'].values())
        assert exact == vnni, (vnni, dep)


@pytest.mark.parametrize('per_channel', [True, False])
def test_export_int32_bias(tmp_path, per_channel):
    """Biases as int32 codes at scale s_a * s_w: every quantized layer's bias becomes an
    int32 initializer + DequantizeLinear (int32 zero point, axis 0 per channel); the codes
    are round(b / (s_a s_w)); onnxruntime stays within one step of PyTorch."""
    q = tiny_net(4, 4, per_channel)
    path = str(tmp_path / 'q.onnx')
    info = export_onnx(q, torch.zeros(1, 1, 32, 32), path, int32_bias=True, form='qdq')
    model, inits = _initializers(path)
    biases = {k: v for k, v in inits.items() if k.endswith('bias_int32')}
    assert len(biases) == info['int32'] == 4
    assert all(v.data_type == onnx.TensorProto.INT32 for v in biases.values())
    assert not [k for k, v in inits.items() if v.data_type == onnx.TensorProto.FLOAT and
                k.endswith('bias')]                       # no float bias left
    assert [n.op_type for n in model.graph.node].count('DequantizeLinear') == 12
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta['repq_mm.bias'].startswith('int32')
    merged = merge_model(q)
    layers = [m for m in merged.modules() if hasattr(m, 'w_quant') and m.w_quant is not None]
    for layer in layers:
        name = [n for n, m in merged.named_modules() if m is layer][0]
        c = onnx.numpy_helper.to_array(biases[name + '.bias_int32'])
        s_b = (layer.a_quant.scale() * layer.w_quant.scale()).detach().reshape(-1).numpy()
        np.testing.assert_array_equal(c, np.round(layer.bias.detach().numpy() / s_b))
    x = to_input(fmnist_images(8))
    res = compare_onnx(q, path, x)          # the int32 layers come from the metadata
    assert res['within_one_step'] and res['max_abs'] <= res['one_step'], res
    assert all(s['max_diff'] <= 1 for s in res['act_codes'].values()), res
    assert 0 <= res['bias_effect'] <= res['one_step']


@pytest.mark.parametrize('w_bits,a_bits', [(4, 4), (8, 8)])
def test_int_bias_model_is_what_the_file_computes(tmp_path, w_bits, a_bits):
    """Trained with ``int_bias``, the QAT model, the merged model and the integer ONNX file
    have the same biases: the export has nothing left to round (``bias_effect`` 0, every
    int32 code is the model's own), and onnxruntime's deployed graph agrees with PyTorch
    layer by layer and end to end; without it the export's rounding moves the outputs."""
    x = to_input(fmnist_images(32))
    effect = {}
    for int_bias in (False, True):
        q = tiny_net(w_bits, a_bits, int_bias=int_bias)
        merged = merge_model(q)
        with torch.no_grad():
            assert torch.allclose(merged(x), q(x), atol=1e-5, rtol=0)
        path = str(tmp_path / f'q{int_bias}.onnx')
        info = export_onnx(q, torch.zeros(1, 1, 32, 32), path)
        res = compare_onnx(q, path, x, optimized=True)
        assert res['within_one_step'] and res['deployed']['within_one_step'], res
        effect[int_bias] = res['bias_effect']
        if not int_bias:
            continue
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
        layers = [m for m in merged.modules() if getattr(m, 'w_quant', None) is not None]
        assert layers and all(m.int_bias for m in layers)
        n = 0
        for rec, layer in zip([r for r in info['quantizers'] if r['kind'] == 'weight'],
                              info['layers']):
            if rec['bias'] != 'int32':
                continue
            mod = dict(merged.named_modules())[layer['name']]
            s = (mod.a_quant.scale() * mod.w_quant.scale()).detach().reshape(-1).numpy()
            f = np.asarray(rec.get('code_factor', 1))
            own = np.round(mod.bias.detach().numpy() / s)       # the model's own codes
            np.testing.assert_array_equal(inits[f'{layer["name"]}.bias_int32'], own * f)
            n += 1
        assert n >= 1
    assert effect[True] == 0.0 and effect[False] > 0, effect


@pytest.mark.parametrize('form', ['fused', 'qdq'])
def test_check_catches_a_wrong_export(tmp_path, form):
    """The layer-by-layer check finds a file that computes something else: half of one
    layer's weight codes negated in the saved ONNX model -> that layer's output codes / the
    output move beyond one step, in the graph as written and in onnxruntime's optimised
    graph; the untouched file passes, and the end-to-end numbers are reported too."""
    from repq_mm.mm.export import check_failures
    q = tiny_net(4, 8, True)
    path = str(tmp_path / 'q.onnx')
    export_onnx(q, torch.zeros(1, 1, 32, 32), path, form=form)
    x = to_input(fmnist_images(8))
    ok = compare_onnx(q, path, x, optimized=True)
    assert not check_failures(ok), ok
    assert ok['within_one_step'] and max(s['max_diff'] for s in ok['act_codes'].values()) <= 1
    assert ok['free']['max_abs'] >= ok['max_abs'] >= 0 and ok['free']['act_codes']
    model = onnx.load(path)
    init = [i for i in model.graph.initializer
            if i.name.endswith(('weight_int8', 'weight_uint8'))][1]     # a 4-bit layer
    codes = onnx.numpy_helper.to_array(init).copy()
    codes.flat[:codes.size // 2] = -codes.flat[:codes.size // 2]     # a broken export
    init.CopyFrom(onnx.numpy_helper.from_array(codes, init.name))
    bad = str(tmp_path / 'bad.onnx')
    onnx.save(model, bad)
    res = compare_onnx(q, bad, x, optimized=True)
    fails = check_failures(res)
    assert any(f.startswith('graph as written') for f in fails), res
    assert any(f.startswith('optimised graph') for f in fails), res


def test_export_rejects_uninitialised_and_leaves_model_alone(tmp_path):
    net = convert_to_repq(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), w_bits=4, a_bits=4)
    with pytest.raises(ExportError, match='0.w_quant: LSQ quantizer is not initialised'):
        export_onnx(net.eval(), torch.zeros(1, 1, 8, 8), str(tmp_path / 'x.onnx'))
    assert not os.listdir(tmp_path)
    q = tiny_net()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    export_onnx(q, torch.zeros(1, 1, 32, 32), str(tmp_path / 'q.onnx'))
    after = q.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                  for k in before)
    assert not any('forward' in m.__dict__ or 'quantized_weight' in m.__dict__
                   for m in q.modules())
    assert sorted(os.listdir(tmp_path)) == ['q.onnx']


def test_per_channel_activation_quantizer(tmp_path):
    """Per-channel activation steps (not produced by QConfig, but valid LSQ): QDQ along
    axis 1, the sub-8-bit clamp as element-wise Min / Max with per-channel bounds."""
    from repq_mm.quant import LSQQuantizer
    torch.manual_seed(0)
    q = convert_to_repq(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)),
                        w_bits=4, a_bits=4)
    q[2].a_quant = LSQQuantizer(3, signed=False, per_channel=True, ch_axis=1,
                                num_channels=4)
    x = to_input(fmnist_images(3, 20))
    q.eval()(x)
    path = str(tmp_path / 'pc.onnx')
    export_onnx(q, x[:1], path, form='qdq')
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert 'Min' in ops and 'Max' in ops
    res = compare_onnx(q, path, x)
    assert res['max_abs'] <= 1e-5 and all(v['max_diff'] == 0
                                          for v in res['act_codes'].values())
    # fused form: per-channel QuantizeLinear, the range clamped on the integer codes; the
    # layer has no per-tensor integer input, so it stays float (said in a warning)
    path = str(tmp_path / 'pc_fused.onnx')
    with pytest.warns(UserWarning, match=r'1 quantized layer\(s\) stay float.*\b2\b'):
        info = export_onnx(q, x[:1], path)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert 'Min' not in ops and ops.count('Clip') == 2    # both 3-bit / 4-bit ranges
    assert [layer['kernel'] for layer in info['layers']] == ['ConvInteger', None]
    res = compare_onnx(q, path, x, optimized=True)
    assert res['max_abs'] <= 1e-5 and all(v['max_diff'] == 0
                                          for v in res['act_codes'].values())
    assert res['deployed']['within_one_step']


class _TwoHeads(nn.Module):
    """A detector-like module: shared trunk, a list of two outputs per call."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(RepVGGBlock(1, 8, stride=2, act=nn.ReLU()),
                                   RepVGGBlock(8, 8, act=nn.ReLU()))
        self.cls = nn.Conv2d(8, 3, 1)
        self.reg = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = self.trunk(x)
        return [self.cls(f), self.reg(f)], f.mean((2, 3))


def test_export_any_module_nested_outputs(tmp_path):
    torch.manual_seed(0)
    q = convert_to_repq(_TwoHeads(), w_bits=4, a_bits=4, per_channel=True)
    x = to_input(fmnist_images(4, 7))
    q.train()(x)
    q.eval()
    path = str(tmp_path / 'two.onnx')
    info = export_onnx(q, x[:1], path)
    assert info['output_names'] == ['output_0', 'output_1', 'output_2']
    assert info['weight_codes'] == 4
    # the trunk's second conv feeds three consumers, cls / reg are network outputs: no
    # QLinearConv possible, so they are ConvInteger; the first conv fuses
    assert [layer['kernel'] for layer in info['layers']] == \
        ['QLinearConv', 'ConvInteger', 'ConvInteger', 'ConvInteger']
    k = count_kernels(path)
    assert k['ops']['QLinearConv'] == 1 and k['ops']['ConvInteger'] == 3 and k['float'] == 0
    res = compare_onnx(q, path, x, optimized=True)
    assert res['num_outputs'] == 3 and res['max_abs'] <= res['one_step']
    assert len(res['act_codes']) == 4 and all(v['max_diff'] <= 1
                                              for v in res['act_codes'].values())
    assert res['deployed']['within_one_step'] and all(
        v['max_diff'] <= 1 for v in res['deployed']['act_codes'].values())


# --------------------------------------------------------------------------------------
# the tool on an mmpretrain classifier
# --------------------------------------------------------------------------------------
def _tool():
    spec = importlib.util.spec_from_file_location(
        'repq_tool_export_onnx', osp.join(ROOT, 'tools', 'export_onnx.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ARCH = dict(
    type='ImageClassifier',
    backbone=dict(type='RepVGG', in_channels=1, base_channels=16,
                  arch=dict(num_blocks=[1, 1, 1, 1], width_factor=[0.5] * 4,
                            group_layer_map=None, se_cfg=None),
                  out_indices=(3, )),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=10, in_channels=64,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0), topk=(1, )))


def test_export_tool_mmpretrain_classifier(tmp_path):
    pytest.importorskip('mmpretrain')
    import cv2
    from mmengine.registry import MODELS, init_default_scope

    from repq_mm.mm import calibrate_lsq
    tool = _tool()
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    dp = dict(num_classes=10, mean=[72.94], std=[90.02], to_rgb=False)
    repq = dict(w_bits=4, a_bits=4, bn_mode='est', per_channel=True, first_bits=8,
                last_bits=8)
    model = MODELS.build(dict(type='RepQModel', architecture=ARCH, repq=repq,
                              data_preprocessor=dp))
    imgs = fmnist_images(16)
    batches = [dict(inputs=[torch.from_numpy(np.pad(im, 2))[None] for im in imgs[i:i + 8]])
               for i in (0, 8)]
    calibrate_lsq(model, batches, 2)
    ckpt = str(tmp_path / 'qat.pth')
    torch.save({'state_dict': model.state_dict()}, ckpt)
    paths = []
    for i, im in enumerate(fmnist_images(6, 500)):
        d = tmp_path / 'val' / f'class{i % 3}'
        d.mkdir(parents=True, exist_ok=True)
        paths.append(str(d / f'img{i}.png'))
        cv2.imwrite(paths[-1], im)
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(f"""
default_scope = 'mmpretrain'
custom_imports = dict(imports=['repq_mm'], allow_failed_imports=False)
model = dict(type='RepQModel', architecture={ARCH!r}, repq={repq!r})
data_preprocessor = {dp!r}
test_pipeline = [dict(type='LoadImageFromFile', color_type='grayscale'),
                 dict(type='RandomCrop', crop_size=32, padding=2), dict(type='PackInputs')]
val_dataloader = dict(batch_size=3, num_workers=0,
                      dataset=dict(type='CustomDataset', data_root={str(tmp_path / 'val')!r},
                                   pipeline=test_pipeline),
                      sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader
""")
    out, fp32 = str(tmp_path / 'out' / 'q.onnx'), str(tmp_path / 'out' / 'fp32.onnx')
    merged = str(tmp_path / 'merged')
    assert tool.main([str(cfg), ckpt, out, '--fp32-out', fp32, '--check', *paths,
                      '--merged-dir', merged]) == 0
    m, inits = _initializers(out)
    assert sum(k.endswith(('weight_int8', 'weight_uint8')) for k in inits) == 6
    assert m.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 1
    assert os.path.getsize(fp32) > os.path.getsize(out)
    assert sorted(os.listdir(tmp_path / 'out')) == ['fp32.onnx', 'q.onnx']
    assert sorted(os.listdir(merged)) == ['deploy_config.py', 'int_weights.pth', 'merged.pth']
    # merged checkpoints load with plain torch (no repq_mm / mmengine allowlist needed)
    code = ('import sys, torch; [torch.load(p, map_location="cpu", weights_only=True) '
            'for p in sys.argv[1:]]; print("ok")')
    proc = subprocess.run([sys.executable, '-c', code, osp.join(merged, 'merged.pth'),
                           osp.join(merged, 'int_weights.pth')], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr[-2000:]
    # the merge_quant output (deploy config + merged.pth) exports to the same network
    out3 = str(tmp_path / 'out' / 'from_merged.onnx')
    assert tool.main([osp.join(merged, 'deploy_config.py'), osp.join(merged, 'merged.pth'),
                      out3, '--check', *paths]) == 0
    x = torch.randn(4, 1, 32, 32)
    np.testing.assert_allclose(run_onnx(out, x)[0], run_onnx(out3, x)[0], rtol=0, atol=1e-6)

    # bad input: nothing written, exit status 1
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(open(ckpt, 'rb').read()[:1000])           # truncated
    out2 = str(tmp_path / 'out2' / 'q.onnx')
    assert tool.main([str(cfg), str(bad), out2]) == 1
    assert tool.main([str(cfg), ckpt, out2, '--input-shape', '1', '3', '32', '32',
                      '--check', *paths]) == 1                 # shape mismatch
    assert not osp.exists(out2) or not os.listdir(osp.dirname(out2))


# --------------------------------------------------------------------------------------
# deployment benchmark and onnxruntime accuracy tools
# --------------------------------------------------------------------------------------
def _load_tool(rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, osp.join(ROOT, *rel.split('/')))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_deploy_bench_quick(tmp_path):
    """``deploy_bench.py --quick``: the Fashion-MNIST model at W8A8 and W4A4 in the fused and
    the qdq form, the tree detector at W4A4 (small inputs): with the fused form every
    quantized layer is an integer kernel and none is left float, the export check passes,
    latency tables and the CPU are in results.md."""
    pytest.importorskip('mmpretrain')
    pytest.importorskip('mmdet')
    bench = _load_tool('tools/analysis_tools/deploy_bench.py', 'repq_tool_deploy_bench')
    out = bench.main(['--quick', '--models', 'fmnist', '--modes', 'w8a8,w4a4', '--forms',
                      'fused,qdq', '--threads', '1', '--repeats', '2',
                      '--out-dir', str(tmp_path / 'fm')])
    det = bench.main(['--quick', '--models', 'yolov6-trees', '--modes', 'w4a4', '--threads',
                      '1', '--repeats', '2', '--no-check', '--out-dir', str(tmp_path / 'det')])
    r = out['results'][0]
    assert r['model'] == 'fmnist'
    assert set(r['variants']) == {'w8a8 fused', 'w8a8 qdq', 'w4a4 fused', 'w4a4 qdq'}
    for vname, v in r['variants'].items():
        if v['form'] == 'fused':
            assert v['check']['passed'], (vname, v['check'])
            assert v['check']['codes_max_diff'] <= 1
            assert v['check']['deployed_codes_max_diff'] <= 1
            assert v['integer_kernels'] == v['quantized_layers'] == 23, (vname, v)
            assert v['float_kernels'] == 0 and None not in v['expected']
    assert r['variants']['w4a4 qdq']['integer_kernels'] == 0     # the float-Clip form
    assert r['variants']['w4a4 qdq']['float_kernels'] == 23
    d = det['results'][0]['variants']['w4a4']
    assert d['integer_kernels'] == d['quantized_layers'] == 62 and d['float_kernels'] == 0
    assert 'check' not in d
    for res in (r, det['results'][0]):
        for bs in ('1', '2'):
            t = res['latency'][bs]
            assert set(t) == {'fp32', *res['variants']}
            assert all(v['median_ms'] > 0 and v['n'] == 2 for v in t.values())
            assert t['fp32']['ratio'] == 1.0
    md = (tmp_path / 'fm' / 'results.md').read_text()
    assert out['machine']['cpu']['model'] in md and 'int8/FP32' in md
    saved = json.loads((tmp_path / 'fm' / 'results.json').read_text())
    assert saved['results'][0]['variants']['w4a4 fused']['integer_kernels'] == 23


def _calibrated_checkpoint(cfg_path: str, out: str, bits: dict, shape, n: int = 2) -> None:
    """A RepQ checkpoint of ``cfg_path`` (random weights, LSQ steps calibrated on random
    images): enough to exercise the tools end to end."""
    from mmengine.config import Config

    from repq_mm.mm import calibrate_lsq, cli
    from repq_mm.mm.pipeline import build_repq_model
    cfg = Config.fromfile(cfg_path)
    cli.prepare_cfg(cfg)
    torch.manual_seed(0)
    model = build_repq_model(cfg, bits)
    g = torch.Generator().manual_seed(0)
    batches = [dict(inputs=[torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
                            for _ in range(2)]) for _ in range(n)]
    calibrate_lsq(model, batches, n, logger=None)
    torch.save({'state_dict': model.state_dict()}, out)


@pytest.mark.skipif(not osp.isfile(FMNIST), reason='needs data/fashion_mnist')
def test_onnx_eval_fashion_mnist_subset(tmp_path):
    """``onnx_eval.py CONFIG CKPT MODEL.onnx --export --max-samples 64``: exports (checked on
    the first test batch), evaluates through onnxruntime with mmpretrain's Accuracy next to
    the PyTorch merged model; the two agree on (nearly) every label."""
    pytest.importorskip('mmpretrain')
    tool = _load_tool('tools/analysis_tools/onnx_eval.py', 'repq_tool_onnx_eval')
    cfg = osp.join(ROOT, 'configs', 'repvgg_fmnist', 'repvgg-A0w16_repq-bn_w4a4_fmnist.py')
    ckpt = str(tmp_path / 'q.pth')
    _calibrated_checkpoint(cfg, ckpt, {}, (1, 32, 32))
    onnx_path = str(tmp_path / 'q.onnx')
    res_path = str(tmp_path / 'res.json')
    assert tool.main([cfg, ckpt, onnx_path, '--export', '--max-samples', '64', '--threads',
                      '1', '--out', res_path]) == 0
    res = json.loads(open(res_path).read())
    assert res['samples'] == 64 and res['kind'] == 'cls' and res['optimized']
    key = 'accuracy/top1'
    assert key in res['onnx'] and key in res['torch']
    assert res['agreement'] >= 62 / 64 and abs(res['diff'][key]) <= 100 * 2 / 64
    # bad input: a missing ONNX file, exit status 1
    assert tool.main([cfg, ckpt, str(tmp_path / 'missing.onnx'), '--max-samples', '4']) == 1


TREES = osp.join(ROOT, 'data', 'trees', 'annotations', 'instances_val.json')


@pytest.mark.skipif(not osp.isfile(TREES), reason='needs data/trees')
def test_onnx_eval_tree_detector_subset(tmp_path):
    """The tree detector: onnxruntime head tensors through the head's own ``predict_by_feat``
    and mmdet's CocoMetric on two validation tiles, next to the PyTorch merged model."""
    pytest.importorskip('mmdet')
    from repq_mm.mm import cli
    from repq_mm.mm.export import evaluate_onnx, export_checkpoint
    from mmengine.config import Config
    cfg_path = osp.join(ROOT, 'configs', 'yolov6_trees', 'yolov6-n_repq-bn_w4a4_trees.py')
    ckpt = str(tmp_path / 'q.pth')
    _calibrated_checkpoint(cfg_path, ckpt, {}, (3, 416, 416), n=1)
    cfg = Config.fromfile(cfg_path)
    cli.prepare_cfg(cfg)
    onnx_path = str(tmp_path / 'det.onnx')
    export_checkpoint(cfg, ckpt, onnx_path, input_shape=(1, 3, 416, 416))
    res = evaluate_onnx(cfg, ckpt, onnx_path, max_samples=2, threads=1)
    assert res['samples'] == 2 and res['kind'] == 'det'
    assert 'coco/bbox_mAP' in res['onnx'] and 'coco/bbox_mAP' in res['torch']
    assert abs(res['diff']['coco/bbox_mAP']) <= 0.01


def test_dead_channel_bias_fits_int32(tmp_path):
    """An output channel with all-zero weights (LSQ drives its step to ~0): its int32 bias
    would overflow at s_a s_w; the export gives that channel a weight scale its bias fits
    (the weights stay 0) and stays exact. A live channel that overflows keeps its float bias
    behind ConvInteger in the fused form (exact) and is an error in the qdq form."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    q = convert_to_repq(net, w_bits=8, a_bits=8, per_channel=True)
    x = to_input(fmnist_images(4, 80))
    q.train()(x)
    q.eval()
    with torch.no_grad():
        q[0].weight[2].zero_()
        q[0].w_quant.step[2] = 1e-8          # a dead channel (the smallest LSQ step)
        q[0].bias[2] = 3.0                   # 3 / (s_a 1e-8) > 2^30
    s_a = float(q[0].a_quant.scale().detach())
    assert 3.0 / (s_a * 1e-8) > 2 ** 30
    path = str(tmp_path / 'dead.onnx')
    info = export_onnx(q, x[:1], path)
    assert info['layers'][0]['bias'] == 'int32'
    _, inits = _initializers(path)
    b_codes = onnx.numpy_helper.to_array(inits['0.bias_int32'])
    assert abs(int(b_codes[2])) == 2 ** 30 and np.abs(b_codes).max() == 2 ** 30
    res = compare_onnx(q, path, x, optimized=True)
    assert res['within_one_step'] and res['deployed']['within_one_step']
    assert all(v['max_diff'] <= 1 for v in res['act_codes'].values())
    with torch.no_grad():
        q[0].weight[2, 0, 0, 0] = 1e-8       # now a live channel (code 1): cannot fit
    # fused form: the layer keeps its float bias, added after ConvInteger (exact)
    with pytest.warns(UserWarning, match=r'0.w_quant: bias does not fit int32.*channel\(s\) '
                      r'\[2\].*stays float32'):
        info = export_onnx(q, x[:1], str(tmp_path / 'live.onnx'))
    assert info['layers'][0]['kernel'] == 'ConvInteger'
    assert info['layers'][0]['bias'] == 'float32'
    res = compare_onnx(q, str(tmp_path / 'live.onnx'), x, optimized=True)
    assert res['within_one_step'] and res['deployed']['within_one_step']
    assert count_kernels(str(tmp_path / 'live.onnx'))['float'] == 0
    # the qdq form with int32 biases cannot: an error naming the layer and the channel
    with pytest.raises(ExportError,
                       match=r'0.w_quant: bias does not fit int32.*channel\(s\) \[2\]'):
        export_onnx(q, x[:1], str(tmp_path / 'bad.onnx'), form='qdq', int32_bias=True)
