"""LSQ quantizer against the formulas of repq-method.md §4, computed by hand."""
import math

import pytest
import torch

from repq_mm.quant import LSQQuantizer, QConfig, QConv2d, QLinear, lsq_fake_quant, quant_range
from repq_mm.quant.lsq import check_bits


@pytest.mark.parametrize('bits', range(2, 9))
def test_ranges(bits):
    assert quant_range(bits, True) == (2 ** (bits - 1), 2 ** (bits - 1) - 1)
    assert quant_range(bits, True, symmetric=True) == (2 ** (bits - 1) - 1,) * 2
    assert quant_range(bits, False) == (0, 2 ** bits - 1)


@pytest.mark.parametrize('bad', [0, 1, 9, 33, -4, 2.5, '8', None, True])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match='bit width'):
        check_bits(bad)
    with pytest.raises(ValueError, match='bit width'):
        LSQQuantizer(bits=bad)


def test_hand_computed_forward_and_step_gradient():
    # 3 bits signed: Q_N = 4, Q_P = 3; s = 0.5
    v = torch.tensor([-3.0, -1.1, -0.2, 0.3, 0.74, 1.6, 2.0])
    s = torch.tensor([0.5], requires_grad=True)
    x = v.clone().requires_grad_(True)
    g = 1.0 / math.sqrt(v.numel() * 3)
    out = lsq_fake_quant(x, s, 4, 3, g, impl='reference')
    # v/s = [-6, -2.2, -0.4, 0.6, 1.48, 3.2, 4.0] -> clip [-4,3] -> round -> * s
    expected = torch.tensor([-2.0, -1.0, 0.0, 0.5, 0.5, 1.5, 1.5])
    assert torch.equal(out.detach(), expected)
    out.sum().backward()
    # dv_hat/dv: 1 inside [-4, 3], 0 outside
    assert torch.equal(x.grad, torch.tensor([0., 1., 1., 1., 1., 0., 0.]))
    # dv_hat/ds: round(v/s) - v/s inside, -Q_N below, Q_P above
    ds = [-4.0, -2 + 2.2, 0 + 0.4, 1 - 0.6, 1 - 1.48, 3.0, 3.0]
    assert s.grad.item() == pytest.approx(sum(ds) * g, rel=1e-6)


