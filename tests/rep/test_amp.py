"""Mixed precision (CPU autocast, bfloat16 and float16) for every registered block, BN mode
and method.

Every block family x ``bn_mode`` (``exact``, ``est``, ``est`` with ``est_refresh``) x method
(``repq``: the RepQ block; ``lsq``: merged then LSQ-quantized; ``ptq``: the ``lsq`` form
calibrated and evaluated) runs forward and backward under ``torch.autocast('cpu')``: finite
gradients for every trainable parameter, BN statistics and folds in float32, outputs within
the reduced precision's tolerance of the float32 computation.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from repq_mm import convert_to_repq, merge_model
from repq_mm.calib import calibrate_lsq
from repq_mm.quant import QConfig
from repq_mm.rep import REP_BLOCKS

DTYPES = {'bf16': torch.bfloat16, 'f16': torch.float16}
#: relative output tolerance against float32 (a few steps of the dtype's precision through
#: two quantizers and one conv)
TOL = {'bf16': 0.08, 'f16': 0.01}
MODES = {'exact': dict(bn_mode='exact'), 'est': dict(bn_mode='est'),
         'est_refresh': dict(bn_mode='est', est_refresh=2)}


def _block(name, **qkw):
    torch.manual_seed(0)
    blk = REP_BLOCKS[name](4, 4)
    with torch.no_grad():
        for bn in blk.bns():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    return blk


def _input():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(4, 4, 8, 8, generator=gen) + 0.5


def _train_steps(model, x, dtype, steps=3):
    """``steps`` forward / backward passes (autocast when ``dtype``); returns the outputs
    and the gradients of the last step."""
    outs = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=dtype, enabled=dtype is not None):
            y = model(x)
        y.float().square().mean().backward()
        outs.append(y.detach().float())
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return outs, grads


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize('dt', list(DTYPES))
@pytest.mark.parametrize('mode', list(MODES))
@pytest.mark.parametrize('name', list(REP_BLOCKS))
def test_repq_block_under_autocast(name, mode, dt):
    qcfg = QConfig(w_bits=8, a_bits=8, **MODES[mode])
    ref = _block(name).train().enable_repq(qcfg)
    x = _input()
    ref(x)                                        # initialise the step sizes in float32
    amp = copy.deepcopy(ref)
    stats = []
    orig = amp._update_running
    amp._update_running = lambda bn, m, v, n: (stats.append((m.dtype, v.dtype)),
                                               orig(bn, m, v, n))
    out_ref, g_ref = _train_steps(ref, x, None)
    out_amp, g_amp = _train_steps(amp, x, DTYPES[dt])
    assert all(s == (torch.float32, torch.float32) for s in stats) and (stats or not
                                                                          amp.bns())
    for o, r in zip(out_amp, out_ref):
        assert torch.isfinite(o).all()
        assert _rel(o, r) <= TOL[dt], (name, mode, dt, _rel(o, r))
    assert set(g_amp) == set(g_ref)
    for k, g in g_amp.items():
        assert g is not None and torch.isfinite(g).all(), (name, mode, dt, k)
        assert g.dtype == torch.float32, k
    for bn_a, bn_r in zip(amp.bns(), ref.bns()):
        assert bn_a.running_mean.dtype == torch.float32
        assert torch.allclose(bn_a.running_mean, bn_r.running_mean, rtol=0.05, atol=0.05)


@pytest.mark.parametrize('dt', list(DTYPES))
@pytest.mark.parametrize('method', ['lsq', 'ptq'])
@pytest.mark.parametrize('name', list(REP_BLOCKS))
def test_merged_methods_under_autocast(name, method, dt):
    """The LSQ baseline (merged, then LSQ QAT) trains, and PTQ (the same form) calibrates
    and evaluates, under autocast."""
    fp = _block(name).eval()
    net = nn.Sequential(fp, nn.ReLU(), nn.Conv2d(4, 3, 1))
    q = convert_to_repq(merge_model(net), w_bits=8, a_bits=8, per_channel=True)
    x = _input()
    with torch.autocast('cpu', dtype=DTYPES[dt]):
        calibrate_lsq(q, [x], q, num_batches=1)
    assert all(m.is_initialized for m in q.modules() if hasattr(m, 'is_initialized'))
    ref = copy.deepcopy(q)
    if method == 'lsq':
        q.train()
        ref.train()
        out, grads = _train_steps(q, x, DTYPES[dt])
        out_ref, _ = _train_steps(ref, x, None)
        assert grads and all(torch.isfinite(g).all() for g in grads.values())
    else:
        q.eval()
        ref.eval()
        with torch.no_grad(), torch.autocast('cpu', dtype=DTYPES[dt]):
            out = [q(x).float()]
        with torch.no_grad():
            out_ref = [ref(x)]
    for o, r in zip(out, out_ref):
        assert torch.isfinite(o).all()
        assert _rel(o, r) <= TOL[dt] * 2, (name, method, dt, _rel(o, r))
