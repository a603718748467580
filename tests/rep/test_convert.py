"""``repq_mm.convert``: convert_to_repq / merge_model on models mixing our blocks, foreign
rep blocks (faithful minimal copies of the YOLOv6 / YOLOv7 classes below; mmpretrain's own
RepVGG-A0 and MobileOne-s0 when mmpretrain is installed), plain convs and a Linear.

Run with ``OMP_NUM_THREADS=1``; tiny shapes, a few seconds on one CPU thread.
"""
from __future__ import annotations

import copy
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repq_mm import convert_to_repq, merge_model
from repq_mm.convert import ForeignRepBlock, find_rep_blocks
from repq_mm.quant import QConfig, QConv2d, QLinear
from repq_mm.rep import RepBlock, RepVGGBlock


# --------------------------------------------------------------------------------------
# minimal faithful copies of foreign blocks (forward and attribute layout as upstream)
# --------------------------------------------------------------------------------------
def conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=1):
    """YOLOv6 ``yolov6/layers/common.py: conv_bn``."""
    result = nn.Sequential()
    result.add_module('conv', nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                                        padding, groups=groups, bias=False))
    result.add_module('bn', nn.BatchNorm2d(num_features=out_channels))
    return result


class YoloV6RepVGGBlock(nn.Module):
    """YOLOv6 ``RepVGGBlock`` (meituan/YOLOv6, yolov6/layers/common.py)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1,
                 dilation=1, groups=1, padding_mode='zeros', deploy=False, use_se=False,
                 se=None):
        super().__init__()
        self.deploy = deploy
        self.groups = groups
        self.in_channels = in_channels
        self.out_channels = out_channels
        assert kernel_size == 3
        assert padding == 1
        padding_11 = padding - kernel_size // 2
        self.nonlinearity = nn.ReLU()
        # upstream raises for use_se; `se` lets the tests plug an SE module in
        self.se = se if se is not None else nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                                         padding, dilation, groups, bias=True,
                                         padding_mode=padding_mode)
        else:
            self.rbr_identity = nn.BatchNorm2d(num_features=in_channels) \
                if out_channels == in_channels and stride == 1 else None
            self.rbr_dense = conv_bn(in_channels, out_channels, kernel_size, stride, padding,
                                     groups)
            self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, padding_11, groups)

    def forward(self, inputs):
        if hasattr(self, 'rbr_reparam'):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) +
                                         id_out))


class YoloV6QARepVGGBlock(YoloV6RepVGGBlock):
    """YOLOv6 ``QARepVGGBlock`` (https://arxiv.org/abs/2212.01593)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1,
                 dilation=1, groups=1, padding_mode='zeros', deploy=False, use_se=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, padding_mode, deploy, use_se)
        if not deploy:
            self.bn = nn.BatchNorm2d(out_channels)
            self.rbr_1x1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride,
                                     groups=groups, bias=False)
            self.rbr_identity = nn.Identity() \
                if out_channels == in_channels and stride == 1 else None
        self._id_tensor = None

    def forward(self, inputs):
        if hasattr(self, 'rbr_reparam'):
            return self.nonlinearity(self.bn(self.se(self.rbr_reparam(inputs))))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.bn(self.se(self.rbr_dense(inputs) +
                                                 self.rbr_1x1(inputs) + id_out)))


def autopad(k, p=None):
    return k // 2 if p is None else p


