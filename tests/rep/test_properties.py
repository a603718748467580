"""Property tests (hypothesis) over every block in ``repq_mm.rep.REP_BLOCKS``.

For random channel counts, groups (1, g, depthwise with channel multiplier; where the class
``supports_groups``), strides (where it ``supports_stride``), kernel sizes 1 / 3 / 5 (ECB:
its fixed 3x3 with random ``depth_multiplier`` / ``with_idt``), BN statistics and affine
parameters, input sizes and batch sizes:

1. eval: the merged deploy conv computes the multi-branch output (float32 rounding);
2. quantized (random 2..8 bits, per-tensor / per-channel, RepQ-BN / RepQ-BNEst, after a
   training-mode step): the deploy ``QConv2d`` output matches the QAT eval output within
   one quantization step (``s_a * max_o sum_i |W_q[o]|``: what one step of any input code
   changes an output by at most), and its weight is ``Q_w(M)`` on the integer grid.

A construction that the family refuses must raise ``ValueError`` (then the case is
discarded). Deterministic (``derandomize``), about 30 s on one thread.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from repq_mm.quant import QConfig
from repq_mm.rep import REP_BLOCKS

from helpers import make_input, randomize  # noqa: E402  (same randomisation)

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@st.composite
def block_case(draw, name: str):
    cls = REP_BLOCKS[name]
    if name == 'ECBBlock':
        cin, cout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        kw = dict(depth_multiplier=draw(st.sampled_from([0.5, 1.0, 2.0])),
                  with_idt=draw(st.booleans()))
        # int(depth_multiplier * out) == 0 builds a zero-channel expansion that ECBBlock
        # does not refuse (it fails at the first forward): not a valid geometry
        assume(int(kw['depth_multiplier'] * cout) >= 1)
        k = 3
    else:
        k = draw(st.sampled_from([1, 3, 5]))
        stride = draw(st.sampled_from([1, 2])) if cls.supports_stride else 1
        mode = draw(st.sampled_from(['1', 'g', 'dw'])) if cls.supports_groups else '1'
        if mode == 'g':
            g = draw(st.sampled_from([2, 3]))
            cin, cout = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
        elif mode == 'dw':
            cin = g = draw(st.integers(1, 6))
            cout = cin * draw(st.integers(1, 2))
        else:
            g, cin, cout = 1, draw(st.integers(1, 6)), draw(st.integers(1, 6))
        kw = dict(kernel_size=k, stride=stride, groups=g)
    size = draw(st.integers(max(k, 2), 9))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return cls, cin, cout, kw, size, batch, seed


def build(case):
    cls, cin, cout, kw, size, batch, seed = case
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    try:
        block = cls(cin, cout, **kw)
    except ValueError:          # a geometry the family refuses, with a clear error
        assume(False)
    randomize(block, gen)
    return block, make_input(cin, size, gen, batch=batch), gen


def close(a, b, rtol, atol=1e-6):
    return (a - b).abs().max().item() <= rtol * a.abs().max().item() + atol


NAMES = sorted(REP_BLOCKS)


@pytest.mark.parametrize('name', NAMES)
@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_deploy_equals_multi_branch(name, data):
    block, x, _ = build(data.draw(block_case(name)))
    block.eval()
    with torch.no_grad():
        y = block(x)
        y_dep = block.to_deploy()(x)
    assert y.shape == y_dep.shape
    assert close(y, y_dep, 1e-5), (y - y_dep).abs().max().item()


@pytest.mark.parametrize('name', NAMES)
@settings(max_examples=40, **SETTINGS)
@given(data=st.data(), w_bits=st.integers(2, 8), a_bits=st.integers(2, 8),
       per_channel=st.booleans(), bn_mode=st.sampled_from(['exact', 'est']),
       int_bias=st.booleans())
def test_quantized_deploy_equals_qat(name, data, w_bits, a_bits, per_channel,
                                          bn_mode, int_bias):
    block, x, gen = build(data.draw(block_case(name)))
    block.train().enable_repq(QConfig(w_bits=w_bits, a_bits=a_bits, bn_mode=bn_mode,
                                      per_channel=per_channel, int_bias=int_bias))
    with torch.no_grad():
        block(x + 0.1 * torch.randn(x.shape, generator=gen))   # init steps, update BN stats
        block.eval()
        y_qat = block(x)
        deploy = block.to_deploy()
        y_dep = deploy(x)
    conv = deploy[0] if isinstance(deploy, torch.nn.Sequential) else deploy
    s_w = block.w_quant.scale().detach()
    s_w = s_w.reshape(-1, 1, 1, 1) if per_channel else s_w
    codes = conv.weight / s_w
    qn, qp = block.w_quant.qrange
    assert (codes - codes.round()).abs().max() < 1e-3
    assert codes.round().min() >= -qn and codes.round().max() <= qp
    assert conv.int_bias == int_bias
    if int_bias:          # the bias on the int32 accumulator grid s_a s_w, in QAT and deploy
        b_codes = conv.bias / (block.a_quant.scale() * block.w_quant.scale()).reshape(-1)
        assert (b_codes - b_codes.round()).abs().max() <= 1e-3 * max(1, b_codes.abs().max())
    assert y_qat.shape == y_dep.shape
    # the deployed conv runs the very weight, bias and input quantizer of the QAT eval
    # forward: equal up to float rounding (not within a quantization step)
    assert (y_qat - y_dep).abs().max().item() <= 1e-6 * max(1.0, y_qat.abs().max().item())
