"""One suite for every registered re-parameterized block (``repq_mm.rep.REP_BLOCKS``).

For each block family and each configuration its class flags allow (stride 1/2, groups
1/2/depthwise, in == out and in != out), with randomised BN statistics and affine params:

a. eval: multi-branch output == ``to_deploy()`` output;
b. train: full-precision multi-branch forward == merged conv with exact batch statistics
   (outputs, gradients wrt input and every parameter, running statistics after the step);
c. the batch statistics RepQ-BN uses and the estimate RepQ-BNEst uses equal brute force
   (BN inputs from the module's own multi-branch forward; the estimate from the probed
   affine map feeding each BN); a provably exact case (depthwise 1x1) matches exactly; the
   BNEst error is measured and printed (it must shrink on larger iid inputs);
d. a trained quantized block deploys to a conv whose weight is the QAT quantized merged
   weight, on the integer grid, with the same output;
e. the RepQ forward gives every trainable parameter a finite gradient.

Run with ``OMP_NUM_THREADS=1``; the whole file takes about 15 s on one CPU thread.
"""
from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import make_input, randomize  # noqa: F401  (shared with test_properties)
from repq_mm.quant import QConfig
from repq_mm.rep import (REP_BLOCKS, AvgStage, ConvStage, IdentityStage, MaskStage,
                         MobileOneBlock, RepBlock, RepVGGBlock, ScaleStage)

BATCH = 3

# (in, out, stride, groups, input size); groups 'dw' means groups = in_channels
CONFIGS = [
    (4, 4, 1, 1, 7),
    (4, 8, 1, 1, 6),
    (6, 6, 2, 1, 9),
    (8, 8, 1, 2, 7),
    (4, 8, 2, 2, 8),
    (4, 4, 1, 'dw', 7),
    (6, 6, 2, 'dw', 9),
    (4, 8, 1, 'dw', 6),      # depthwise with channel multiplier
]

# non-default constructions worth covering (name, factory, in, size)
EXTRA = [
    ('RepVGGBlock-k1', lambda: RepVGGBlock(4, 4, kernel_size=1), 4, 6),
    ('MobileOneBlock-3conv', lambda: MobileOneBlock(4, 4, num_conv_branches=3), 4, 7),
    ('MobileOneBlock-dw-k1', lambda: MobileOneBlock(6, 6, kernel_size=1, groups=6,
                                                    num_conv_branches=2), 6, 6),
    ('ACBlock-k5', lambda: REP_BLOCKS['ACBlock'](4, 6, kernel_size=5, stride=2), 4, 9),
    ('DiverseBranchBlock-k5', lambda: REP_BLOCKS['DiverseBranchBlock'](4, 4, kernel_size=5),
     4, 8),
    ('ECBBlock-idt', lambda: REP_BLOCKS['ECBBlock'](4, 4, with_idt=True), 4, 7),
    ('RepConv-relu', lambda: REP_BLOCKS['RepConv'](4, 4, act=nn.ReLU()), 4, 7),
    ('OREPABlock-k1', lambda: REP_BLOCKS['OREPABlock'](4, 8, kernel_size=1), 4, 6),
]


def _cases():
    cases = []
    for name, cls in REP_BLOCKS.items():
        for cin, cout, stride, groups, size in CONFIGS:
            if stride != 1 and not cls.supports_stride:
                continue
            if groups != 1 and not cls.supports_groups:
                continue
            g = cin if groups == 'dw' else groups
            kw = {}
            if stride != 1:
                kw['stride'] = stride
            if g != 1:
                kw['groups'] = g
            cid = f'{name}-{cin}x{cout}-s{stride}-g{groups}'
            cases.append(pytest.param((cid, (lambda c=cls, a=(cin, cout), k=kw: c(*a, **k)),
                                       cin, size), id=cid))
    for cid, factory, cin, size in EXTRA:
        cases.append(pytest.param((cid, factory, cin, size), id=cid))
    return cases


