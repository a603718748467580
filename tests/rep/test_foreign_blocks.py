"""Adapters for the rep blocks of the original authors' repositories (``repq_mm.convert``):
Apple's ``MobileOneBlock``, ACNet's ``ACBlock``, DBB's ``DiverseBranchBlock`` and RepVGG's
``RepVGGplusBlock``; and the look-alike warning.

The foreign blocks below are minimal re-implementations written for these tests: the same
attribute names, forward and deploy-conversion semantics as the published code (read from
apple/ml-mobileone ``mobileone.py``, DingXiaoH/ACNet ``acnet/acb.py`` and the crop-layer
version in DingXiaoH/DiverseBranchBlock ``acb.py``, DingXiaoH/DiverseBranchBlock
``diversebranchblock.py`` / ``dbb_transforms.py``, DingXiaoH/RepVGG ``repvggplus.py``), each
with its own deploy conversion (``switch_to_deploy`` / ``reparameterize``) that the merge is
compared against.

For each family: eval output of ``convert_to_repq(quantize=False)`` == original; one
training step (``bn_mode='exact'``) == original's (outputs, gradients, running statistics),
except DBB's border padding (tested as documented, with and without ``pad_stats='running'``);
``merge_model`` == the original's deploy conversion; every Parameter / buffer / BN of the
original is reused; a quantized conversion merges into one ``QConv2d`` per block.

Run with ``OMP_NUM_THREADS=1``; tiny shapes, a few seconds on one CPU thread.
"""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repq_mm import convert_to_repq, merge_model
from repq_mm.convert import (FOREIGN_BLOCKS, ForeignRepBlock, LookAlikeWarning,
                             RepVGGplusDeployed, RepVGGplusRepBlock, find_rep_blocks,
                             set_pad_stats)
from repq_mm.quant import QConv2d
from repq_mm.rep.foreign_stages import (BNPadAvgStage, BNPadConvStage, CroppedConvStage,
                                        IdentityBasedConvStage)