def test_fused_matches_reference_away_from_clip_edges():
    torch.manual_seed(0)
    for signed, bits in [(True, 4), (False, 8), (True, 2)]:
        qn, qp = quant_range(bits, signed)
        s0 = 0.1
        v = torch.randn(4000) * 0.3 + (0 if signed else 0.5)
        # keep away from the half-step zone above Q_P / below -Q_N where they differ
        r = v / s0
        v = v[((r < -qn - 0.5) | (r > -qn)) & ((r > qp + 0.5) | (r < qp))]
        outs = []
        for impl in ('fused', 'reference'):
            x = v.clone().requires_grad_(True)
            s = torch.tensor([s0], requires_grad=True)
            y = lsq_fake_quant(x, s, qn, qp, 0.01, impl=impl)
            (y * torch.linspace(-1, 1, y.numel())).sum().backward()
            outs.append((y.detach(), x.grad, s.grad))
        assert torch.allclose(outs[0][0], outs[1][0], atol=1e-6)
        assert torch.equal(outs[0][1], outs[1][1])
        assert torch.allclose(outs[0][2], outs[1][2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('per_channel', [False, True])
@pytest.mark.parametrize('signed,bits', [(True, 4), (False, 8), (True, 2), (True, 8)])
def test_fast_equals_reference(per_channel, signed, bits):
    """impl='fast' computes the paper formulas exactly: same output and the same input and
    step gradients as the autograd reference, including values at and beyond the clip edges
    and exact ties."""
    torch.manual_seed(bits + 10 * signed + 100 * per_channel)
    qn, qp = quant_range(bits, signed)
    x = torch.randn(6, 5, 4, 3) * (qp * 0.08) + (0 if signed else qp * 0.04)
    s = torch.rand(6) * 0.05 + 0.05 if per_channel else torch.tensor([0.07])
    sb = s.reshape(-1, 1, 1, 1) if per_channel else s
    # exact ties, the clip edges and the half-step zone beyond them
    edge = torch.tensor([-qn - 0.7, -qn - 0.5, -qn - 0.3, -qn, qp, qp + 0.3, qp + 0.5,
                         qp + 0.7, 0.5, 1.5, -2.5])
    x[0, 0, 0, :3] = edge[:3] * sb.flatten()[0]
    x[0, 1].view(-1)[:8] = edge[3:] * sb.flatten()[0]
    gout = torch.randn(x.shape)
    res = []
    for impl in ('fast', 'reference'):
        xx, ss = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
        y = lsq_fake_quant(xx, ss, qn, qp, 0.01, 0 if per_channel else None, impl=impl)
        (y * gout).sum().backward()
        res.append((y.detach(), xx.grad, ss.grad))
    (yf, gxf, gsf), (yr, gxr, gsr) = res
    assert torch.equal(yf, yr)
    assert torch.equal(gxf, gxr)
    assert gsf.shape == gsr.shape == s.shape
    assert torch.allclose(gsf, gsr, rtol=1e-5, atol=1e-7)


def test_fast_codes_equal_deploy_codes_and_half_inputs():
    """Training forward = codes * s of quantize_to_codes (bit for bit), also for half input."""
    torch.manual_seed(3)
    q = LSQQuantizer(4, signed=True, per_channel=True, impl='fast')
    w = torch.randn(8, 3, 3, 3)
    y = q(w)
    codes, s = q.quantize_to_codes(w)
    assert torch.equal(y, codes.float() * s.reshape(-1, 1, 1, 1))
    qa = LSQQuantizer(8, signed=False, impl='fast')
    xa = torch.rand(2, 3, 4, 4).half().requires_grad_(True)
    ya = qa(xa)
    assert ya.dtype == torch.float16
    ya.float().sum().backward()
    assert xa.grad.dtype == torch.float16 and qa.step.grad is not None


def test_unknown_impl():
    with pytest.raises(ValueError, match='impl must be one of'):
        LSQQuantizer(4, impl='cuda')
    with pytest.raises(ValueError, match='impl must be one of'):
        lsq_fake_quant(torch.randn(3), torch.tensor([0.1]), 8, 7, 0.1, impl='nope')


def test_per_channel_gradient_and_grad_scale():
    torch.manual_seed(1)
    w = torch.randn(3, 2, 3, 3)
    q = LSQQuantizer(4, signed=True, per_channel=True, impl='reference')
    wq = q(w)
    assert q.step.shape == (3,)
    # init: s0 = 2 mean|w_c| / sqrt(Q_P)
    s0 = 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(7)
    assert torch.allclose(q.step.detach(), s0)
    wq.sum().backward()
    g = 1 / math.sqrt(18 * 7)
    v = w / s0.reshape(-1, 1, 1, 1)
    ds = torch.where(v < -8, torch.full_like(v, -8.0),
                     torch.where(v > 7, torch.full_like(v, 7.0), torch.round(v) - v))
    assert torch.allclose(q.step.grad, ds.sum(dim=(1, 2, 3)) * g, rtol=1e-5, atol=1e-7)
    # the fused per-channel kernel gives the same forward and gradient here
    q2 = LSQQuantizer(4, signed=True, per_channel=True, impl='fused')
    wq2 = q2(w)
    wq2.sum().backward()
    assert torch.allclose(wq2, wq.detach(), atol=1e-6)
    assert torch.allclose(q2.step.grad, q.step.grad, rtol=1e-4, atol=1e-6)


def test_activation_init_and_auto_sign():
    q = LSQQuantizer(8, signed='auto')
    x = torch.rand(4, 3, 5, 5)
    q(x)
    assert not q.is_signed and q.qrange == (0, 255)
    assert q.step.item() == pytest.approx(2 * x.mean().item() / math.sqrt(255), rel=1e-5)
    # later batches do not re-initialise
    q(x * 100)
    assert q.step.item() == pytest.approx(2 * x.mean().item() / math.sqrt(255), rel=1e-5)
    q2 = LSQQuantizer(8, signed='auto')
    q2(x - 0.5)
    assert q2.is_signed and q2.qrange == (128, 127)


def test_state_dict_keeps_initialisation():
    q = LSQQuantizer(4, signed='auto', per_channel=True)
    q(torch.randn(5, 3) - 3)
    sd = q.state_dict()
    assert set(sd) == {'step', 'initialized', 'signed'}
    q2 = LSQQuantizer(4, signed='auto', per_channel=True)
    q2.load_state_dict(sd)
    assert q2.is_initialized and q2.is_signed and q2.step.shape == (5,)
    x = torch.randn(5, 3) * 10
    assert torch.equal(q2(x), q(x))       # no re-initialisation from x


def test_step_stays_positive_and_gets_gradient():
    q = LSQQuantizer(4)
    q(torch.randn(10))
    with torch.no_grad():
        q.step.fill_(-1.0)
    y = q(torch.randn(10))
    assert torch.isfinite(y).all()
    assert q.scale().item() > 0
    y.sum().backward()
    assert q.step.grad is not None and torch.isfinite(q.step.grad).all()


def test_step_parameter_itself_stays_valid():
    """An optimizer step that pushes the step size below zero is undone at the next
    training call: the parameter itself is clamped (not only its use), so the value the
    optimizer, the checkpoint and the export see is the one the forward uses."""
    torch.manual_seed(0)
    q = LSQQuantizer(4, per_channel=True, num_channels=3).train()
    w = torch.randn(3, 8)
    q(w)
    opt = torch.optim.SGD(q.parameters(), lr=100.0)
    q(w).sum().backward()
    with torch.no_grad():
        q.step.grad.fill_(1.0)          # a step that drives every step size negative
    opt.step()
    assert (q.step < 0).all()
    out = q(w)
    assert (q.step > 0).all() and torch.equal(q.scale().detach(), q.step.detach())
    assert torch.isfinite(out).all()
    q.eval()                            # eval leaves the parameter alone
    with torch.no_grad():
        q.step.fill_(-2.0)
    q(w)
    assert (q.step == -2.0).all()


def test_codes_reproduce_forward():
    torch.manual_seed(2)
    for per_channel in (False, True):
        q = LSQQuantizer(4, per_channel=per_channel)
        w = torch.randn(6, 4, 3, 3)
        wq = q(w)
        codes, s = q.quantize_to_codes(w)
        assert codes.dtype == torch.int8
        assert int(codes.min()) >= -8 and int(codes.max()) <= 7
        sb = s.reshape(-1, 1, 1, 1) if per_channel else s
        assert torch.equal(codes.float() * sb, wq.detach())


def test_quantized_layers_and_disabled_equivalence():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    fc = torch.nn.Linear(6, 2)
    qc = QConv2d.from_float(conv, QConfig(w_bits=8, a_bits=8))
    ql = QLinear.from_float(fc, QConfig(w_bits=8, a_bits=8))
    x = torch.randn(2, 3, 5, 5)
    for q in (qc.w_quant, qc.a_quant, ql.w_quant, ql.a_quant):
        q.enabled = False
    assert torch.equal(qc(x), conv(x))
    z = torch.randn(2, 6)
    assert torch.equal(ql(z), fc(z))
    for q in (qc.w_quant, qc.a_quant):
        q.enabled = True
    y8 = qc(x)
    assert (y8 - conv(x)).abs().max() < 0.1 * conv(x).abs().max()


def test_eval_weight_cache_tracks_updates():
    qc = QConv2d.from_float(torch.nn.Conv2d(2, 2, 1), QConfig(w_bits=4, a_bits=8)).eval()
    x = torch.rand(1, 2, 3, 3)
    with torch.no_grad():
        y1 = qc(x)
        assert torch.equal(qc(x), y1)
        qc.weight.mul_(2)          # in-place update bumps the version: cache must refresh
        y2 = qc(x)
    assert not torch.equal(y1, y2)


def test_eval_weight_cache_tracks_quantizer_settings():
    """Disabling the weight quantizer or changing its bit width takes effect in eval at
    once (the cache is keyed on the quantizer's settings too), for plain layers and rep
    blocks alike."""
    from repq_mm.rep import RepVGGBlock
    torch.manual_seed(0)
    qc = QConv2d.from_float(torch.nn.Conv2d(3, 4, 3), QConfig(w_bits=8, a_bits=8)).eval()
    blk = RepVGGBlock(3, 3).enable_repq(QConfig(w_bits=8, a_bits=8)).eval()
    x = torch.rand(2, 3, 6, 6)
    for layer in (qc, blk):
        with torch.no_grad():
            y_8 = layer(x)
            layer.w_quant.enabled = False
            y_off = layer(x)
            layer.w_quant.enabled = True
            assert torch.equal(layer(x), y_8)
            layer.w_quant.bits = 2       # same step, 4 levels: most weights clip
            y_2 = layer(x)
        assert not torch.equal(y_off, y_8) and not torch.equal(y_2, y_8)
        layer.w_quant.enabled = False
        with torch.no_grad():
            assert torch.equal(layer(x), y_off)
        # 8 bits is much closer to the unquantized weight than 2 bits
        assert (y_8 - y_off).abs().max() < (y_2 - y_off).abs().max()


def test_mse_init_minimises_error():
    from repq_mm.quant.lsq import mse_step
    torch.manual_seed(3)
    x = torch.randn(4096) * 2
    qn, qp = quant_range(8, True)
    s = mse_step(x, qn, qp)

    def err(step):
        return ((torch.round(x / step).clamp(-qn, qp) * step - x) ** 2).sum().item()
    lsq = 2 * x.abs().mean() / math.sqrt(qp)
    assert err(s) < err(lsq)
    # no candidate on a fine grid around it is better by more than the grid resolution
    assert all(err(s) <= err(s * f) * 1.02 for f in (0.9, 0.95, 1.05, 1.1))
    q = LSQQuantizer(4, per_channel=True, init='mse', num_channels=3)
    w = torch.randn(3, 2, 3, 3) * torch.tensor([0.1, 1.0, 10.0]).reshape(3, 1, 1, 1)
    q(w)
    assert torch.allclose(q.step.detach(), mse_step(w, 8, 7, 0))
    with pytest.raises(ValueError, match='init'):
        LSQQuantizer(8, init='max')


def test_eval_cache_with_int_bias_tracks_the_input_quantizer():
    """With ``int_bias`` the cached merged bias depends on the input quantizer's step:
    changing it, or disabling the input quantizer, takes effect in eval at once, and the
    output equals a fresh computation (no stale cached bias)."""
    import copy

    from repq_mm.rep import RepVGGBlock
    torch.manual_seed(0)
    blk = RepVGGBlock(3, 4).enable_repq(QConfig(w_bits=4, a_bits=4, int_bias=True))
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        blk.train()(x)                    # initialise the step sizes
        for bn in blk.bns():              # BN biases well away from zero
            bn.bias.normal_()
            bn.running_mean.normal_()
        blk.eval()
        b0 = blk._merged_quantized(blk.a_quant(x))[1]
        assert b0.abs().min() > 0
        blk.a_quant.step.mul_(3.7)        # another accumulator grid s_a s_w
        b1 = blk._merged_quantized(blk.a_quant(x))[1]
        ref = copy.deepcopy(blk)
        ref.__dict__['_wcache'] = None
        assert torch.equal(b1, ref._merged_quantized(ref.a_quant(x))[1])
        assert not torch.equal(b0, b1)
        blk.a_quant.enabled = False       # no integer accumulator: the bias as merged
        b2 = blk._merged_quantized(x)[1]
        assert torch.equal(b2, blk.merge(None, 'running')[1])