CASES = _cases()
#: the cases whose block has a BN (the BN-statistics tests run on these; ECB has none)
BN_CASES = [c for c in CASES if c.values[0][1]().bns()]


def _seed(cid: str) -> int:
    return zlib.crc32(cid.encode())


def build(case, dtype=torch.float32):
    """Block (randomised) and input; ``dtype`` is the default dtype during construction,
    so fixed kernels (avg ``1/K^2``) are exact in that precision."""
    cid, factory, cin, size = case
    gen = torch.Generator().manual_seed(_seed(cid))
    torch.manual_seed(_seed(cid))
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        block = randomize(factory(), gen)
        return block, make_input(cin, size, gen), gen
    finally:
        torch.set_default_dtype(old)


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item()


def assert_close(a, b, rtol, atol=1e-6, what=''):
    err = (a - b).abs().max().item()
    bound = rtol * a.abs().max().item() + atol
    assert err <= bound, f'{what}: max|diff|={err:.3g} > {bound:.3g}'


def deploy_conv(deploy):
    return deploy[0] if isinstance(deploy, nn.Sequential) else deploy


# ---------------------------------------------------------------------------------------
# a. eval: multi-branch == deploy
@pytest.mark.parametrize('case', CASES)
def test_eval_matches_deploy(case):
    block, x, _ = build(case)
    block.eval()
    with torch.no_grad():
        y = block(x)
        y_dep = block.to_deploy()(x)
    assert y.shape == y_dep.shape
    assert_close(y, y_dep, 1e-5, what='deploy output')


# ---------------------------------------------------------------------------------------
# b. train: FP multi-branch == merged conv with exact batch statistics
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64], ids=['f32', 'f64'])
@pytest.mark.parametrize('case', CASES)
def test_train_fp_matches_repq_exact(case, dtype):
    fp, x, gen = build(case, dtype)
    fp.train()
    rq = copy.deepcopy(fp).enable_repq(QConfig(bn_mode='exact'), quantize=False)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = fp(x1), rq(x2)
    # f32: the brief's tolerances; f64: tight, catches small real mismatches
    rtol_y, rtol_g, floor = (1e-5, 1e-4, 1e-5) if dtype == torch.float32 else \
        (1e-10, 1e-9, 1e-11)
    assert_close(y1, y2, rtol_y, what='output')
    r = torch.randn(y1.shape, generator=gen, dtype=dtype)
    (y1 * r).sum().backward()
    (y2 * r).sum().backward()
    # absolute floor relative to the largest gradient of the block: a gradient that cancels
    # to almost zero (a weight in front of a BN, a BN in front of another BN) keeps the
    # rounding of its large terms (f32: up to ~5e-6 of the block's largest gradient)
    fp_grads = [x1.grad] + [p.grad for p in fp.parameters() if p.grad is not None]
    atol = floor * max(g.abs().max().item() for g in fp_grads)
    assert_close(x1.grad, x2.grad, rtol_g, atol, what='grad x')
    p2 = dict(rq.named_parameters())
    for name, p in fp.named_parameters():
        assert p.grad is not None and p2[name].grad is not None, name
        assert_close(p.grad, p2[name].grad, rtol_g, atol, what=f'grad {name}')
    b2 = dict(rq.named_buffers())
    for name, b in fp.named_buffers():
        if b.is_floating_point():
            assert_close(b, b2[name], rtol_y, what=f'buffer {name}')
        else:
            assert torch.equal(b, b2[name]), name


# ---------------------------------------------------------------------------------------
# c. BN statistics against brute force; BNEst vs exact batch statistics
# forward-only measurement: a less tiny input so border effects do not dominate
EST_SIZE, EST_BATCH = 16, 8


def run_recording(block, x, mode, **qkw):
    """Train-mode RepQ forward (no quantizers) with ``mode``; returns the output, the
    (mean, var) used by every BN in ``block.bns()`` order, and the block."""
    blk = copy.deepcopy(block).train().enable_repq(QConfig(bn_mode=mode, **qkw),
                                                   quantize=False)
    rec = []
    orig = blk._update_running    # every BN with batch statistics passes (mean, var) here

    def spy(bn, mean, var, n):
        rec.append((mean.detach(), var.detach()))
        return orig(bn, mean, var, n)
    blk._update_running = spy
    with torch.no_grad():
        y = blk(x)
    return y, rec, blk