# --------------------------------------------------------------------------------------
# shared pieces of the re-implementations
# --------------------------------------------------------------------------------------
def conv_bn(cin, cout, k, stride=1, padding=0, groups=1):
    seq = nn.Sequential()
    seq.add_module('conv', nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    seq.add_module('bn', nn.BatchNorm2d(cout))
    return seq


def fold(kernel, bn):
    """(kernel, bias) of ``bn(conv(x))`` with running statistics (the originals' fusion)."""
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    return kernel * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def centre(kernel, size):
    """Zero-pad a kernel centrally to ``size`` x ``size``."""
    ph, pw = (size - kernel.shape[2]) // 2, (size - kernel.shape[3]) // 2
    return F.pad(kernel, [pw, pw, ph, ph])


def dense_identity(channels, groups, k):
    """The identity as a grouped k x k kernel."""
    w = torch.zeros(channels, channels // groups, k, k)
    for i in range(channels):
        w[i, i % (channels // groups), k // 2, k // 2] = 1.0
    return w


def one_then_kxk(k1, b1, k2, b2, groups):
    """(kernel, bias) of conv k2 (+b2) after 1x1 conv k1 (+b1), both with ``groups``."""
    d, o = k1.shape[0], k2.shape[0]
    parts_k, parts_b = [], []
    for g in range(groups):
        a = k1[g * d // groups:(g + 1) * d // groups, :, 0, 0]           # (d/g, in/g)
        bk = k2[g * o // groups:(g + 1) * o // groups]                     # (o/g, d/g, k, k)
        parts_k.append(torch.einsum('odhw,di->oihw', bk, a))
        parts_b.append((bk.sum((2, 3)) * b1[g * d // groups:(g + 1) * d // groups]).sum(1))
    return torch.cat(parts_k), torch.cat(parts_b) + b2


def deployed_conv(like: nn.Conv2d, kernel, bias):
    conv = nn.Conv2d(like.in_channels, like.out_channels, like.kernel_size, like.stride,
                     like.padding, groups=like.groups, bias=True)
    conv.weight.data, conv.bias.data = kernel.detach().clone(), bias.detach().clone()
    return conv


class SEBlock(nn.Module):
    """Squeeze-excitation on 1x1 convs (as the originals' SEBlock)."""

    def __init__(self, c, r=4):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        w = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return x * w


# --------------------------------------------------------------------------------------
# apple/ml-mobileone MobileOneBlock
# --------------------------------------------------------------------------------------
class AppleMobileOneBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1,
                 inference_mode=False, use_se=False, num_conv_branches=1):
        super().__init__()
        self.inference_mode = inference_mode
        self.groups, self.stride, self.kernel_size = groups, stride, kernel_size
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_conv_branches = num_conv_branches
        self.se = SEBlock(out_channels) if use_se else nn.Identity()
        self.activation = nn.ReLU()
        self.rbr_skip = nn.BatchNorm2d(in_channels) \
            if in_channels == out_channels and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)
            for _ in range(num_conv_branches))
        self.rbr_scale = conv_bn(in_channels, out_channels, 1, stride, 0, groups) \
            if kernel_size > 1 else None

    def forward(self, x):
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        out = (0 if self.rbr_scale is None else self.rbr_scale(x)) + \
            (0 if self.rbr_skip is None else self.rbr_skip(x))
        for i in range(self.num_conv_branches):
            out += self.rbr_conv[i](x)
        return self.activation(self.se(out))

    @torch.no_grad()
    def reparameterize(self):
        k = self.kernel_size
        kernel, bias = 0, 0
        for branch in self.rbr_conv:
            kb = fold(branch.conv.weight, branch.bn)
            kernel, bias = kernel + kb[0], bias + kb[1]
        if self.rbr_scale is not None:
            ks, bs = fold(self.rbr_scale.conv.weight, self.rbr_scale.bn)
            kernel, bias = kernel + centre(ks, k), bias + bs
        if self.rbr_skip is not None:
            ki, bi = fold(dense_identity(self.in_channels, self.groups, k), self.rbr_skip)
            kernel, bias = kernel + ki, bias + bi
        self.reparam_conv = deployed_conv(self.rbr_conv[0].conv, kernel, bias)
        del self.rbr_conv, self.rbr_scale, self.rbr_skip
        self.inference_mode = True


# --------------------------------------------------------------------------------------
# DingXiaoH/ACNet ACBlock (master: `crop`; the DBB repository's version: crop layers)
# --------------------------------------------------------------------------------------
class CropLayer(nn.Module):
    def __init__(self, rows, cols):
        super().__init__()
        self.rows_to_crop, self.cols_to_crop = rows, cols

    def forward(self, x):
        r, c = self.rows_to_crop, self.cols_to_crop
        return x[:, :, r:x.shape[2] - r, c:x.shape[3] - c]


class ACNetACBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1,
                 use_affine=True, use_last_bn=False, nonlinear=None, crop_layers=False):
        super().__init__()
        self.deploy = False
        if nonlinear is not None:
            self.nonlinear = nonlinear
        k, p = kernel_size, padding
        self.square_conv = nn.Conv2d(in_channels, out_channels, (k, k), stride, p,
                                     groups=groups, bias=False)
        self.square_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        off = p - k // 2
        if crop_layers:                        # the version with CropLayer modules
            crop = max(-off, 0)
            self.ver_conv_crop_layer = CropLayer(0, crop) if crop else nn.Identity()
            self.hor_conv_crop_layer = CropLayer(crop, 0) if crop else nn.Identity()
            ver_pad, hor_pad = (p, max(off, 0)), (max(off, 0), p)
        elif off >= 0:
            self.crop = 0
            ver_pad, hor_pad = (p, off), (off, p)
        else:
            self.crop = -off
            ver_pad, hor_pad = (p, 0), (0, p)
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (k, 1), stride, ver_pad,
                                  groups=groups, bias=False)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, k), stride, hor_pad,
                                  groups=groups, bias=False)
        self.ver_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        self.hor_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        if use_last_bn:
            self.last_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        if self.deploy:
            out = self.fused_conv(x)
        else:
            if hasattr(self, 'crop'):
                c = self.crop
                ver_in = x[:, :, :, c:x.shape[3] - c] if c else x
                hor_in = x[:, :, c:x.shape[2] - c, :] if c else x
            else:
                ver_in, hor_in = self.ver_conv_crop_layer(x), self.hor_conv_crop_layer(x)
            out = self.square_bn(self.square_conv(x)) + self.ver_bn(self.ver_conv(ver_in)) + \
                self.hor_bn(self.hor_conv(hor_in))
            if hasattr(self, 'last_bn'):
                out = self.last_bn(out)
        return self.nonlinear(out) if hasattr(self, 'nonlinear') else out

    @torch.no_grad()
    def switch_to_deploy(self):
        k = self.square_conv.kernel_size[0]
        kernel, bias = fold(self.square_conv.weight, self.square_bn)
        for conv, bn in ((self.ver_conv, self.ver_bn), (self.hor_conv, self.hor_bn)):
            ka, ba = fold(conv.weight, bn)
            kernel, bias = kernel + centre(ka, k), bias + ba
        if hasattr(self, 'last_bn'):
            t = self.last_bn.weight / (self.last_bn.running_var + self.last_bn.eps).sqrt()
            kernel = kernel * t.reshape(-1, 1, 1, 1)
            bias = (bias - self.last_bn.running_mean) * t + self.last_bn.bias
            del self.last_bn
        self.fused_conv = deployed_conv(self.square_conv, kernel, bias)
        for n in ('square_conv', 'square_bn', 'ver_conv', 'ver_bn', 'hor_conv', 'hor_bn',
                  'ver_conv_crop_layer', 'hor_conv_crop_layer'):
            if hasattr(self, n):
                delattr(self, n)
        self.deploy = True


# --------------------------------------------------------------------------------------
# DingXiaoH/DiverseBranchBlock
# --------------------------------------------------------------------------------------
class IdentityBasedConv1x1(nn.Conv2d):
    def __init__(self, channels, groups=1):
        super().__init__(channels, channels, 1, 1, 0, groups=groups, bias=False)
        self.id_tensor = dense_identity(channels, groups, 1)
        nn.init.zeros_(self.weight)

    def forward(self, x):
        return F.conv2d(x, self.weight + self.id_tensor, None, 1, 0, 1, self.groups)

    def get_actual_kernel(self):
        return self.weight + self.id_tensor


class BNAndPadLayer(nn.Module):
    def __init__(self, pad_pixels, num_features):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, x):
        out = self.bn(x)
        p = self.pad_pixels
        if p > 0:
            bn = self.bn
            value = bn.bias.detach() - bn.running_mean * bn.weight.detach() / \
                torch.sqrt(bn.running_var + bn.eps)
            out = F.pad(out, [p] * 4)
            value = value.view(1, -1, 1, 1)
            out[:, :, :p, :] = value
            out[:, :, -p:, :] = value
            out[:, :, :, :p] = value
            out[:, :, :, -p:] = value
        return out


class DBBBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1,
                 internal_channels_1x1_3x3=None, nonlinear=None):
        super().__init__()
        assert padding == kernel_size // 2
        self.nonlinear = nonlinear if nonlinear is not None else nn.Identity()
        self.kernel_size, self.out_channels, self.groups = kernel_size, out_channels, groups
        k, p = kernel_size, padding
        self.dbb_origin = conv_bn(in_channels, out_channels, k, stride, p, groups)
        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module('conv', nn.Conv2d(in_channels, out_channels, 1, 1, 0,
                                                      groups=groups, bias=False))
            self.dbb_avg.add_module('bn', BNAndPadLayer(p, out_channels))
            self.dbb_avg.add_module('avg', nn.AvgPool2d(k, stride, 0))
            self.dbb_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module('avg', nn.AvgPool2d(k, stride, p))
        self.dbb_avg.add_module('avgbn', nn.BatchNorm2d(out_channels))
        d = internal_channels_1x1_3x3 or (in_channels if groups < out_channels
                                          else 2 * in_channels)
        self.dbb_1x1_kxk = nn.Sequential()
        if d == in_channels:
            self.dbb_1x1_kxk.add_module('idconv1', IdentityBasedConv1x1(in_channels, groups))
        else:
            self.dbb_1x1_kxk.add_module('conv1', nn.Conv2d(in_channels, d, 1, 1, 0,
                                                           groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module('bn1', BNAndPadLayer(p, d))
        self.dbb_1x1_kxk.add_module('conv2', nn.Conv2d(d, out_channels, k, stride, 0,
                                                       groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module('bn2', nn.BatchNorm2d(out_channels))

    def forward(self, x):
        if hasattr(self, 'dbb_reparam'):
            return self.nonlinear(self.dbb_reparam(x))
        out = self.dbb_origin(x)
        if hasattr(self, 'dbb_1x1'):
            out += self.dbb_1x1(x)
        out += self.dbb_avg(x)
        out += self.dbb_1x1_kxk(x)
        return self.nonlinear(out)

    @torch.no_grad()
    def switch_to_deploy(self):
        k, g, o = self.kernel_size, self.groups, self.out_channels
        kernel, bias = fold(self.dbb_origin.conv.weight, self.dbb_origin.bn)
        if hasattr(self, 'dbb_1x1'):
            k1, b1 = fold(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            kernel, bias = kernel + centre(k1, k), bias + b1
        seq = self.dbb_1x1_kxk
        first = seq.idconv1.get_actual_kernel() if hasattr(seq, 'idconv1') \
            else seq.conv1.weight
        ka, ba = fold(first, seq.bn1.bn)
        kb, bb = fold(seq.conv2.weight, seq.bn2)
        km, bm = one_then_kxk(ka, ba, kb, bb, g)
        kernel, bias = kernel + km, bias + bm
        avg = torch.zeros(o, o // g, k, k)
        for i in range(o):
            avg[i, i % (o // g)] = 1.0 / (k * k)
        kv, bv = fold(avg, self.dbb_avg.avgbn)
        if hasattr(self.dbb_avg, 'conv'):
            kc, bc = fold(self.dbb_avg.conv.weight, self.dbb_avg.bn.bn)
            kv, bv = one_then_kxk(kc, bc, kv, bv, g)
        kernel, bias = kernel + kv, bias + bv
        self.dbb_reparam = deployed_conv(self.dbb_origin.conv, kernel, bias)
        for n in ('dbb_origin', 'dbb_avg', 'dbb_1x1', 'dbb_1x1_kxk'):
            if hasattr(self, n):
                delattr(self, n)


# --------------------------------------------------------------------------------------
# DingXiaoH/RepVGG RepVGGplusBlock (forward(x, L2) -> (out, L2))
# --------------------------------------------------------------------------------------
class RepVGGplusBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1, groups=1, use_post_se=False):
        super().__init__()
        self.deploy, self.groups, self.in_channels = False, groups, in_channels
        self.nonlinearity = nn.ReLU()
        self.post_se = SEBlock(out_channels) if use_post_se else nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(out_channels) \
            if in_channels == out_channels and stride == 1 else None
        self.rbr_dense = conv_bn(in_channels, out_channels, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups)

    def forward(self, x, L2):
        if self.deploy:
            return self.post_se(self.nonlinearity(self.rbr_reparam(x))), None
        out = self.rbr_dense(x) + self.rbr_1x1(x) + \
            (0 if self.rbr_identity is None else self.rbr_identity(x))
        out = self.post_se(self.nonlinearity(out))
        d, s = self.rbr_dense, self.rbr_1x1
        t3 = (d.bn.weight / (d.bn.running_var + d.bn.eps).sqrt()).reshape(-1, 1, 1, 1).detach()
        t1 = (s.bn.weight / (s.bn.running_var + s.bn.eps).sqrt()).reshape(-1, 1, 1, 1).detach()
        k3, k1 = d.conv.weight, s.conv.weight
        circle = (k3 ** 2).sum() - (k3[:, :, 1:2, 1:2] ** 2).sum()
        eq = k3[:, :, 1:2, 1:2] * t3 + k1 * t1
        return out, L2 + circle + (eq ** 2 / (t3 ** 2 + t1 ** 2)).sum()

    @torch.no_grad()
    def switch_to_deploy(self):
        kernel, bias = fold(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        k1, b1 = fold(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        kernel, bias = kernel + centre(k1, 3), bias + b1
        if self.rbr_identity is not None:
            ki, bi = fold(dense_identity(self.in_channels, self.groups, 3), self.rbr_identity)
            kernel, bias = kernel + ki, bias + bi
        self.rbr_reparam = deployed_conv(self.rbr_dense.conv, kernel, bias)
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity
        self.deploy = True


class RepVGGplusStage(nn.Module):
    """Passes ``L2`` from block to block, as RepVGGplus' stages."""

    def __init__(self, *blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, L2):
        for blk in self.blocks:
            x, L2 = blk(x, L2)
        return x, L2


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
@torch.no_grad()
def randomize(model, seed=0):
    """Random non-trivial BN statistics / affine values and small non-zero
    IdentityBasedConv1x1 weights."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
        elif isinstance(m, IdentityBasedConv1x1):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
    return model


def make(cls, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize(cls(*args, **kwargs), seed)


def x_for(blk, size=7, n=3, seed=1):
    cin = getattr(blk, 'in_channels', None) or next(
        m for m in blk.modules() if isinstance(m, nn.Conv2d)).in_channels
    return torch.randn(n, cin, size, size, generator=torch.Generator().manual_seed(seed))


def call(blk, x):
    """Block output (RepVGGplus: ``(out, L2)`` -> both)."""
    if isinstance(blk, (RepVGGplusBlock, RepVGGplusRepBlock, RepVGGplusDeployed)):
        return blk(x, 0.0)
    return blk(x), None


def close(a, b, tol=1e-5):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


def bns(m):
    return [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]


# name -> (factory, input size, source family)
FAMILIES = {
    'mobileone-k3': (lambda: make(AppleMobileOneBlock, 4, 4, 3, 1, 1, num_conv_branches=3,
                                  use_se=True), 7, 'apple.MobileOneBlock'),
    'mobileone-dw-s2': (lambda: make(AppleMobileOneBlock, 6, 6, 3, 2, 1, groups=6,
                                     num_conv_branches=2), 8, 'apple.MobileOneBlock'),
    'mobileone-pw': (lambda: make(AppleMobileOneBlock, 4, 8, 1, 1, 0, num_conv_branches=2),
                     6, 'apple.MobileOneBlock'),
    'acnet-k3': (lambda: make(ACNetACBlock, 4, 6, 3, 1, 1, groups=2, use_last_bn=True),
                 7, 'acnet.ACBlock'),
    'acnet-crop': (lambda: make(ACNetACBlock, 4, 4, 3, 2, 0, nonlinear=nn.ReLU()), 9,
                   'acnet.ACBlock'),
    'acnet-croplayer': (lambda: make(ACNetACBlock, 4, 4, 3, 1, 0, crop_layers=True), 7,
                        'acnet.ACBlock'),
    'acnet-k5-pad3': (lambda: make(ACNetACBlock, 4, 4, 5, 1, 3), 7, 'acnet.ACBlock'),
    'dbb-k3': (lambda: make(DBBBlock, 4, 4, 3, 1, 1, nonlinear=nn.ReLU()), 7,
               'dbb.DiverseBranchBlock'),
    'dbb-s2-g2-internal': (lambda: make(DBBBlock, 4, 8, 3, 2, 1, groups=2,
                                        internal_channels_1x1_3x3=8), 8,
                           'dbb.DiverseBranchBlock'),
    'dbb-dw': (lambda: make(DBBBlock, 4, 4, 3, 1, 1, groups=4), 7, 'dbb.DiverseBranchBlock'),
    'repvggplus': (lambda: make(RepVGGplusBlock, 4, 4), 7, 'repvggplus.RepVGGplusBlock'),
    'repvggplus-se-s2': (lambda: make(RepVGGplusBlock, 4, 8, stride=2, use_post_se=True), 8,
                         'repvggplus.RepVGGplusBlock'),
}
# where the training form is the original's (DBB pads differently, see test_dbb_*)
TRAIN_EXACT = [k for k in FAMILIES if not k.startswith('dbb')]


def deploy(blk):
    blk = copy.deepcopy(blk)
    for fn in ('reparameterize', 'switch_to_deploy'):
        if hasattr(blk, fn):
            getattr(blk, fn)()
    return blk


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------
def test_every_new_family_is_registered():
    families = {src for _, _, src in FAMILIES.values()}
    assert families <= set(FOREIGN_BLOCKS)


@pytest.mark.parametrize('name', FAMILIES)
def test_eval_equal_and_everything_reused(name):
    factory, size, source = FAMILIES[name]
    ref = factory().eval()
    x = x_for(ref, size)
    params, buffers, bn_mods = list(ref.parameters()), list(ref.buffers()), bns(ref)
    with torch.no_grad():
        want = call(ref, x)
    blk = convert_to_repq(ref, quantize=False)       # root replaced: ref is left as it was
    assert isinstance(blk, ForeignRepBlock) and blk.source.startswith(source.split('.')[0])
    assert blk.repq and blk.w_quant is None
    # the very same Parameters, buffers and BN modules (no copies, nothing left out)
    assert {id(p) for p in blk.parameters()} == {id(p) for p in params}
    assert {id(b) for b in buffers} <= {id(b) for b in blk.buffers()}
    assert {id(b) for b in bns(blk)} == {id(b) for b in bn_mods}
    with torch.no_grad():
        got = call(blk.eval(), x)
    close(got[0], want[0])
    if want[1] is not None:
        close(got[1], want[1])


@pytest.mark.parametrize('name', TRAIN_EXACT)
def test_train_step_equal(name):
    factory, size, _ = FAMILIES[name]
    ref = factory().train()
    net = copy.deepcopy(ref)
    params = list(net.parameters())
    pairs = list(zip(bns(ref), bns(net)))
    net = convert_to_repq(net, quantize=False, bn_mode='exact').train()
    x = x_for(ref, size)
    (yr, lr), (yn, ln) = call(ref, x), call(net, x)
    close(yn, yr)
    loss_r, loss_n = yr.square().mean(), yn.square().mean()
    if lr is not None:                               # RepVGGplus: its custom L2 too
        close(ln, lr)
        loss_r, loss_n = loss_r + 1e-3 * lr, loss_n + 1e-3 * ln
    loss_r.backward()
    loss_n.backward()
    for pr, pn in zip(ref.parameters(), params):
        close(pn.grad, pr.grad, 1e-4)
    for br, bn in pairs:
        close(bn.running_mean, br.running_mean)
        close(bn.running_var, br.running_var)
        assert int(bn.num_batches_tracked) == int(br.num_batches_tracked) == 1


def deployed_conv_of(dep):
    """The conv of an original block after its own deploy conversion."""
    return next(getattr(dep, n) for n in ('reparam_conv', 'fused_conv', 'dbb_reparam',
                                          'rbr_reparam') if hasattr(dep, n))


@pytest.mark.parametrize('name', FAMILIES)
def test_merge_equals_original_deploy(name):
    factory, size, _ = FAMILIES[name]
    ref = factory().eval()
    x = x_for(ref, size)
    dep = deploy(ref).eval()
    conv_ref = deployed_conv_of(dep)
    for merged in (merge_model(ref), merge_model(convert_to_repq(ref, quantize=False,
                                                                 inplace=False))):
        merged.eval()
        conv = merged.rbr_reparam if isinstance(merged, RepVGGplusDeployed) else \
            merged[0] if isinstance(merged, nn.Sequential) else merged
        assert type(conv) is nn.Conv2d
        assert conv.kernel_size == conv_ref.kernel_size and conv.stride == conv_ref.stride
        assert conv.padding == conv_ref.padding and conv.groups == conv_ref.groups
        close(conv.weight, conv_ref.weight)
        close(conv.bias, conv_ref.bias)
        with torch.no_grad():
            got, want = call(merged, x), call(dep, x)
        close(got[0], want[0])
        if isinstance(dep, RepVGGplusBlock):          # deploy-mode call: (out, None)
            assert merged(x, None)[1] is None and dep(x, None)[1] is None


@pytest.mark.parametrize('name', FAMILIES)
def test_quantized_merges_to_one_qconv_per_block(name):
    factory, size, _ = FAMILIES[name]
    blk = factory()
    n_se = sum(isinstance(m, SEBlock) for m in blk.modules())
    q = convert_to_repq(nn.ModuleList([blk]), w_bits=4, a_bits=4)
    assert isinstance(q[0], ForeignRepBlock) and q[0].w_quant is not None
    x = x_for(blk, size)
    q.train()
    y, _ = call(q[0], x)
    y.square().mean().backward()                     # initialises the step sizes
    q.eval()
    with torch.no_grad():
        want = call(q[0], x)[0]
        merged = merge_model(q)
        assert find_rep_blocks(merged) == []
        assert not any(type(m) is nn.Conv2d for m in merged.modules())
        # one merged quantized conv, plus the SE's two
        assert sum(isinstance(m, QConv2d) for m in merged.modules()) == 1 + 2 * n_se
        assert torch.equal(call(merged[0], x)[0], want)


def test_dbb_pieces_are_read_as_documented():
    blk = convert_to_repq(make(DBBBlock, 4, 4, 3, 1, 1), quantize=False)
    kinds = [[type(st) for st in br] for br in blk.branches]
    assert kinds[2][-1] is BNPadAvgStage and kinds[3] == [IdentityBasedConvStage,
                                                          BNPadConvStage]
    dw = convert_to_repq(make(DBBBlock, 4, 4, 3, 1, 1, groups=4), quantize=False)
    assert len(dw.branches) == 3 and [type(st).__name__ for st in dw.branches[1]] == \
        ['AvgStage']                                 # depthwise: avg without its 1x1
    # the padded stages refer to the stage (and BN) before them, also in a deep copy
    twin = copy.deepcopy(blk)
    for b in (blk, twin):
        assert b.branches[3][1]._pad_source[0] is b.branches[3][0]
        assert b.branches[2][1]._pad_source[0] is b.branches[2][0]
    acb = convert_to_repq(make(ACNetACBlock, 4, 4, 3, 1, 0), quantize=False)
    assert [type(br[0]) for br in acb.branches[1:]] == [CroppedConvStage] * 2
    assert [tuple(br[0].padding) for br in acb.branches[1:]] == [(0, -1), (-1, 0)]


def _dbb_pair(pad_stats, repq=True):
    """An original DBB, its conversion (quantize=False, exact; ``repq=False``: the
    multi-branch form) with ``pad_stats``, their BN pairs and parameter pairs."""
    ref = make(DBBBlock, 4, 4, 3, 1, 1).train()
    net = copy.deepcopy(ref)
    pairs = list(zip(bns(ref), bns(net)))
    params = list(zip(ref.parameters(), net.parameters()))
    net = convert_to_repq(net, quantize=False, bn_mode='exact').train()
    assert set_pad_stats(net, pad_stats) == 2
    net.repq = repq
    return ref, net, pairs, params


def test_dbb_train_padding_differs_as_documented():
    x = x_for(make(DBBBlock, 4, 4, 3, 1, 1), 8)
    ref, net, _, _ = _dbb_pair('in_use')
    _, multi, _, _ = _dbb_pair('in_use', repq=False)
    yr, yn = ref(x), net(x)
    # the merged training conv is the multi-branch form padded with the statistics in use
    close(yn, multi(x))
    # ... which is not the original's running-statistics padding: the output differs, also
    # in the interior (the BNs after the padded stages see other batch statistics)
    assert (yn - yr).abs().max() > 1e-3
    assert (yn - yr)[:, :, 1:-1, 1:-1].abs().max() > 1e-4


def test_dbb_running_pad_option_is_the_original():
    x = x_for(make(DBBBlock, 4, 4, 3, 1, 1), 8)
    ref, net, pairs, _ = _dbb_pair('running')
    assert [st.pad_stats for br in net.branches for st in br[1:]] == ['running'] * 2
    yr, yn = ref(x), net(x)
    # RepQ (merged conv): the interior, and every running statistic, are the original's;
    # only the border (whose padding one conv cannot take from running statistics) differs
    close(yn[:, :, 1:-1, 1:-1], yr[:, :, 1:-1, 1:-1])
    assert (yn - yr).abs().max() > 1e-3
    for br, bn in pairs:
        close(bn.running_mean, br.running_mean)
        close(bn.running_var, br.running_var)
    # the multi-branch form with the option is the original's training forward exactly
    ref, multi, pairs, params = _dbb_pair('running', repq=False)
    yr, ym = ref(x), multi(x)
    close(ym, yr)
    yr.square().mean().backward()
    ym.square().mean().backward()
    for pr, pm in params:
        close(pm.grad, pr.grad, 1e-4)
    for br, bn in pairs:
        close(bn.running_mean, br.running_mean)
        close(bn.running_var, br.running_var)
    # eval is the same with either setting
    ref.eval(), net.eval()
    with torch.no_grad():
        y_run = net(x)
        set_pad_stats(net, 'in_use')
        close(net(x), y_run)
        close(y_run, ref(x))
    with pytest.raises(ValueError, match='pad_stats must be one of'):
        set_pad_stats(net, 'batch')


def test_repvggplus_in_its_stage_and_merged():
    torch.manual_seed(0)
    stage = randomize(RepVGGplusStage(RepVGGplusBlock(3, 8, stride=2),
                                      RepVGGplusBlock(8, 8, use_post_se=True)))
    ref = copy.deepcopy(stage).train()
    conv = convert_to_repq(stage, quantize=False)
    assert all(isinstance(b, RepVGGplusRepBlock) for b in conv.blocks)
    assert isinstance(conv.blocks[1].act, nn.Sequential) and \
        isinstance(conv.blocks[1].act[1], SEBlock)                    # post_se after ReLU
    x = torch.randn(2, 3, 8, 8)
    (yr, lr), (yc, lc) = ref(x, 0.0), conv.train()(x, 0.0)
    close(yc, yr)
    close(lc, lr)
    ref.eval(), conv.eval()
    merged = merge_model(conv)
    dep = copy.deepcopy(ref)
    for b in dep.blocks:
        b.switch_to_deploy()
    with torch.no_grad():
        y, l2 = merged(x, None)
        yd, ld = dep(x, None)
        close(y, yd)
        assert l2 is None and ld is None
        assert merged(x, 0.5)[1] == 0.5             # merged convs add no custom L2 term


def test_acnet_without_affine():
    # use_affine=False: BNs without weight / bias (the original's own deploy conversion
    # needs bn.weight, so the merge is checked against the eval forward)
    ref = make(ACNetACBlock, 4, 4, 3, 1, 1, use_affine=False)
    x = x_for(ref, 6)
    net = convert_to_repq(copy.deepcopy(ref).train(), quantize=False)
    close(net(x), ref.train()(x))
    ref.eval()
    with torch.no_grad():
        close(merge_model(ref)(x), ref(x))
        close(net.eval()(x), ref(x))


def test_fastvit_style_mobileone_identity_only():
    # FastViT's MobileOneBlock with num_conv_branches=0 and no scale branch (RepMixer's
    # norm): rbr_conv is None, only rbr_skip; the merge is a 1x1 depthwise-equivalent conv
    ref = make(AppleMobileOneBlock, 4, 4, 3, 1, 1, groups=4, num_conv_branches=0)
    ref.rbr_conv, ref.rbr_scale = None, None
    x = x_for(ref, 6)
    net = convert_to_repq(copy.deepcopy(ref), quantize=False)
    assert [type(st).__name__ for br in net.branches for st in br] == ['IdentityStage']
    with torch.no_grad():
        close(net.eval()(x), ref.eval()(x))
        close(merge_model(ref)(x), ref(x))
    ref.train()
    close(convert_to_repq(copy.deepcopy(ref), quantize=False).train()(x), ref(x))


@pytest.mark.parametrize('name', ['mobileone-k3', 'acnet-k3', 'dbb-k3', 'repvggplus'])
def test_deployed_originals_are_plain_convs(name):
    factory, size, _ = FAMILIES[name]
    dep = deploy(factory())
    assert find_rep_blocks(dep) == []
    q = convert_to_repq(nn.ModuleList([dep]))
    assert sum(isinstance(m, QConv2d) for m in q.modules()) >= 1


class _NumBranchesMismatch(AppleMobileOneBlock):
    def __init__(self):
        super().__init__(4, 4, 3, 1, 1, num_conv_branches=2)
        self.num_conv_branches = 1


class _DBBExtra(DBBBlock):
    def __init__(self):
        super().__init__(4, 4, 3, 1, 1)
        self.dbb_extra = conv_bn(4, 4, 3, 1, 1)


class _SEBeforeReLU(RepVGGplusBlock):
    """A fork applying post_se before the nonlinearity (not the known layout)."""

    def __init__(self):
        super().__init__(4, 4, use_post_se=True)

    def forward(self, x, L2):
        out = self.rbr_dense(x) + self.rbr_1x1(x) + self.rbr_identity(x)
        return self.nonlinearity(self.post_se(out) - 0.5), L2


@pytest.mark.parametrize('block, msg', [
    (_NumBranchesMismatch(), 'num_conv_branches=1 but rbr_conv holds 2'),
    (_SEBeforeReLU(), 'does not reproduce the forward'),
    (_DBBExtra(), "unexpected submodule 'dbb_extra'"),
    (ACNetACBlock(4, 4, 3, 1, 1, nonlinear=nn.ReLU(), use_last_bn=True), None),
])
def test_definite_but_unreadable_raises(block, msg):
    if msg is None:        # a fork: last_bn applied after nonlinear (not the known order)
        block.forward = lambda x, b=block: b.last_bn(b.nonlinear(
            b.square_bn(b.square_conv(x)) + b.ver_bn(b.ver_conv(x)) + b.hor_bn(b.hor_conv(x))))
        randomize(block)
        msg = 'does not reproduce the forward'
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.Identity(), block))
    with pytest.raises(ValueError, match=re.escape(msg)) as e:
        convert_to_repq(net)
    assert "'1.1'" in str(e.value)


# --------------------------------------------------------------------------------------
# look-alikes
# --------------------------------------------------------------------------------------
class TimmStyleRepBlock(nn.Module):
    """An unknown family: parallel conv+BN branches summed (timm-like names)."""

    def __init__(self, c):
        super().__init__()
        self.conv_kxk = conv_bn(c, c, 3, 1, 1)
        self.conv_1x1 = conv_bn(c, c, 1, 1, 0)
        self.identity = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv_kxk(x) + self.conv_1x1(x) + self.identity(x))


class MarkerOnly(nn.Module):
    """Has a known family's branch name (``rbr_1x1``) but no defining attribute."""

    def __init__(self, c):
        super().__init__()
        self.main = nn.Conv2d(c, c, 3, padding=1)
        self.rbr_1x1 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.main(x) + self.rbr_1x1(x)


def _look_alike_net():
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(TimmStyleRepBlock(4)),
                         MarkerOnly(4))


def _look_alike_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in rec if issubclass(w.category, LookAlikeWarning)]


@pytest.mark.parametrize('fn', [convert_to_repq, merge_model, find_rep_blocks])
def test_look_alike_warns_naming_module_and_skip(fn):
    out, msgs = _look_alike_warnings(fn, _look_alike_net())
    assert len(msgs) == 2, msgs
    timm, marker = msgs
    assert "'1.0' (TimmStyleRepBlock)" in timm and "['conv_kxk', 'conv_1x1']" in timm
    assert "'2' (MarkerOnly)" in marker and "['rbr_1x1']" in marker
    for m in msgs:
        assert 'skip=[' in m and 'repq=dict(skip=' in m and 'matches no adapter' in m
    if fn is convert_to_repq:          # left as plain quantized convs, still trainable
        assert isinstance(out[1][0].conv_kxk.conv, QConv2d) and isinstance(out[2].main, QConv2d)
        out(torch.randn(2, 3, 6, 6)).sum().backward()


def test_skip_silences_look_alike():
    net = _look_alike_net()
    out, msgs = _look_alike_warnings(convert_to_repq, net, skip=['1.0', '2'])
    assert msgs == []
    assert type(out[1][0].conv_kxk.conv) is nn.Conv2d     # skipped: untouched
    _, msgs = _look_alike_warnings(merge_model, net, skip=['1.*', '2'])
    assert msgs == []
    _, msgs = _look_alike_warnings(find_rep_blocks, net, skip=['1', '2'])
    assert msgs == []


def test_look_alike_rule_has_no_false_positives_on_common_layouts():
    # sequential conv+BN units in a container, a BasicBlock-like module, a conv+BN+act
    # pair (Inception-like, non-linear branches) and a depthwise-separable pair
    class Basic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.downsample = conv_bn(4, 4, 1)

        def forward(self, x):
            return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) +
                          self.downsample(x))

    class Inception(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    class DWSep(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw, self.pw = conv_bn(4, 4, 3, 1, 1, groups=4), conv_bn(4, 4, 1)

        def forward(self, x):
            return self.pw(self.dw(x))

    net = nn.Sequential(nn.Sequential(conv_bn(4, 4, 3, 1, 1), conv_bn(4, 4, 3, 1, 1)),
                        Basic(), Inception(), DWSep())
    _, msgs = _look_alike_warnings(convert_to_repq, net)
    assert msgs == []


def _flat(out):
    return [t for o in out for t in _flat(o)] if isinstance(out, (tuple, list)) else [out]


def _no_look_alike_warning(model, x, **call):
    with torch.no_grad():
        ref = _flat(model(x, **call))
    conv, msgs = _look_alike_warnings(convert_to_repq, model, quantize=False, inplace=False)
    assert msgs == []
    with torch.no_grad():
        for a, b in zip(_flat(conv(x, **call)), ref, strict=True):
            close(a, b)


def test_no_look_alike_warning_mmpretrain_resnet18():
    pytest.importorskip('mmpretrain')
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules
    register_all_modules()
    torch.manual_seed(0)
    model = randomize(MODELS.build(dict(
        type='ImageClassifier', backbone=dict(type='ResNet', depth=18),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=512)))).eval()
    _no_look_alike_warning(model, torch.randn(1, 3, 32, 32), mode='tensor')


def test_no_look_alike_warning_mmdet_rtmdet_tiny():
    mmdet = pytest.importorskip('mmdet')
    import os

    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs',
                                       'rtmdet', 'rtmdet_tiny_8xb32-300e_coco.py'))
    cfg.model.backbone.init_cfg = None                 # no checkpoint download
    torch.manual_seed(0)
    model = randomize(MODELS.build(cfg.model)).eval()
    _no_look_alike_warning(model, torch.randn(1, 3, 64, 64), mode='tensor')


def test_look_alike_rule_finds_mmpretrain_replknet_large_kernel():
    # a real rep block of no adapted family (RepLKNet's large + small kernel conv+BN pair)
    pytest.importorskip('mmpretrain')
    from mmpretrain.models.backbones.replknet import ReparamLargeKernelConv
    net = nn.Sequential(nn.Conv2d(3, 8, 1), ReparamLargeKernelConv(8, 8, 7, 1, 8, 3))
    _, msgs = _look_alike_warnings(convert_to_repq, net)
    assert len(msgs) == 1 and "'1' (ReparamLargeKernelConv)" in msgs[0]
    assert "['lkb_origin', 'small_conv']" in msgs[0]
    merged = nn.Sequential(ReparamLargeKernelConv(8, 8, 7, 1, 8, 3, small_kernel_merged=True))
    assert _look_alike_warnings(find_rep_blocks, merged)[1] == []