class YoloV7RepConv(nn.Module):
    """YOLOv7 ``RepConv`` (WongKinYiu/yolov7, models/common.py)."""

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, act=True, deploy=False):
        super().__init__()
        self.deploy = deploy
        self.groups = g
        self.in_channels = c1
        self.out_channels = c2
        assert k == 3
        assert autopad(k, p) == 1
        padding_11 = autopad(k, p) - k // 2
        self.act = nn.SiLU() if act is True else (
            act if isinstance(act, nn.Module) else nn.Identity())
        if deploy:
            self.rbr_reparam = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(num_features=c1) if c2 == c1 and s == 1 \
                else None
            self.rbr_dense = nn.Sequential(
                nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False),
                nn.BatchNorm2d(num_features=c2))
            self.rbr_1x1 = nn.Sequential(
                nn.Conv2d(c1, c2, 1, s, padding_11, groups=g, bias=False),
                nn.BatchNorm2d(num_features=c2))

    def forward(self, inputs):
        if hasattr(self, 'rbr_reparam'):
            return self.act(self.rbr_reparam(inputs))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)


class SE(nn.Module):
    """Squeeze-excitation with 1x1 convs (as mmpretrain's SELayer)."""

    def __init__(self, c, r=2):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * w


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model


def make_net(seed=0):
    """Stem conv (3 -> 8), our RepVGGBlock, YOLOv6 RepVGG (stride 2, with SE), YOLOv7
    RepConv (groups 2), YOLOv6 QARepVGG, a deployed YOLOv6 block, a 1x1 conv, Linear."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        RepVGGBlock(8, 8, act=nn.ReLU()),
        YoloV6RepVGGBlock(8, 16, stride=2, se=SE(16)),
        YoloV7RepConv(16, 16, g=2),
        YoloV6QARepVGGBlock(16, 16),
        YoloV6RepVGGBlock(16, 16, deploy=True),
        nn.Conv2d(16, 16, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return randomize_bn(net, seed)


N_REP = 4            # RepVGGBlock, YOLOv6 RepVGG, YOLOv7 RepConv, YOLOv6 QARepVGG
N_CONV = 5           # stem, SE fc1/fc2, deployed rbr_reparam, 1x1
N_LINEAR = 1


def inputs(seed=1, n=4, size=8):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def close(a, b, tol=1e-5):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


def count(model, cls, exact=True):
    return sum((type(m) is cls) if exact else isinstance(m, cls) for m in model.modules())


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------
def test_find_rep_blocks():
    names = [(n, type(m).__name__) for n, m in find_rep_blocks(make_net())]
    assert names == [('3', 'RepVGGBlock'), ('4', 'YoloV6RepVGGBlock'),
                     ('5', 'YoloV7RepConv'), ('6', 'YoloV6QARepVGGBlock')]


def test_quantize_false_keeps_outputs_eval_and_train():
    ref = make_net()
    net = copy.deepcopy(ref)
    params, bn_pairs = list(net.parameters()), list(zip(bns(ref), bns(net)))
    out = convert_to_repq(net, quantize=False)
    assert out is net
    assert count(net, ForeignRepBlock) == 3 and count(net, RepVGGBlock) == 1
    assert all(b.repq and b.w_quant is None for _, b in find_rep_blocks(net))
    # parameters and BN modules are reused, not copied
    assert {id(p) for p in net.parameters()} == {id(p) for p in params}
    assert {id(b) for b in bns(net)} == {id(b) for _, b in bn_pairs}
    assert isinstance(net[4].act, nn.Sequential) and isinstance(net[4].act[0], SE)
    assert net[6].post_bn is not None

    x = inputs()
    close(net.eval()(x), ref.eval()(x))
    # one training step (forward, backward, SGD) in train mode
    ref.train(), net.train()
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_n = torch.optim.SGD(params, lr=0.1)
    yr, yn = ref(x), net(x)
    close(yn, yr)
    yr.square().mean().backward()
    yn.square().mean().backward()
    for pr, pn in zip(ref.parameters(), params):
        close(pn.grad, pr.grad, 1e-4)
    opt_r.step(), opt_n.step()
    for br, bn in bn_pairs:
        close(bn.running_mean, br.running_mean)
        close(bn.running_var, br.running_var)
        assert int(bn.num_batches_tracked) == int(br.num_batches_tracked) == 1
    close(net.eval()(x), ref.eval()(x), 1e-4)


def test_inplace_false_leaves_model_untouched():
    ref = make_net()
    state = copy.deepcopy(ref.state_dict())
    net = convert_to_repq(ref, inplace=False)
    assert net is not ref and type(ref[4]) is YoloV6RepVGGBlock and type(ref[0]) is nn.Conv2d
    assert not ref[3].repq and ref[3].w_quant is None
    for k, v in ref.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_quantize_true_replaces_every_conv_and_linear():
    net = convert_to_repq(make_net(), w_bits=4, a_bits=4, first_bits=8, last_bits=6)
    assert count(net, nn.Conv2d) == count(net, nn.Linear) == 0
    assert count(net, QConv2d) == N_CONV and count(net, QLinear) == N_LINEAR
    blocks = [b for _, b in find_rep_blocks(net)]
    assert len(blocks) == N_REP and all(isinstance(b, RepBlock) for b in blocks)
    assert all(b.repq and b.w_quant.bits == 4 and b.a_quant.bits == 4 for b in blocks)
    assert (net[0].w_quant.bits, net[0].a_quant.bits) == (8, 8)            # first
    assert (net[-1].w_quant.bits, net[-1].a_quant.bits) == (6, 6)          # last
    assert net[4].act[0].fc1.w_quant.bits == 4                              # SE in act
    assert net[7].rbr_reparam.w_quant.bits == 4                             # deployed
    # it trains
    net.train()
    loss = net(inputs()).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_first_bits_on_rep_block_and_qcfg():
    net = nn.Sequential(YoloV7RepConv(3, 8), nn.Conv2d(8, 4, 1), RepVGGBlock(4, 4))
    net = convert_to_repq(net, qcfg=QConfig(w_bits=3, a_bits=5, per_channel=True),
                          first_bits=6, last_bits=7)
    assert (net[0].w_quant.bits, net[0].a_quant.bits) == (6, 6)
    assert (net[1].w_quant.bits, net[1].a_quant.bits, net[1].w_quant.per_channel) == \
        (3, 5, True)
    assert (net[2].w_quant.bits, net[2].a_quant.bits) == (7, 7)


def test_layer_bits_patterns():
    # names and patterns as in `skip`: a module name covers its children; later entries win
    net = convert_to_repq(make_net(), w_bits=4, a_bits=4, first_bits=8,
                          layer_bits={'4': 6, '[56]': 5, '6': 3})
    assert (net[0].w_quant.bits, net[0].a_quant.bits) == (8, 8)
    assert net[4].w_quant.bits == 6 and net[4].act[0].fc1.w_quant.bits == 6   # SE inside
    assert (net[5].w_quant.bits, net[6].w_quant.bits) == (5, 3)
    assert net[3].w_quant.bits == 4 and net[-1].w_quant.bits == 4


@pytest.mark.parametrize('layer_bits,match', [
    ({'nope': 8}, "'nope' matches no quantized layer"),
    ({'3': 9}, r"layer_bits\['3'\].*9"),
    ({'': 8}, 'non-empty strings'),
    (['3'], 'must be a dict'),
])
def test_bad_layer_bits(layer_bits, match):
    ref = make_net()
    before = [(n, type(m)) for n, m in ref.named_modules()]
    with pytest.raises(ValueError, match=match):
        convert_to_repq(ref, layer_bits=layer_bits)
    assert [(n, type(m)) for n, m in ref.named_modules()] == before      # nothing changed


def test_quantize_plain_false_and_idempotent():
    net = convert_to_repq(make_net(), quantize_plain=False)
    assert count(net, QConv2d) == 0 and count(net, nn.Conv2d) == N_CONV
    assert all(b.w_quant is not None for _, b in find_rep_blocks(net))
    steps = {id(b.w_quant) for _, b in find_rep_blocks(net)}
    net = convert_to_repq(net)              # already quantized blocks are left as they are
    assert {id(b.w_quant) for _, b in find_rep_blocks(net)} == steps
    assert count(net, QConv2d) == N_CONV


def test_frozen_parameters_stay_frozen():
    net = make_net()
    for p in list(net[0].parameters()) + list(net[5].parameters()):
        p.requires_grad_(False)
    net = convert_to_repq(net)
    assert not any(p.requires_grad for p in net[0].parameters() if p is not net[0].w_quant.step
                   and p is not net[0].a_quant.step)
    assert not net[5].branches[0][0].weight.requires_grad


@pytest.mark.parametrize('arg', ['w_bits', 'a_bits', 'first_bits', 'last_bits'])
@pytest.mark.parametrize('bits', [0, 1, 9, 33, 2.5, '8'])
def test_bad_bits(arg, bits):
    with pytest.raises(ValueError, match=re.escape(repr(bits))):
        convert_to_repq(make_net(), **{arg: bits})


def test_skip_prefix_and_pattern():
    net = convert_to_repq(make_net(), skip=['0', '4', '5.*'], first_bits=6)
    assert type(net[0]) is nn.Conv2d and type(net[4]) is YoloV6RepVGGBlock
    assert type(net[4].se.fc1) is nn.Conv2d                      # children skipped too
    assert type(net[5]) is ForeignRepBlock and net[5].w_quant is not None   # '5.*' ≠ '5'
    assert net[3].w_quant.bits == 6                              # first non-skipped layer
    net = convert_to_repq(make_net(), skip='[3-6]', quantize_plain=False)
    assert [n for n, m in find_rep_blocks(net) if isinstance(m, RepBlock) and m.repq] == []


def test_merge_model_full_precision():
    ref = make_net().eval()
    merged = merge_model(ref)
    assert find_rep_blocks(merged) == [] and count(merged, RepBlock, exact=False) == 0
    assert type(ref[4]) is YoloV6RepVGGBlock            # not in place
    x = inputs()
    close(merged(x), ref(x))
    assert type(merged[3]) is nn.Sequential and type(merged[3][0]) is nn.Conv2d
    # the paper's LSQ baseline: merge, then quantize plain convs
    lsq = convert_to_repq(merged, w_bits=4, a_bits=4)
    assert count(lsq, nn.Conv2d) == 0 and count(lsq, QConv2d) == N_CONV + N_REP


def test_merge_model_quantized_equals_qat_eval():
    torch.manual_seed(0)
    net = convert_to_repq(make_net(), w_bits=4, a_bits=4, per_channel=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()
    for seed in range(3):
        opt.zero_grad()
        net(inputs(seed)).square().mean().backward()
        opt.step()
    net.eval()
    x = inputs(7)
    with torch.no_grad():
        y = net(x)
        merged = merge_model(net)
        assert count(merged, RepBlock, exact=False) == 0 and count(merged, nn.Conv2d) == 0
        assert torch.equal(merged(x), y)
        # merged weights are on the integer grid of the learned step sizes
        conv = merged[5][0]
        codes = conv.weight / conv.w_quant.scale().reshape(-1, 1, 1, 1)
        assert torch.allclose(codes, codes.round(), atol=1e-4)


def test_bn_type_is_kept():
    net = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(YoloV7RepConv(4, 4)))
    net = randomize_bn(net).eval()
    x = torch.randn(2, 4, 6, 6)
    ref = net(x)
    net = convert_to_repq(net, quantize=False)
    assert all(type(st.bn) is nn.SyncBatchNorm for br in net[0].branches for st in br)
    close(net(x), ref)


def test_root_block_is_replaced():
    blk = randomize_bn(YoloV7RepConv(4, 4)).eval()
    x = torch.randn(2, 4, 6, 6)
    out = convert_to_repq(blk, quantize=False, inplace=False)
    assert isinstance(out, ForeignRepBlock)
    close(out(x), blk(x))
    close(merge_model(blk)(x), blk(x))


class _Broken(nn.Module):
    def __init__(self, rbr_dense=None, **extra):
        super().__init__()
        self.rbr_dense = rbr_dense if rbr_dense is not None else conv_bn(4, 4, 3, 1, 1)
        self.rbr_1x1 = conv_bn(4, 4, 1, 1, 0)
        self.act = nn.ReLU()
        for k, v in extra.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.act(self.rbr_dense(x) + 0.5 * self.rbr_1x1(x))   # not the known layout


@pytest.mark.parametrize('block, msg', [
    (_Broken(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4))),
     'expected exactly a conv and a BN'),
    (_Broken(conv_bn(4, 4, 3, 1, 2)), 'cannot be merged'),
    (_Broken(nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.BatchNorm2d(4))),
     'dilation'),
    (_Broken(alpha=nn.Parameter(torch.ones(1))), 'unexpected parameters'),
    (_Broken(rbr_avg=nn.AvgPool2d(3, 1, 1)), "unexpected submodule 'rbr_avg'"),
    (_Broken(), 'does not reproduce the forward'),
])
def test_unadaptable_block_raises_naming_path(block, msg):
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.Identity(), block))
    with pytest.raises(ValueError, match=re.escape(msg)) as e:
        convert_to_repq(net)
    assert "'1.1'" in str(e.value)


def test_look_alike_without_family_warns():
    # a known family's branch name without its defining attribute: warned about, not
    # adapted, its conv quantized as a plain conv (tests/rep/test_foreign_blocks.py has more)
    from repq_mm.convert import LookAlikeWarning
    net = nn.Sequential(nn.Module())
    net[0].rbr_1x1 = nn.Conv2d(4, 4, 1)
    with pytest.warns(LookAlikeWarning, match=r"'0'.*looks like a re-parameterized block"
                      r".*\['rbr_1x1'\].*skip=\['0'\]"):
        assert find_rep_blocks(net) == []
    with pytest.warns(LookAlikeWarning, match=r"'0'"):
        q = convert_to_repq(net)
    assert isinstance(q[0].rbr_1x1, QConv2d)


# --------------------------------------------------------------------------------------
# mmpretrain's own models
# --------------------------------------------------------------------------------------
def _mmpretrain_classifier(cfg_model):
    pytest.importorskip('mmpretrain')
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules
    register_all_modules()
    torch.manual_seed(0)
    return randomize_bn(MODELS.build(cfg_model)).eval()


def _check_classifier(model, n_rep, size=64, n_branches=None):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x, mode='tensor')
        conv = convert_to_repq(model, quantize=False, inplace=False)
        assert len(find_rep_blocks(conv)) == n_rep
        assert count(conv, ForeignRepBlock) == n_rep
        if n_branches is not None:
            assert sum(len(b.branches) for _, b in find_rep_blocks(conv)) == n_branches
        close(conv(x, mode='tensor'), ref)
        merged = merge_model(conv)
        assert count(merged, RepBlock, exact=False) == 0
        close(merged(x, mode='tensor'), ref)
        close(merge_model(model)(x, mode='tensor'), ref)      # foreign blocks directly
        q = convert_to_repq(model, w_bits=8, a_bits=8, inplace=False)
        assert count(q, nn.Conv2d) == count(q, nn.Linear) == 0
        assert q(x, mode='tensor').shape == ref.shape


def test_mmpretrain_repvgg_a0():
    mmpretrain = pytest.importorskip('mmpretrain')
    from mmengine.config import Config

    # mmengine 0.10.7's Config.fromfile does not resolve 'mmpretrain::repvgg/...' at the top
    # level (only inside _base_), and mmengine.hub.get_config needs pkg_resources; the
    # installed package ships its configs under .mim/configs.
    cfg = Config.fromfile(os.path.join(os.path.dirname(mmpretrain.__file__), '.mim', 'configs',
                                       'repvgg', 'repvgg-A0_8xb32_in1k.py'))
    model = _mmpretrain_classifier(cfg.model)
    assert type(model.backbone).__name__ == 'RepVGG'
    # the stem block, then arch_settings' num_blocks (A0: [2, 4, 14, 1])
    arch = type(model.backbone).arch_settings[cfg.model.backbone.arch]
    _check_classifier(model, n_rep=1 + sum(arch['num_blocks']))


def test_mmpretrain_mobileone_s0():
    pytest.importorskip('mmpretrain')
    from mmpretrain.models.backbones import MobileOne
    arch = MobileOne.arch_zoo['s0']
    base = (64, 128, 256, 512)                 # mmpretrain's MobileOne base channels
    model = _mmpretrain_classifier(dict(
        type='ImageClassifier',
        backbone=dict(type='MobileOne', arch='s0', out_indices=(3,)),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10,
                  in_channels=int(base[3] * arch['width_factor'][3]))))
    # expected from the architecture's definition, not from the model: a 3x3 stride-2 stem
    # block (one conv, the 1x1 scale branch; 3 -> c channels, so no identity), then per
    # stage and block a depthwise 3x3 block (num_conv_branches convs, the scale branch, the
    # identity BN unless stride 2) and a pointwise 1x1 block (num_conv_branches convs, the
    # identity BN when in == out channels)
    c = min(64, int(base[0] * arch['width_factor'][0]))
    n_rep, n_branches = 1, 2
    for i, blocks in enumerate(arch['num_blocks']):
        planes, k = int(base[i] * arch['width_factor'][i]), arch['num_conv_branches'][i]
        for j in range(blocks):
            n_rep += 2
            n_branches += (k + 1 + (j > 0)) + (k + (c == planes))
            c = planes
    _check_classifier(model, n_rep=n_rep, n_branches=n_branches)


def test_core_imports_without_openmmlab():
    """The torch-only core imports with mmengine / mmcv / mmdet / mmpretrain blocked."""
    import subprocess
    import sys
    code = '''
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('mmengine', 'mmcv', 'mmdet', 'mmpretrain'):
            raise ImportError(f'blocked: {name}')
sys.meta_path.insert(0, Block())
import repq_mm.quant, repq_mm.rep, repq_mm.convert, repq_mm.export, repq_mm.settings
import repq_mm.calib, repq_mm.io, repq_mm.sensitivity, repq_mm.models
assert not [m for m in sys.modules if m.split('.')[0] in ('mmengine', 'mmcv', 'mmdet',
                                                          'mmpretrain')]
assert 'repq_mm.mm' not in sys.modules
print('core ok')
'''
    from helpers import ROOT
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and 'core ok' in r.stdout, r.stderr[-2000:]


def test_failed_conversion_leaves_model_as_it_was():
    from helpers import snapshot as _snapshot
    from helpers import unchanged as _unchanged
    torch.manual_seed(0)
    # a foreign block that reads fine, then one that does not: the first stays foreign
    net = nn.Sequential(YoloV6RepVGGBlock(4, 4), nn.Sequential(_Broken()))
    snap = _snapshot(net)
    with pytest.raises(ValueError, match=r"'1\.0'.*does not reproduce the forward"):
        convert_to_repq(net)
    assert _unchanged(net, snap)
    # every block can be read, but a later plain conv cannot be quantized: the foreign
    # block is put back, our block is not switched to RepQ
    net = nn.Sequential(YoloV6RepVGGBlock(4, 4), RepVGGBlock(4, 4),
                        nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'))
    snap = _snapshot(net)
    with pytest.raises(ValueError, match=r"cannot quantize '2'.*padding_mode"):
        convert_to_repq(net, w_bits=4, a_bits=4)
    assert _unchanged(net, snap)
    assert not net[1].repq and net[1].w_quant is None and net[1].a_quant is None