def bn_inputs(block, x, stats):
    """Brute force, from the module's own multi-branch forward: the input of every BN
    (``bns()`` order) when every BN normalises with the given ``(mean, var)`` (set as the
    running statistics of ``block``, which is put in eval mode)."""
    ref = block.eval()
    seen = {}
    handles = []
    for i, bn in enumerate(ref.bns()):
        mean, var = stats[i]
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        handles.append(bn.register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(i, a[0].detach())))
    with torch.no_grad():
        ref.forward_branches(x)
    for h in handles:
        h.remove()
    return ref, [seen[i] for i in range(len(stats))]


def probe_affine(fn, cin, kernel, stride, padding):
    """``(W, B)`` of an affine map ``fn`` (N, cin, H, W) -> (N, O, H', W') that is a conv
    with ``kernel`` / ``stride`` / ``padding`` in the interior, from its Jacobian at one
    output position far from the border (no merge algebra involved)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    size = 3 * max(kh, kw) + 2 * max(ph, pw) + 4
    r = (max(kh, kw) + max(ph, pw)) // min(sh, sw) + 1
    x0 = torch.zeros(1, cin, size, size, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: fn(z)[0, :, r, r], x0)
    rows, cols = r * sh - ph, r * sw - pw
    W = jac[:, 0, :, rows:rows + kh, cols:cols + kw]
    with torch.no_grad():
        B = fn(x0)[0, :, r, r]
    return W, B


def bn_geometry(block):
    """``(kernel, stride, padding)`` of the affine map feeding every BN (``bns()`` order):
    the branch prefix up to its stage (``post_bn``: the block's)."""
    out = []
    for branch in block.branches:
        k, s, p = [1, 1], [1, 1], [0, 0]
        for st in branch:
            for d in (0, 1):
                k[d] = max(k[d], st.kernel_size[d])
                p[d] += st.padding[d]
                s[d] *= st.stride[d]
            if st.bn is not None:
                out.append((tuple(k), tuple(s), tuple(p)))
    if block.post_bn is not None:
        out.append((block.kernel_size, block.stride, block.padding))
    return out


def brute_kron(x, W, B, kernel, stride, padding):
    """The 'kron' estimate by brute force from the unfolded patches (float64): exact mean;
    variance ``sum_tt' R[t,t'] W_t^T C W_t'`` with ``C`` the centre tap's channel covariance
    and ``R`` the channel-summed tap-pair covariance, ``R[c,c] = 1``."""
    (kh, kw) = kernel
    n, c = x.shape[:2]
    cols = F.unfold(x.double(), kernel, padding=padding, stride=stride)     # N, C*K, L
    P = cols.reshape(n, c, kh * kw, -1).permute(0, 3, 1, 2).reshape(-1, c, kh * kw)
    M = P.mean(0)                                                            # C, K
    Z = P - M
    ctr = (kh // 2) * kw + kw // 2
    C = Z[:, :, ctr].t() @ Z[:, :, ctr] / Z.shape[0]
    R = torch.einsum('nit,nis->ts', Z, Z)
    R = R / R[ctr, ctr]
    Wf = W.reshape(W.shape[0], c, kh * kw)
    mean = torch.einsum('oit,it->o', Wf, M) + B
    var = torch.einsum('oit,ij,ojs,ts->o', Wf, C, Wf, R)
    return mean, var


def brute_force_stats(block, x, mode, **qkw):
    """For every BN: (recorded mean, var), brute-force exact (mean, var) of its input, the
    brute-force diagonal estimate ``(sum W m + B, sum W^2 v)`` from the probed affine map
    feeding it, and the brute-force 'kron' estimate (float64)."""
    _, rec, _ = run_recording(block, x, mode, **qkw)
    ref, inputs = bn_inputs(copy.deepcopy(block).double(), x.double(),
                            [(m.double(), v.double()) for m, v in rec])
    xv, xm = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    out = []
    for i, (bn, h) in enumerate(zip(ref.bns(), inputs)):
        def fn(z, i=i):
            seen = {}
            hk = ref.bns()[i].register_forward_pre_hook(
                lambda m, a: seen.__setitem__('h', a[0]))
            try:
                ref.forward_branches(z)
            finally:
                hk.remove()
            return seen['h']
        W, B = probe_affine(fn, block.in_channels, *bn_geometry(block)[i])
        v_ex, m_ex = torch.var_mean(h, dim=(0, 2, 3), unbiased=False)
        m_est = torch.einsum('oiuv,i->o', W, xm) + B
        v_est = torch.einsum('oiuv,i->o', W * W, xv)
        out.append((rec[i], (m_ex, v_ex), (m_est, v_est),
                    brute_kron(x, W, B, *bn_geometry(block)[i])))
    return out


def _close64(a, b, rtol, scale):
    return ((a.double() - b).abs() <= rtol * scale).all()


@pytest.mark.parametrize('case', CASES)
def test_bn_statistics_brute_force(case):
    """RepQ-BN uses the exact statistics of each BN's input and RepQ-BNEst exactly the
    diagonal estimate of repq-method.md section 3, both checked against brute force: the
    BN inputs from the module's own multi-branch forward, the estimate from the affine map
    feeding each BN, probed through its Jacobian (every block family, iid and
    feature-map-like inputs)."""
    block, _, gen = build(case)
    cid, _, cin, _ = case
    for kind in ('iid', 'corr'):
        x = make_input(cin, EST_SIZE, gen, kind, EST_BATCH)
        for (m, v), (m_ex, v_ex), _, _ in brute_force_stats(block, x, 'exact'):
            sd = v_ex.sqrt().max() + 1e-6
            assert _close64(m, m_ex, 1e-5, sd), (kind, 'exact mean')
            assert _close64(v, v_ex, 1e-5, v_ex.max() + 1e-6), (kind, 'exact var')
        for (m, v), _, (m_est, v_est), _ in brute_force_stats(block, x, 'est'):
            sd = v_est.sqrt().max() + 1e-6
            assert _close64(m, m_est, 1e-5, sd), (kind, 'est mean')
            assert _close64(v, v_est, 1e-5, v_est.max() + 1e-6), (kind, 'est var')
        for i, ((m, v), (m_ex, v_ex), _, (m_k, v_k)) in enumerate(
                brute_force_stats(block, x, 'est', est_stats='kron')):
            sd = v_ex.sqrt().max() + 1e-6
            assert _close64(m, m_ex, 1e-5, sd), (kind, i, 'kron mean is exact')
            assert _close64(m, m_k, 1e-5, sd), (kind, i, 'kron mean')
            # float32 quadratic form over K^2 tap pairs (measured up to 1.2e-5)
            assert _close64(v, v_k, 1e-4, v_k.max() + 1e-6), (kind, i, 'kron var')
            if bn_geometry(block)[i][0] == (1, 1):
                assert _close64(v, v_ex, 1e-5, v_ex.max() + 1e-6), (kind, i, '1x1 exact')


@pytest.mark.parametrize('factory', [
    lambda: RepVGGBlock(6, 6, kernel_size=1, groups=6),
    lambda: MobileOneBlock(6, 6, kernel_size=1, groups=6, num_conv_branches=2),
], ids=['RepVGG-dw1x1', 'MobileOne-dw1x1'])
def test_bnest_exact_for_depthwise_1x1(factory):
    """Each output channel depends on one input channel at one position, so the diagonal
    approximation drops nothing: est == exact even for correlated inputs."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    block = randomize(factory(), gen)
    x = make_input(6, 7, gen, 'corr')
    y_ex, rec_ex, b_ex = run_recording(block, x, 'exact')
    y_es, rec_es, b_es = run_recording(block, x, 'est')
    assert_close(y_ex, y_es, 1e-5, what='output')
    for (mx, vx), (me, ve) in zip(rec_ex, rec_es):
        assert_close(mx, me, 1e-5, what='mean')
        assert_close(vx, ve, 1e-5, what='var')
    for bx, be in zip(b_ex.bns(), b_es.bns()):
        assert_close(bx.running_mean, be.running_mean, 1e-5, what='running_mean')
        assert_close(bx.running_var, be.running_var, 1e-5, what='running_var')


def _est_var_error(block, x):
    """Median over BNs (with batch statistics) of the max relative variance error of
    BNEst against the exact statistics of the same input."""
    errs = [((v_est - v_ex).abs() / v_ex.clamp(min=1e-12)).max().item()
            for _, (_, v_ex), (_, v_est), _ in brute_force_stats(block, x, 'est')]
    return sorted(errs)[len(errs) // 2] if errs else 0.0


def test_bnest_error_table(capsys):
    """BNEst's variance error for the default configuration of every family, printed
    (visible without ``-s``). On iid inputs the diagonal approximation is exact up to
    zero padding and sampling noise, so the error must shrink on larger iid inputs; on
    feature-map-like (correlated) inputs it is what it is (measured, not bounded)."""
    lines = ['', 'BNEst variance error (median over BNs of max_c |V_est - V| / V): '
             'iid 8x8 batch 2 | iid 32x32 batch 8 | correlated 16x16 batch 8',
             f'| {"family":22s} | iid small | iid large | correlated |',
             '|' + '-' * 24 + '|-----------|-----------|------------|']
    for name, cls in REP_BLOCKS.items():
        gen = torch.Generator().manual_seed(_seed(name))
        torch.manual_seed(_seed(name))
        block = randomize(cls(4, 4), gen)
        if not block.bns():
            continue
        small = _est_var_error(block, make_input(4, 8, gen, 'iid', 2))
        large = _est_var_error(block, make_input(4, 32, gen, 'iid', 8))
        corr = _est_var_error(block, make_input(4, EST_SIZE, gen, 'corr', EST_BATCH))
        lines.append(f'| {name:22s} | {small:9.4f} | {large:9.4f} | {corr:10.4f} |')
        assert large < small, (name, small, large)
        assert math.isfinite(corr)
    with capsys.disabled():
        print('\n'.join(lines))


# ---------------------------------------------------------------------------------------
# d. a trained quantized block deploys exactly
@pytest.mark.parametrize('bn_mode,per_channel', [('exact', False), ('est', True)])
@pytest.mark.parametrize('case', CASES)
def test_quantized_deploy(case, bn_mode, per_channel):
    block, x, gen = build(case)
    block.train().enable_repq(QConfig(w_bits=4, a_bits=4, bn_mode=bn_mode,
                                      per_channel=per_channel))
    block(x)  # initialise the step sizes before building the optimizer
    opt = torch.optim.SGD(block.parameters(), lr=1e-2, momentum=0.9)
    steps0 = (block.w_quant.step.detach().clone(), block.a_quant.step.detach().clone())
    for _ in range(3):
        xb = x + 0.1 * torch.randn(x.shape, generator=gen)
        y = block(xb)
        loss = (y - torch.randn(y.shape, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(block.w_quant.step.detach(), steps0[0])
    assert not torch.equal(block.a_quant.step.detach(), steps0[1])

    block.eval()
    with torch.no_grad():
        y_qat = block(x)
        w, b = block.merge(None, 'running')
        wq = block.w_quant(w)
        deploy = block.to_deploy()
        y_dep = deploy(x)
    conv = deploy_conv(deploy)
    assert torch.equal(conv.weight, wq), 'deploy weight != Q_w(merged kernel)'
    assert torch.equal(conv.bias, b)
    s = block.w_quant.scale().detach()
    s = s.reshape(-1, 1, 1, 1) if per_channel else s
    codes = conv.weight / s
    assert (codes - codes.round()).abs().max() < 1e-4, 'deploy weight is off the grid'
    qn, qp = block.w_quant.qrange
    assert codes.round().min() >= -qn and codes.round().max() <= qp
    assert_close(y_qat, y_dep, 1e-5, what='QAT eval vs deploy')


# ---------------------------------------------------------------------------------------
# e. merge() is differentiable in every parameter
@pytest.mark.parametrize('bn_mode', ['exact', 'est'])
@pytest.mark.parametrize('case', CASES)
def test_every_parameter_gets_gradient(case, bn_mode):
    block, x, gen = build(case)
    block.train().enable_repq(QConfig(w_bits=4, a_bits=4, bn_mode=bn_mode))
    block.a_quant.enabled = False  # its step size gets no gradient, all others must
    y = block(x.requires_grad_())
    (y * torch.randn(y.shape, generator=gen)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in block.named_parameters():
        if name.startswith('a_quant.'):
            continue
        assert p.grad is not None, f'{name} gets no gradient'
        assert torch.isfinite(p.grad).all(), f'{name} has a non-finite gradient'


# ---------------------------------------------------------------------------------------
# construction checks
def _block(*branches, cin=4, cout=4, k=3, stride=1, groups=1):
    blk = RepBlock(cin, cout, k, stride, None, groups)
    for br in branches:
        blk.add_branch(*br)
    return blk


@pytest.mark.parametrize('branches,kw,match', [
    ([], {}, 'no branches'),
    ([[ConvStage(4, 4, 3, 1, 0)]], {}, 'not centred'),
    ([[ConvStage(4, 4, 1, 1, 1)]], {}, 'not centred'),
    ([[ConvStage(4, 4, 5, 1, 2)]], {}, 'not centred'),
    ([[ConvStage(4, 6, 3, 1, 1)]], {}, 'ends with 6 channels'),
    ([[ConvStage(4, 8, 1), ConvStage(6, 4, 3, 1, 1)]], {}, 'expects 6 input channels'),
    ([[ConvStage(4, 4, 3, 2, 1)]], {}, 'stride'),
    ([[ConvStage(4, 4, 3, 1, 1), ConvStage(4, 4, 3, 1, 1)]], {}, 'two non-1x1'),
    ([[ConvStage(4, 4, 3, 1, 1), ConvStage(4, 4, 1, 2, 0)]], {'stride': 2},
     'stride must be on the first stage'),
    ([[ConvStage(4, 4, 3, 1, 1, groups=1)]], {'groups': 2}, 'multiple of the block groups'),
    ([[ConvStage(4, 4, 3, 1, 1)], [AvgStage(4, 3, 1, 0)]], {}, 'branch 1'),
])
def test_check_rejects_bad_construction(branches, kw, match):
    blk = _block(*branches, **kw)
    with pytest.raises(ValueError, match=match):
        blk.check()


def test_check_accepts_valid_chains():
    _block([ConvStage(4, 8, 1, bias=True), ConvStage(8, 4, 3, 1, 1)],
           [ConvStage(4, 4, 1, bias=True), MaskStage(4, 'laplacian')],
           [IdentityStage(4), ScaleStage(4)], [ConvStage(4, 4, (1, 3), 1, (0, 1))]).check()


def test_family_constructor_errors():
    with pytest.raises(ValueError, match='square'):
        REP_BLOCKS['ACBlock'](4, 4, kernel_size=(1, 3))
    with pytest.raises(ValueError, match='divisible by groups'):
        REP_BLOCKS['DiverseBranchBlock'](4, 6, groups=4)


def test_mobileone_branch_order():
    """Checkpoint adapters rely on this order: conv branches, scale (1x1), identity."""
    blk = MobileOneBlock(4, 4, kernel_size=3, num_conv_branches=2)
    kinds = [(type(br[0]).__name__, br[0].kernel_size) for br in blk.branches]
    assert kinds == [('ConvStage', (3, 3)), ('ConvStage', (3, 3)), ('ConvStage', (1, 1)),
                     ('IdentityStage', (1, 1))]
    blk = MobileOneBlock(4, 8, stride=2, groups=4, use_scale=False)
    assert len(blk.branches) == 1


def test_channel_var_mean_gradient():
    """The custom one-pass backward equals autograd's through torch.var_mean."""
    from repq_mm.rep.stats import channel_var_mean
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    gv, gm = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    var, mean, n = channel_var_mean(x)
    assert n == 90
    g1, = torch.autograd.grad((var * gv).sum() + (mean * gm).sum(), x)
    var2, mean2 = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    g2, = torch.autograd.grad((var2 * gv).sum() + (mean2 * gm).sum(), x)
    assert torch.allclose(var, var2) and torch.allclose(mean, mean2)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: channel_var_mean(t)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: channel_var_mean(t)[1], (x,))


def test_channel_var_mean_dtypes():
    """Statistics in float32 (float64 for float64 input) whatever the input dtype, equal to
    torch.var_mean of the same values in float64; gradients in the input's dtype."""
    from repq_mm.rep.stats import channel_var_mean
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = (torch.randn(4, 5, 6, 7) * 3 + 1).to(dtype).requires_grad_()
        var, mean, _ = channel_var_mean(x)
        var2, mean2 = torch.var_mean(x.detach().double(), dim=(0, 2, 3), unbiased=False)
        want = torch.float64 if dtype == torch.float64 else torch.float32
        assert var.dtype == want and mean.dtype == want
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert torch.allclose(var.double(), var2, rtol=tol, atol=tol)
        assert torch.allclose(mean.double(), mean2, rtol=tol, atol=tol)
        (var.sum() + mean.sum()).backward()
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


@pytest.mark.parametrize('groups', [1, 2, 4])
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('with_bias', [True, False])
def test_fold_est_matches_autograd(groups, affine, with_bias):
    """The fused BNEst fold (values, running-stat inputs and every gradient) equals the
    composition of apply_to_channels and _fold under autograd; gradcheck in float64."""
    from repq_mm.rep.base import _fold
    from repq_mm.rep.fold_est import fold_est as _fold_est
    from repq_mm.rep.kernels import apply_to_channels
    gen = torch.Generator().manual_seed(groups * 10 + affine * 2 + with_bias)
    o, cin = 8, 4
    dt = torch.float64
    w = torch.randn(o, cin // groups, 3, 3, generator=gen, dtype=dt).requires_grad_()
    b = (torch.randn(o, generator=gen, dtype=dt).requires_grad_() if with_bias
         else torch.zeros(o, dtype=dt))
    m = torch.randn(cin, generator=gen, dtype=dt).requires_grad_()
    v = (torch.rand(cin, generator=gen, dtype=dt) + 0.5).requires_grad_()
    bn = nn.BatchNorm2d(o, affine=affine).double()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.normal_(generator=gen)
    wf, bf, mean, var = _fold_est(w, b, bn, m, v, groups)
    mean_r = apply_to_channels(w, m, groups) + b
    var_r = apply_to_channels(w * w, v, groups)
    wf_r, bf_r = _fold(w, b, bn, mean_r, var_r)[:2]
    assert torch.allclose(mean, mean_r.detach()) and torch.allclose(var, var_r.detach())
    assert not mean.requires_grad and not var.requires_grad
    assert torch.allclose(wf, wf_r) and torch.allclose(bf, bf_r)
    gw, gb = torch.randn(wf.shape, generator=gen, dtype=dt), torch.randn(o, generator=gen,
                                                                          dtype=dt)
    params = [t for t in (w, b, m, v, *bn.parameters()) if t.requires_grad]
    g1 = torch.autograd.grad((wf * gw).sum() + (bf * gb).sum(), params)
    g2 = torch.autograd.grad((wf_r * gw).sum() + (bf_r * gb).sum(), params)
    for a, r in zip(g1, g2):
        assert torch.allclose(a, r, rtol=1e-9, atol=1e-10)
    inputs = (w, b, m, v) + tuple(bn.parameters())
    assert torch.autograd.gradcheck(
        lambda *t: _fold_est(t[0], t[1], bn, t[2], t[3], groups)[:2], inputs)


@pytest.mark.parametrize('case', BN_CASES)
def test_merge_est_matches_generic(case):
    """BNEst through the hand-written nodes (fold_est / merge_est) equals the plain autograd
    composition: merged kernel and bias, every gradient, the running statistics."""
    block, x, gen = build(case)
    block = block.double().train()
    outs = []
    for fused in (True, False):
        blk = copy.deepcopy(block)
        blk.fused_est = fused
        xx = x.double().clone().requires_grad_(True)
        W, B = blk.merge(xx, 'est')
        gw = torch.randn(W.shape, generator=torch.Generator().manual_seed(1), dtype=W.dtype)
        gb = torch.randn(B.shape, generator=torch.Generator().manual_seed(2), dtype=B.dtype)
        params = [p for p in blk.parameters() if p.requires_grad]
        grads = torch.autograd.grad((W * gw).sum() + (B * gb).sum(), [xx] + params,
                                    allow_unused=True)
        stats = [t.clone() for bn in blk.bns() for t in (bn.running_mean, bn.running_var)]
        outs.append((W.detach(), B.detach(), grads, stats))
    (W1, B1, g1, s1), (W2, B2, g2, s2) = outs
    assert torch.allclose(W1, W2, rtol=1e-10, atol=1e-12)
    assert torch.allclose(B1, B2, rtol=1e-10, atol=1e-12)
    for a, r in zip(g1, g2):
        if r is None:       # unused in the composition: the fused node gives zeros or None
            assert a is None or not a.any()
            continue
        assert a is not None and torch.allclose(a, r, rtol=1e-9, atol=1e-10)
    for a, r in zip(s1, s2):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('case', BN_CASES)
def test_bnest_periodic_correction(case):
    """est_refresh=k: every k-th step uses (and learns from) exact statistics; on the same
    input the corrected estimate then reproduces the exact statistics."""
    block, x, _ = build(case)
    block.train()
    ref = copy.deepcopy(block).enable_repq(QConfig(bn_mode='exact'), quantize=False)
    blk = copy.deepcopy(block).enable_repq(QConfig(bn_mode='est', est_refresh=3),
                                           quantize=False)
    y_exact = ref(x)
    for step in range(4):   # steps 0 and 3 refresh; 1 and 2 use the corrected estimate
        y = blk(x)
        assert_close(y_exact, y, 1e-4, what=f'{case[0]} step {step}')
    sd = blk.state_dict()
    assert {'est_correction.ready', 'est_correction.var_ratio',
            'est_correction.mean_shift'} <= set(sd) and int(sd['est_correction.ready']) == 1
    assert sd['est_correction.var_ratio'].numel() == sum(bn.num_features
                                                         for bn in blk.bns())
    plain = copy.deepcopy(block).enable_repq(QConfig(bn_mode='est'), quantize=False)
    assert not any('est_correction' in k for k in plain.state_dict())
    # the correction survives a checkpoint: a fresh block loads it and is ready at once
    fresh = copy.deepcopy(block).enable_repq(QConfig(bn_mode='est', est_refresh=3),
                                             quantize=False)
    fresh.load_state_dict(sd)
    assert fresh.est_correction.is_ready


# ---------------------------------------------------------------------------------------
# f. a BN without running statistics cannot be deployed: refused at conversion
def test_bn_without_running_stats_refused():
    from repq_mm import convert_to_repq
    blk = RepVGGBlock(4, 4)
    blk.branches[1][0].bn = nn.BatchNorm2d(4, track_running_stats=False)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), blk)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match='track_running_stats=False'):
        convert_to_repq(net, w_bits=4, a_bits=4)
    # nothing half-converted
    assert type(net[0]) is nn.Conv2d and not blk.repq and blk.w_quant is None
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    # the full-precision multi-branch forward keeps working in eval (batch statistics)
    assert torch.isfinite(blk.eval()(torch.randn(2, 4, 5, 5))).all()
