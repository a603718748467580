"""Turn any ``nn.Module`` into a RepQ model, and merge it back into plain convs (torch only).

* :func:`convert_to_repq`: every re-parameterized block (ours, or a *foreign* one read by an
  adapter from :data:`FOREIGN_BLOCKS`) becomes a :class:`~repq_mm.rep.RepBlock` in RepQ mode;
  every other ``nn.Conv2d`` / ``nn.Linear`` becomes a :class:`~repq_mm.quant.QConv2d` /
  :class:`~repq_mm.quant.QLinear`.
* :func:`merge_model`: every rep block becomes its ``to_deploy()`` form (one conv + act).
* :func:`find_rep_blocks`: the rep blocks a model holds, by module name.

Adapters reuse the foreign block's BN modules (same type, e.g. ``SyncBatchNorm``), its conv
``nn.Parameter`` objects (same values, ``requires_grad`` kept, so frozen stages stay frozen)
and its post-sum modules (SE, activation) as ``act``. Each adapted block is checked once
against the foreign forward on a small random input (eval mode), so a fork whose forward
differs from the known layout raises instead of silently changing the model. Module names
change (``branch_3x3.conv.weight`` -> ``branches.0.0.weight``): load foreign checkpoints
before converting.

Foreign families (attribute layouts, see the readers for details):

* ``mmpretrain.RepVGGBlock`` (``branch_3x3``, ``branch_1x1``, ``branch_norm``, ``se_layer``,
  ``act``) and ``mmpretrain.MobileOneBlock`` (``branch_conv_list``, ``branch_scale``,
  ``branch_norm``, ``se``, ``act``);
* ``yolo.RepVGGBlock``: YOLOv6 ``RepVGGBlock`` / ``QARepVGGBlock``, YOLOv7 ``RepConv`` and
  DingXiaoH/RepVGG's ``RepVGGBlock`` (``rbr_dense``, ``rbr_1x1``, ``rbr_identity``, ``se``,
  ``nonlinearity`` or ``act``, QARepVGG's ``bn``);
* ``repvggplus.RepVGGplusBlock`` (DingXiaoH/RepVGG ``repvggplus.py``): as above plus
  ``post_se`` after ``nonlinearity``; its ``forward(x, L2)`` and custom L2 term are kept;
* ``apple.MobileOneBlock`` (apple/ml-mobileone, also FastViT's): ``rbr_conv`` (a ModuleList
  of conv+BN), ``rbr_scale``, ``rbr_skip``, ``se``, ``activation``;
* ``acnet.ACBlock`` (DingXiaoH/ACNet): ``square_conv`` / ``square_bn``, ``hor_conv`` /
  ``hor_bn``, ``ver_conv`` / ``ver_bn``, the ``crop`` of ``padding < kernel_size // 2`` (or
  ``hor_conv_crop_layer`` / ``ver_conv_crop_layer``), ``last_bn``, ``nonlinear``;
* ``dbb.DiverseBranchBlock`` (DingXiaoH/DiverseBranchBlock): ``dbb_origin``, ``dbb_1x1``,
  ``dbb_avg`` (with or without its 1x1 conv and ``BNAndPadLayer``), ``dbb_1x1_kxk``
  (``idconv1``: ``IdentityBasedConv1x1``, or ``conv1``), ``nonlinear``. In eval mode it is
  exact. In training the inner KxK stages (after ``BNAndPadLayer``) are padded with the
  BN's value on a zero input computed from the statistics in use (batch statistics), which
  keeps the merged conv equal to the branches; the original pads with the running
  statistics (after the update) and detached affine parameters, so border pixels and the
  statistics of the following BNs differ. :func:`set_pad_stats` ``(model, 'running')`` gives
  the original padding in the multi-branch computation (and hence the original BN
  statistics); the merged training conv still implies the in-use padding at the border.

Look-alikes. A module that matches a family's defining attribute (``branch_3x3``,
``branch_conv_list``, ``rbr_dense``, ``rbr_conv``, ``square_conv``, ``dbb_origin``) but cannot
be read, or does not reproduce its own forward, raises ``ValueError`` naming its path: it is
definitely a rep block, and converting its branches separately would change what
:func:`merge_model` gives. A module that only *looks* re-parameterizable, i.e. (a) has an
attribute of a known family (``rbr_1x1``, ``rbr_skip``, ``dbb_avg``, ``hor_conv`` ...) without
a defining one, or (b) is not a container and holds, as direct children or in a direct
``ModuleList`` / ``ModuleDict``, at least two linear conv+BN units (a conv followed by a BN,
nothing else) with the same input / output channels, stride, groups and output size, gets a
:class:`LookAlikeWarning` naming its path, its type and the ``skip`` option (the
``repq.skip`` config key) that silences it; it is left as plain (quantized) convs.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import itertools
import warnings
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .quant import LSQQuantizer, QConfig, QConv2d, QLinear
from .rep import AvgStage, ConvStage, IdentityStage, RepBlock, Stage
from .rep.base import install_est_refresh_schedule
from .rep.foreign_stages import (PAD_STATS, BNPadAvgStage, BNPadConvStage, CroppedConvStage,
                                 IdentityBasedConvStage, _BNPadMixin, shared_conv_stage)
from .rep.stages import _pair
from .settings import RepQConfig, check_layer_bits  # noqa: F401  (re-exported)

__all__ = ['convert_to_repq', 'merge_model', 'find_rep_blocks', 'FOREIGN_BLOCKS',
           'ForeignRepBlock', 'RepVGGplusRepBlock', 'RepVGGplusDeployed', 'LookAlikeWarning',
           'set_pad_stats']


class LookAlikeWarning(UserWarning):
    """A module looks like a re-parameterized block but matches no adapter."""


class ForeignRepBlock(RepBlock):
    """A generic :class:`RepBlock` read from a foreign block; ``source`` names it.

    Not registered in ``REP_BLOCKS``: it has no constructor of its own (see the readers).
    """

    def __init__(self, *args, source: str = '', **kwargs):
        super().__init__(*args, **kwargs)
        self.source = source

    def extra_repr(self) -> str:
        return f'source={self.source}'

    def reference_pairs(self, foreign: nn.Module, x: torch.Tensor) -> list:
        """``[(foreign output, own output), ...]`` that must agree for input ``x``."""
        return [(foreign(x), self(x))]

    def set_pad_stats(self, pad_stats: str) -> int:
        """Padding statistics of the inner KxK stages that follow a BN (foreign DBB's
        ``BNAndPadLayer``): ``'in_use'`` (default, exact merge) or ``'running'`` (the original
        DBB's). Returns the number of stages set."""
        stages = [st for br in self.branches for st in br if isinstance(st, _BNPadMixin)]
        for st in stages:
            st.set_pad_stats(pad_stats)
        return len(stages)


class RepVGGplusDeployed(nn.Module):
    """The merged form of a :class:`RepVGGplusRepBlock`: ``forward(x, L2=None)`` returns
    ``(act(rbr_reparam(x)), L2)``. A merged conv adds no custom L2 term, so ``L2`` passes
    through; for the deploy-mode call ``block(x, None)`` this is the original's
    ``(out, None)``."""

    def __init__(self, rbr_reparam: nn.Module, act: nn.Module | None = None):
        super().__init__()
        self.rbr_reparam = rbr_reparam
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor, L2=None):
        return self.act(self.rbr_reparam(x)), L2


class RepVGGplusRepBlock(ForeignRepBlock):
    """RepVGGplus block (DingXiaoH/RepVGG ``repvggplus.py``) read as a RepQ block.

    ``forward(x, L2=None)`` returns ``(out, L2 + custom_l2())`` (``(out, None)`` when ``L2`` is
    ``None``), as the original, whose stages pass ``L2`` from block to block. Branch 0 is the
    3x3 conv+BN (``rbr_dense``), branch 1 the 1x1 conv+BN (``rbr_1x1``).
    """

    def custom_l2(self) -> torch.Tensor:
        """RepVGGplus' custom L2: the squared 3x3 kernel outside its centre, plus the
        squared equivalent centre kernel normalised by the (detached) BN scales."""
        (dense,), (one,) = self.branches[0], self.branches[1]
        t3 = _bn_scale(dense.bn).reshape(-1, 1, 1, 1).detach()
        t1 = _bn_scale(one.bn).reshape(-1, 1, 1, 1).detach()
        k3, k1 = dense.weight, one.weight
        ch, cw = k3.shape[2] // 2, k3.shape[3] // 2
        centre = k3[:, :, ch:ch + 1, cw:cw + 1]
        eq = centre * t3 + k1 * t1
        return (k3 ** 2).sum() - (centre ** 2).sum() + (eq ** 2 / (t3 ** 2 + t1 ** 2)).sum()

    def forward(self, x: torch.Tensor, L2=None):
        out = super().forward(x)
        return out, (None if L2 is None else L2 + self.custom_l2())

    def reference_pairs(self, foreign, x):
        ref, l2_ref = foreign(x, 0.0)
        out, l2 = self(x, 0.0)
        return [(ref, out), (torch.as_tensor(l2_ref), l2)]

    @torch.no_grad()
    def to_deploy(self) -> RepVGGplusDeployed:
        deployed = super().to_deploy()
        conv, act = (deployed[0], deployed[1]) if isinstance(deployed, nn.Sequential) else \
            (deployed, None)
        conv.training = self.training
        return RepVGGplusDeployed(conv, act)


def _bn_scale(bn: _BatchNorm) -> torch.Tensor:
    """``gamma / sqrt(running_var + eps)`` (``1 / ...`` without affine)."""
    s = torch.rsqrt(bn.running_var + bn.eps)
    return s * bn.weight if bn.affine else s


class _AdaptError(ValueError):
    """A foreign block that looks like a rep block but cannot be read (reason only)."""


# --------------------------------------------------------------------------------------
# reading foreign modules
# --------------------------------------------------------------------------------------
#: attributes that a foreign block gets when switched to its deploy form
_DEPLOYED_ATTRS = ('rbr_reparam', 'branch_reparam', 'reparam_conv', 'fused_conv',
                   'dbb_reparam')


def _is_deployed(m: nn.Module) -> bool:
    """Foreign blocks already switched to deploy: their conv is an ordinary conv."""
    return (any(hasattr(m, a) for a in _DEPLOYED_ATTRS)
            or getattr(m, 'deploy', False) is True
            or getattr(m, 'inference_mode', False) is True)


def _expect_children(m: nn.Module, allowed: set[str]) -> None:
    for name, child in m.named_children():
        if name not in allowed:
            raise _AdaptError(f'unexpected submodule {name!r} ({type(child).__name__}); '
                              f'known submodules: {sorted(allowed)}')
    params = [n for n, p in m._parameters.items() if p is not None]
    if params:
        raise _AdaptError(f'unexpected parameters {params} directly on the block '
                          '(e.g. a branch scale) cannot be represented')


def _check_conv(conv: nn.Module, where: str) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d) or isinstance(conv, QConv2d):
        raise _AdaptError(f'{where}: expected an nn.Conv2d, got {type(conv).__name__}')
    if conv.dilation != (1, 1):
        raise _AdaptError(f'{where}: dilation {conv.dilation} is not supported')
    if conv.padding_mode != 'zeros' or isinstance(conv.padding, str):
        raise _AdaptError(f'{where}: padding {conv.padding!r} / padding_mode '
                          f'{conv.padding_mode!r} not supported (need numeric zero padding)')
    if _identity_based(conv):
        raise _AdaptError(f'{where}: {type(conv).__name__} (a conv whose kernel is weight + '
                          'identity) is only known as the first 1x1 of DBB\'s dbb_1x1_kxk')
    return conv


def _check_bn(bn: nn.Module, where: str, channels: int | None = None) -> _BatchNorm:
    if not isinstance(bn, _BatchNorm):
        raise _AdaptError(f'{where}: expected a BatchNorm, got {type(bn).__name__}')
    if channels is not None and bn.num_features != channels:
        raise _AdaptError(f'{where}: BN has {bn.num_features} channels, expected {channels}')
    return bn


def _conv_bn(m: nn.Module, where: str) -> tuple[nn.Conv2d, _BatchNorm | None]:
    """``(conv, bn)`` of a branch that is a plain conv, or a conv followed by a BN
    (``nn.Sequential`` named conv/bn, conv/norm or 0/1, mmcv ``ConvModule`` without act)."""
    if isinstance(m, nn.Conv2d):
        return _check_conv(m, where), None
    if getattr(m, 'order', ('conv', 'norm', 'act')) != ('conv', 'norm', 'act'):
        raise _AdaptError(f'{where}: ConvModule order {m.order} is not conv -> norm')
    children = [(n, c) for n, c in m.named_children() if not isinstance(c, nn.Identity)]
    if len(children) != 2 or [n for n, p in m._parameters.items() if p is not None]:
        raise _AdaptError(f'{where}: expected exactly a conv and a BN, got '
                          f'{[f"{n}: {type(c).__name__}" for n, c in children]}')
    (_, conv), (_, bn) = children
    conv = _check_conv(conv, f'{where} (first submodule)')
    bn = _check_bn(bn, f'{where} (second submodule)', conv.out_channels)
    return conv, bn


def _identity(m: nn.Module, where: str) -> tuple[None, _BatchNorm | None]:
    """An identity branch: a BN on the input, or ``nn.Identity`` (QARepVGG)."""
    return None, (None if isinstance(m, nn.Identity) else _check_bn(m, where))


def _post(*mods: nn.Module | None) -> nn.Module | None:
    """The modules applied after the branch sum, in order (``None`` / Identity dropped)."""
    mods = [m for m in mods if m is not None and not isinstance(m, nn.Identity)]
    return None if not mods else mods[0] if len(mods) == 1 else nn.Sequential(*mods)


def _build(branches: list, act: nn.Module | None, post_bn: nn.Module | None = None,
           source: str = '', cls: type = ForeignRepBlock, groups: int | None = None
           ) -> ForeignRepBlock:
    """A :class:`ForeignRepBlock` (or ``cls``) from its branches.

    A branch is a chain ``[(stage, bn or None), ...]`` or a single ``(stage, bn)``, where a
    stage is ``None`` (identity), an ``nn.Conv2d`` (read into a :class:`ConvStage` holding the
    conv's own Parameters) or a :class:`Stage`. The block geometry (kernel, stride, padding,
    groups) is that of the largest first-stage conv (a block of identity branches only: a
    1x1 with ``groups``, default 1); the BN modules are reused as they are.
    """
    chains = [b if isinstance(b, list) else [b] for b in branches]
    firsts = [ch[0][0] for ch in chains]
    convs = [c for c in firsts if isinstance(c, (nn.Conv2d, ConvStage))]
    if convs:
        main = max(convs, key=lambda c: c.kernel_size[0] * c.kernel_size[1])
        like = main.weight
        geometry = (main.in_channels, main.out_channels, main.kernel_size, main.stride,
                    main.padding, main.groups)
    elif all(c is None for c in firsts) and any(bn is not None for ch in chains
                                                for _, bn in ch):
        bn = next(bn for ch in chains for _, bn in ch if bn is not None)
        like = bn.running_mean if bn.running_mean is not None else bn.weight
        geometry = (bn.num_features, bn.num_features, 1, 1, 0, groups or 1)
    else:
        raise _AdaptError('no branch starts with a conv (the block geometry is read from '
                          'the largest one)')
    blk = cls(*geometry, act, source=source)
    for chain in chains:
        stages = []
        for thing, bn in chain:
            if thing is None:
                stage = IdentityStage(blk.in_channels, blk.groups)
            elif isinstance(thing, Stage):
                stage = thing
            else:
                stage = shared_conv_stage(thing)
            if like is not None and next(stage.parameters(), None) is None and stage.bn is None:
                stage.to(like.device, like.dtype)        # fixed kernels (identity, average)
            stage.bn = bn
            stages.append(stage)
        blk.add_branch(*stages)
    blk.post_bn = post_bn
    try:
        blk.check()
    except ValueError as e:
        raise _AdaptError(f'branches cannot be merged into one conv: {e}') from None
    return blk


def _read_mmpretrain_repvgg(m: nn.Module) -> ForeignRepBlock:
    """mmpretrain ``RepVGGBlock``: ``act(se(branch_3x3(x) + branch_1x1(x) + branch_norm(x)))``
    (``se`` only when ``se_cfg`` is set)."""
    _expect_children(m, {'branch_3x3', 'branch_1x1', 'branch_norm', 'se_layer', 'act'})
    branches = [_conv_bn(m.branch_3x3, 'branch_3x3')]
    if getattr(m, 'branch_1x1', None) is not None:
        branches.append(_conv_bn(m.branch_1x1, 'branch_1x1'))
    if getattr(m, 'branch_norm', None) is not None:
        branches.append(_identity(m.branch_norm, 'branch_norm'))
    se = getattr(m, 'se_layer', None) if getattr(m, 'se_cfg', None) is not None else None
    return _build(branches, _post(se, getattr(m, 'act', None)),
                  source=f'mmpretrain.{type(m).__name__}')


def _read_mmpretrain_mobileone(m: nn.Module) -> ForeignRepBlock:
    """mmpretrain ``MobileOneBlock``:
    ``act(se(branch_norm(x) + branch_scale(x) + sum(branch_conv_list(x))))``."""
    _expect_children(m, {'branch_conv_list', 'branch_scale', 'branch_norm', 'se', 'act'})
    branches = [_conv_bn(b, f'branch_conv_list.{i}') for i, b in enumerate(m.branch_conv_list)]
    if not branches:
        raise _AdaptError('branch_conv_list is empty')
    if getattr(m, 'branch_scale', None) is not None:
        branches.append(_conv_bn(m.branch_scale, 'branch_scale'))
    if getattr(m, 'branch_norm', None) is not None:
        branches.append(_identity(m.branch_norm, 'branch_norm'))
    return _build(branches, _post(getattr(m, 'se', None), getattr(m, 'act', None)),
                  source=f'mmpretrain.{type(m).__name__}')


def _read_yolo_repvgg(m: nn.Module) -> ForeignRepBlock:
    """YOLOv6 ``RepVGGBlock`` / ``QARepVGGBlock``, YOLOv7 ``RepConv`` and DingXiaoH/RepVGG's
    ``RepVGGBlock``: ``act(bn(se(rbr_dense(x) + rbr_1x1(x) + rbr_identity(x))))`` where
    ``act`` is ``nonlinearity`` (YOLOv6, RepVGG) or ``act`` (YOLOv7) and ``bn`` exists only in
    QARepVGG."""
    _expect_children(m, {'rbr_dense', 'rbr_1x1', 'rbr_identity', 'se', 'nonlinearity', 'act',
                         'bn'})
    act, nonlin = getattr(m, 'act', None), getattr(m, 'nonlinearity', None)
    if act is not None and nonlin is not None:
        raise _AdaptError('has both `act` and `nonlinearity`: which one forward applies is '
                          'ambiguous')
    branches = [_conv_bn(m.rbr_dense, 'rbr_dense')]
    if getattr(m, 'rbr_1x1', None) is not None:
        branches.append(_conv_bn(m.rbr_1x1, 'rbr_1x1'))
    if getattr(m, 'rbr_identity', None) is not None:
        branches.append(_identity(m.rbr_identity, 'rbr_identity'))
    se = _post(getattr(m, 'se', None))
    post_bn = getattr(m, 'bn', None)
    if post_bn is not None:
        _check_bn(post_bn, 'bn')
        if se is not None:
            raise _AdaptError('a BN after a non-identity `se` cannot be folded')
    return _build(branches, _post(se, act if act is not None else nonlin), post_bn,
                  source=f'yolo.{type(m).__name__}')


def _read_repvggplus(m: nn.Module) -> RepVGGplusRepBlock:
    """DingXiaoH/RepVGG ``RepVGGplusBlock``: ``forward(x, L2)`` returns
    ``(post_se(nonlinearity(rbr_dense(x) + rbr_1x1(x) + rbr_identity(x))), L2 + custom L2)``.

    ``post_se`` (``nn.Identity`` or an SE) follows the activation, so it joins ``act``
    (``Sequential(nonlinearity, post_se)``): applied to the block output, exact. The custom
    L2 is computed by :meth:`RepVGGplusRepBlock.custom_l2` from the same parameters.
    """
    _expect_children(m, {'rbr_dense', 'rbr_1x1', 'rbr_identity', 'nonlinearity', 'post_se'})
    dense = _conv_bn(m.rbr_dense, 'rbr_dense')
    if getattr(m, 'rbr_1x1', None) is None:
        raise _AdaptError('rbr_1x1 is missing: the custom L2 of forward(x, L2) needs it')
    one = _conv_bn(m.rbr_1x1, 'rbr_1x1')
    for (conv, bn), where, k in ((dense, 'rbr_dense', 3), (one, 'rbr_1x1', 1)):
        if bn is None or conv.kernel_size != (k, k):
            raise _AdaptError(f'{where}: the custom L2 of forward(x, L2) needs a {k}x{k} conv '
                              f'followed by a BN, got {conv.kernel_size} / {bn}')
    branches = [dense, one]
    if getattr(m, 'rbr_identity', None) is not None:
        branches.append(_identity(m.rbr_identity, 'rbr_identity'))
    act = _post(getattr(m, 'nonlinearity', None), getattr(m, 'post_se', None))
    return _build(branches, act, cls=RepVGGplusRepBlock,
                  source=f'repvggplus.{type(m).__name__}')


def _read_apple_mobileone(m: nn.Module) -> ForeignRepBlock:
    """apple/ml-mobileone (and FastViT) ``MobileOneBlock``:
    ``activation(se(rbr_skip(x) + rbr_scale(x) + sum_i rbr_conv[i](x)))`` with ``rbr_conv`` a
    ``ModuleList`` of conv+BN ``Sequential`` s (``None`` in FastViT when
    ``num_conv_branches=0``), ``rbr_scale`` a 1x1 conv+BN or ``None``, ``rbr_skip`` a BN or
    ``None``. ``forward`` runs the first ``num_conv_branches`` entries of ``rbr_conv``."""
    _expect_children(m, {'rbr_skip', 'rbr_conv', 'rbr_scale', 'se', 'activation'})
    branches = []
    convs = getattr(m, 'rbr_conv', None)
    if convs is not None:
        n = getattr(m, 'num_conv_branches', len(convs))
        if n != len(convs):
            raise _AdaptError(f'num_conv_branches={n} but rbr_conv holds {len(convs)} '
                              'branches (forward runs num_conv_branches of them)')
        branches += [_conv_bn(b, f'rbr_conv.{i}') for i, b in enumerate(convs)]
    if getattr(m, 'rbr_scale', None) is not None:
        branches.append(_conv_bn(m.rbr_scale, 'rbr_scale'))
    if getattr(m, 'rbr_skip', None) is not None:
        branches.append(_identity(m.rbr_skip, 'rbr_skip'))
    if not branches:
        raise _AdaptError('rbr_conv, rbr_scale and rbr_skip are all empty')
    groups = getattr(m, 'groups', 1)
    return _build(branches, _post(getattr(m, 'se', None), getattr(m, 'activation', None)),
                  source=f'apple.{type(m).__name__}', groups=groups if isinstance(groups, int)
                  else 1)


def _read_acnet(m: nn.Module) -> ForeignRepBlock:
    """DingXiaoH/ACNet ``ACBlock``: ``nonlinear(last_bn(square_bn(square_conv(x)) +
    ver_bn(ver_conv(crop_v(x))) + hor_bn(hor_conv(crop_h(x)))))``.

    The 1xK / Kx1 branches sit on the centre row / column of the KxK kernel. When
    ``padding < kernel_size // 2`` the original crops their input: by ``crop`` columns
    (``ver``) / rows (``hor``) in ``acnet/acb.py``, or with ``ver_conv_crop_layer`` /
    ``hor_conv_crop_layer`` (``CropLayer``: ``rows_to_crop``, ``cols_to_crop``) in the other
    published version; read as a negative padding (:class:`CroppedConvStage`). ``last_bn``
    (``use_last_bn``) becomes ``post_bn``; ``use_affine=False`` BNs are supported.
    ``reduce_gamma`` / ``gamma_init`` only initialise the BN weights.
    """
    _expect_children(m, {'square_conv', 'square_bn', 'ver_conv', 'ver_bn', 'hor_conv',
                         'hor_bn', 'ver_conv_crop_layer', 'hor_conv_crop_layer', 'last_bn',
                         'nonlinear'})
    square = _check_conv(m.square_conv, 'square_conv')
    branches = [(square, _check_bn(m.square_bn, 'square_bn', square.out_channels))]
    crop = getattr(m, 'crop', 0)
    if not isinstance(crop, int) or crop < 0:
        raise _AdaptError(f'crop={crop!r}: expected a non-negative int')
    for name, (rows, cols) in (('ver', (0, crop)), ('hor', (crop, 0))):
        conv = _check_conv(getattr(m, f'{name}_conv', None), f'{name}_conv')
        bn = _check_bn(getattr(m, f'{name}_bn', None), f'{name}_bn', conv.out_channels)
        layer = getattr(m, f'{name}_conv_crop_layer', None)
        if layer is not None and not isinstance(layer, nn.Identity):
            r, c = getattr(layer, 'rows_to_crop', None), getattr(layer, 'cols_to_crop', None)
            if not (isinstance(r, int) and isinstance(c, int) and r >= 0 and c >= 0):
                raise _AdaptError(f'{name}_conv_crop_layer: expected nn.Identity or a '
                                  f'CropLayer (rows_to_crop, cols_to_crop), got '
                                  f'{type(layer).__name__}')
            rows, cols = rows + r, cols + c
        if rows or cols:
            pad = (conv.padding[0] - rows, conv.padding[1] - cols)
            branches.append((CroppedConvStage.from_conv(conv, pad), bn))
        else:
            branches.append((conv, bn))
    last_bn = getattr(m, 'last_bn', None)
    if last_bn is not None:
        _check_bn(last_bn, 'last_bn', square.out_channels)
    return _build(branches, _post(getattr(m, 'nonlinear', None)), last_bn,
                  source=f'acnet.{type(m).__name__}')


def _identity_based(conv: nn.Module) -> bool:
    """DBB's ``IdentityBasedConv1x1``: an ``nn.Conv2d`` whose kernel is weight + identity."""
    return isinstance(conv, nn.Conv2d) and (hasattr(conv, 'id_tensor')
                                            or hasattr(conv, 'get_actual_kernel'))


def _bn_and_pad(m: nn.Module, where: str) -> tuple[_BatchNorm, int]:
    """``(bn, pad_pixels)`` of DBB's ``BNAndPadLayer`` (``.bn``, ``.pad_pixels``), or
    ``(bn, 0)`` for a plain BN."""
    if isinstance(m, _BatchNorm):
        return m, 0
    bn, pad = getattr(m, 'bn', None), getattr(m, 'pad_pixels', None)
    if not (isinstance(bn, _BatchNorm) and isinstance(pad, int) and pad >= 0
            and [n for n, _ in m.named_children()] == ['bn']):
        raise _AdaptError(f'{where}: expected a BatchNorm or a BNAndPadLayer (bn, pad_pixels),'
                          f' got {type(m).__name__}')
    return bn, pad


def _children_in_order(m: nn.Module, where: str, *layouts: list[str]) -> dict[str, nn.Module]:
    kids = dict(m.named_children())
    if list(kids) not in [list(lay) for lay in layouts]:
        raise _AdaptError(f'{where}: expected the submodules {" or ".join(map(str, layouts))}'
                          f' in this order, got {list(kids)}')
    return kids


def _read_dbb_avg(m: nn.Module) -> list:
    """``dbb_avg``: ``avgbn(avg(bn(conv(x))))`` (``bn`` a ``BNAndPadLayer`` padding the pooling
    input) or ``avgbn(avg(x))`` (depthwise DBB)."""
    kids = _children_in_order(m, 'dbb_avg', ['conv', 'bn', 'avg', 'avgbn'], ['avg', 'avgbn'])
    pool = kids['avg']
    if type(pool) is not nn.AvgPool2d or pool.ceil_mode or not pool.count_include_pad or \
            pool.divisor_override is not None:
        raise _AdaptError(f'dbb_avg.avg: expected nn.AvgPool2d(ceil_mode=False, '
                          f'count_include_pad=True, divisor_override=None), got {pool!r}')
    k, stride, padding = _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding)
    avgbn = _check_bn(kids['avgbn'], 'dbb_avg.avgbn')
    if 'conv' not in kids:
        return [(AvgStage(avgbn.num_features, k, stride, padding), avgbn)]
    conv = _check_conv(kids['conv'], 'dbb_avg.conv')
    bn, pad = _bn_and_pad(kids['bn'], 'dbb_avg.bn')
    _check_bn(bn, 'dbb_avg.bn', conv.out_channels)
    first = shared_conv_stage(conv)
    first.bn = bn
    avg = BNPadAvgStage(conv.out_channels, k, stride, (padding[0] + pad, padding[1] + pad),
                        first)
    _check_bn(avgbn, 'dbb_avg.avgbn', conv.out_channels)
    return [(first, bn), (avg.to(conv.weight.device, conv.weight.dtype), avgbn)]


def _read_dbb_1x1_kxk(m: nn.Module) -> list:
    """``dbb_1x1_kxk``: ``bn2(conv2(bn1(idconv1(x) or conv1(x))))``, ``bn1`` a
    ``BNAndPadLayer`` padding the KxK conv's input; ``idconv1`` (``IdentityBasedConv1x1``)
    computes a 1x1 conv with kernel ``weight + identity``."""
    kids = _children_in_order(m, 'dbb_1x1_kxk', ['idconv1', 'bn1', 'conv2', 'bn2'],
                              ['conv1', 'bn1', 'conv2', 'bn2'])
    name = 'idconv1' if 'idconv1' in kids else 'conv1'
    conv1 = kids[name]
    if _identity_based(conv1):
        if not (isinstance(conv1, nn.Conv2d) and conv1.kernel_size == (1, 1)
                and conv1.stride == (1, 1) and conv1.padding == (0, 0)
                and conv1.dilation == (1, 1) and conv1.bias is None
                and conv1.in_channels == conv1.out_channels):
            raise _AdaptError(f'dbb_1x1_kxk.{name}: an IdentityBasedConv1x1 must be a square '
                              f'1x1 stride-1 conv without bias, got {conv1!r}')
        first = IdentityBasedConvStage(conv1.weight, conv1.groups)
        id_tensor = getattr(conv1, 'id_tensor', None)
        if isinstance(id_tensor, torch.Tensor) and not torch.equal(
                id_tensor.to(first._id), first._id):
            raise _AdaptError(f'dbb_1x1_kxk.{name}.id_tensor is not the grouped identity')
    elif name == 'idconv1':
        raise _AdaptError(f'dbb_1x1_kxk.idconv1: expected an IdentityBasedConv1x1 (with '
                          f'id_tensor), got {type(conv1).__name__}')
    else:
        first = shared_conv_stage(_check_conv(conv1, 'dbb_1x1_kxk.conv1'))
    bn1, pad = _bn_and_pad(kids['bn1'], 'dbb_1x1_kxk.bn1')
    first.bn = _check_bn(bn1, 'dbb_1x1_kxk.bn1', first.out_channels)
    conv2 = _check_conv(kids['conv2'], 'dbb_1x1_kxk.conv2')
    second = BNPadConvStage.from_conv(conv2, (conv2.padding[0] + pad, conv2.padding[1] + pad),
                                      first)
    bn2 = _check_bn(kids['bn2'], 'dbb_1x1_kxk.bn2', conv2.out_channels)
    return [(first, first.bn), (second, bn2)]


def _read_dbb(m: nn.Module) -> ForeignRepBlock:
    """DingXiaoH/DiverseBranchBlock ``DiverseBranchBlock``: ``nonlinear(dbb_origin(x) +
    dbb_1x1(x) + dbb_avg(x) + dbb_1x1_kxk(x))`` (``dbb_1x1`` only when
    ``groups < out_channels``).

    Every parameter and BN is reused; the inner KxK stages (``dbb_avg.avg``,
    ``dbb_1x1_kxk.conv2``) become :class:`~repq_mm.rep.foreign_stages.BNPadAvgStage` /
    :class:`~repq_mm.rep.foreign_stages.BNPadConvStage` padded with the preceding BN's value
    on a zero input. Eval mode is exact. In training they pad, by default
    (``pad_stats='in_use'``), with the batch statistics the BN normalises with (what the
    merged conv implies), where the original ``BNAndPadLayer`` pads with the running
    statistics after the update and detached affine parameters: border pixels of those two
    branches differ, and so do the batch statistics of ``avgbn`` / ``bn2``. With
    ``pad_stats='running'`` (:func:`set_pad_stats`) the multi-branch computation pads as the
    original, so those BN statistics (and the interior of the RepQ training output) are the
    original's.
    """
    _expect_children(m, {'dbb_origin', 'dbb_1x1', 'dbb_avg', 'dbb_1x1_kxk', 'nonlinear'})
    for need in ('dbb_avg', 'dbb_1x1_kxk'):
        if getattr(m, need, None) is None:
            raise _AdaptError(f'{need} is missing')
    branches = [_conv_bn(m.dbb_origin, 'dbb_origin')]
    if getattr(m, 'dbb_1x1', None) is not None:
        branches.append(_conv_bn(m.dbb_1x1, 'dbb_1x1'))
    branches += [_read_dbb_avg(m.dbb_avg), _read_dbb_1x1_kxk(m.dbb_1x1_kxk)]
    return _build(branches, _post(getattr(m, 'nonlinear', None)),
                  source=f'dbb.{type(m).__name__}')


#: family -> (matcher, reader). A matcher sees a module that is not deployed; a reader
#: returns a ForeignRepBlock or raises _AdaptError with the reason. Matchers test a
#: family's defining attribute and exclude each other.
FOREIGN_BLOCKS: dict[str, tuple[Callable[[nn.Module], bool],
                                Callable[[nn.Module], ForeignRepBlock]]] = {
    'mmpretrain.RepVGGBlock': (lambda m: hasattr(m, 'branch_3x3'), _read_mmpretrain_repvgg),
    'mmpretrain.MobileOneBlock': (lambda m: hasattr(m, 'branch_conv_list'),
                                  _read_mmpretrain_mobileone),
    'yolo.RepVGGBlock': (lambda m: hasattr(m, 'rbr_dense') and not hasattr(m, 'post_se'),
                         _read_yolo_repvgg),
    'repvggplus.RepVGGplusBlock': (lambda m: hasattr(m, 'rbr_dense') and hasattr(m, 'post_se'),
                                   _read_repvggplus),
    'apple.MobileOneBlock': (lambda m: hasattr(m, 'rbr_conv'), _read_apple_mobileone),
    'acnet.ACBlock': (lambda m: hasattr(m, 'square_conv'), _read_acnet),
    'dbb.DiverseBranchBlock': (lambda m: hasattr(m, 'dbb_origin'), _read_dbb),
}

#: attribute names of the known families' branches: a module that has one but matches no
#: family is a look-alike (warned about)
_REP_MARKERS = ('branch_3x3', 'branch_1x1', 'branch_norm', 'branch_conv_list', 'branch_scale',
                'rbr_dense', 'rbr_1x1', 'rbr_identity', 'rbr_conv', 'rbr_scale', 'rbr_skip',
                'square_conv', 'square_bn', 'ver_conv', 'ver_bn', 'hor_conv', 'hor_bn',
                'dbb_origin', 'dbb_avg', 'dbb_1x1', 'dbb_1x1_kxk')

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _family(m: nn.Module) -> str | None:
    """``'ours'``, a key of :data:`FOREIGN_BLOCKS`, or ``None``."""
    if isinstance(m, RepBlock):
        return 'ours'
    if _is_deployed(m):
        return None
    for family, (matches, _) in FOREIGN_BLOCKS.items():
        if matches(m):
            return family
    return None


def _linear_conv_bn(m: nn.Module) -> nn.Conv2d | None:
    """The conv of a linear conv+BN unit (children: a conv, then a BN without a fused
    activation, ``nn.Identity`` ignored), else ``None``."""
    if isinstance(m, (nn.Conv2d, _BatchNorm)) or \
            getattr(m, 'order', ('conv', 'norm', 'act')) != ('conv', 'norm', 'act'):
        return None
    kids = [c for c in m.children() if not isinstance(c, nn.Identity)]
    if len(kids) != 2:
        return None
    conv, bn = kids
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm)
            and bn.num_features == conv.out_channels and not isinstance(conv.padding, str)
            and all(isinstance(c, nn.Identity) for c in bn.children())):
        return None
    return conv


def _parallel_conv_bn(m: nn.Module) -> list[str]:
    """Names of the largest set (>= 2) of linear conv+BN units among ``m``'s direct children
    (and the entries of direct ``ModuleList`` / ``ModuleDict`` children) that could be summed:
    same in / out channels, stride, groups and output size. ``[]`` for containers."""
    if isinstance(m, _CONTAINERS):
        return []
    sets: dict[tuple, list[str]] = {}
    for n, child in m.named_children():
        items = child.named_children() if isinstance(child, (nn.ModuleList, nn.ModuleDict)) \
            else [(None, child)]
        for n2, unit in items:
            conv = _linear_conv_bn(unit)
            if conv is None:
                continue
            span = tuple(d * (k - 1) + 1 - 2 * p for k, p, d in
                         zip(conv.kernel_size, conv.padding, conv.dilation))
            key = (conv.in_channels, conv.out_channels, tuple(conv.stride), conv.groups, span)
            sets.setdefault(key, []).append(n if n2 is None else f'{n}.{n2}')
    best = max(sets.values(), key=len, default=[])
    return best if len(best) >= 2 else []


def _look_alike(m: nn.Module) -> str | None:
    """Why ``m`` (matched by no family) looks like a re-parameterized block, or ``None``."""
    if isinstance(m, RepBlock) or _is_deployed(m):
        return None
    markers = [a for a in _REP_MARKERS if hasattr(m, a)]
    if markers:
        return f'it has {markers}, attributes of the known rep-block families'
    units = _parallel_conv_bn(m)
    if units:
        return (f'its conv+BN units {units} have the same geometry, as the parallel branches '
                'of a re-parameterizable block')
    return None


def _warn_look_alike(name: str, m: nn.Module, reason: str) -> None:
    how = (f"skip=[{name!r}] (config: repq=dict(skip=[{name!r}]); it is then left "
           'unconverted and unquantized)' if name else
           f'warnings.filterwarnings (skip cannot name the root module; category '
           f'{LookAlikeWarning.__name__})')
    warnings.warn(
        f'module {name or "<root>"!r} ({type(m).__name__}) looks like a re-parameterized '
        f'block ({reason}) but matches no adapter of repq_mm.convert.FOREIGN_BLOCKS '
        f'({", ".join(FOREIGN_BLOCKS)}): its convs are treated as separate plain '
        f'(quantized) convs and merge_model leaves it multi-branch. If that is intended, '
        f'silence this with {how}.', LookAlikeWarning, stacklevel=4)


@torch.no_grad()
def _verify(foreign: nn.Module, blk: ForeignRepBlock) -> None:
    """Check once, in eval mode on a small random input, that ``blk`` computes what
    ``foreign`` computes (float32 tensors on a real device only)."""
    p = next(itertools.chain(blk.parameters(), blk.buffers()), None)
    if p is None or p.dtype != torch.float32 or p.device.type == 'meta':
        return
    size = max(blk.kernel_size) + 4
    gen = torch.Generator().manual_seed(0)          # leave the global RNG untouched
    x = torch.randn(2, blk.in_channels, size, size, generator=gen).to(p.device)
    modes = [(m, m.training) for m in (*foreign.modules(), *blk.modules())]
    try:
        foreign.eval()
        blk.eval()
        pairs = blk.reference_pairs(foreign, x)
    except Exception as e:  # noqa: BLE001 (reported with the module path by the caller)
        raise _AdaptError(f'checking the adapted block against the original forward '
                          f'failed: {type(e).__name__}: {e}') from e
    finally:
        for m, mode in modes:
            m.training = mode
    for ref, out in pairs:
        tol = 1e-4 * max(1.0, float(ref.abs().max()))
        if ref.shape != out.shape or not torch.allclose(out, ref, rtol=1e-4, atol=tol,
                                                        equal_nan=True):
            diff = (out - ref).abs().max().item() if ref.shape == out.shape else \
                f'shape {tuple(out.shape)} vs {tuple(ref.shape)}'
            raise _AdaptError(f'the adapted block does not reproduce the forward of '
                              f'{type(foreign).__name__} (max abs diff {diff}): its forward '
                              f'differs from the known layout of {blk.source}')


def _adapt(name: str, m: nn.Module, family: str) -> ForeignRepBlock:
    try:
        blk = FOREIGN_BLOCKS[family][1](m)
        reused = {id(mod) for mod in m.modules()}
        for mod in blk.modules():           # reused BN / act keep their own mode
            if id(mod) not in reused:
                mod.training = m.training
        _verify(m, blk)
    except _AdaptError as e:
        raise ValueError(f'cannot convert {name or "<root>"!r} ({type(m).__name__}, read as '
                         f'{family}): {e}') from None
    return blk


# --------------------------------------------------------------------------------------
# walking and replacing
# --------------------------------------------------------------------------------------
def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + '.') or fnmatch.fnmatchcase(name, p)
               for p in skip)


def _walk(module: nn.Module, name: str, skip: tuple[str, ...], look_alikes: list | None = None
          ) -> Iterator[tuple[str, nn.Module, str | None]]:
    """``(name, module, family)`` in registration order, every path of shared modules.

    Does not descend into skipped modules, into rep blocks (except a RepBlock's ``act``:
    an SE there holds plain convs) or into ``nn.MultiheadAttention`` (it reads its
    ``out_proj`` weight directly, so replacing that Linear would change nothing).
    ``look_alikes`` (when given) receives ``(name, module, reason)`` for every module matched
    by no family that looks like a rep block (:func:`_look_alike`), once per module.
    """
    if name and _skipped(name, skip):
        return
    family = _family(module)
    if family is None and look_alikes is not None and \
            all(m is not module for _, m, _ in look_alikes):
        reason = _look_alike(module)
        if reason is not None:
            look_alikes.append((name, module, reason))
    yield name, module, family
    if family is not None and family != 'ours' or isinstance(module, nn.MultiheadAttention):
        return
    children = [('act', module.act)] if family == 'ours' else module.named_children()
    for n, child in children:
        yield from _walk(child, f'{name}.{n}' if name else n, skip, look_alikes)


def _replace(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent, _, attr = name.rpartition('.')
    setattr(root.get_submodule(parent) if parent else root, attr, new)
    return root


def _unique(items: Iterable[tuple[str, nn.Module]]) -> list[tuple[nn.Module, list[str]]]:
    """Group paths by module (a shared module is replaced by one shared new module)."""
    out: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, m in items:
        out.setdefault(id(m), (m, []))[1].append(name)
    return list(out.values())


def _adapt_foreign(model: nn.Module, skip: tuple[str, ...], undo: list | None = None,
                   look_alikes: list | None = None) -> nn.Module:
    """Replace every foreign rep block by its adapted form. All blocks are read first, so a
    block that cannot be read leaves ``model`` unchanged; ``undo`` (when given) receives
    ``(name, original)`` for :func:`_rollback`, ``look_alikes`` what :func:`_walk` finds."""
    found = [(n, m, f) for n, m, f in _walk(model, '', skip, look_alikes)
             if f not in (None, 'ours')]
    families = {id(m): f for _, m, f in found}
    adapted = [(m, names, _adapt(names[0], m, families[id(m)]))
               for m, names in _unique((n, m) for n, m, _ in found)]
    for m, names, blk in adapted:
        for name in names:
            model = _replace(model, name, blk)
            if undo is not None:
                undo.append((name, m))
    return model


def _rollback(model: nn.Module, undo: list) -> nn.Module:
    for name, original in reversed(undo):
        model = _replace(model, name, original)
    return model


def _check_skip(model: nn.Module, skip: tuple[str, ...]) -> None:
    """Every ``skip`` entry must be a string naming (or matching) a module of ``model``."""
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    for p in skip:
        if not isinstance(p, str) or not p:
            raise ValueError(f'skip entries must be module names or fnmatch patterns '
                             f'(non-empty strings), got {p!r}')
        if not any(_skipped(n, (p,)) for n in names):
            top = [n for n, _ in model.named_children()]
            raise ValueError(f'skip entry {p!r} matches no module of the model: skip takes '
                             f"module names or fnmatch patterns (e.g. 'backbone.stem', "
                             f"'head.*'), not layer types; top-level modules: {top[:12]}")


def _unmatched_layer_bits(layer_bits: dict[str, int], names: list[str]) -> None:
    for p in layer_bits:
        if not any(_skipped(n, (p,)) for n in names):
            have = (f'quantized layers include {names[:3]} ... {names[-3:]}' if names else
                    'the model has no layer left to quantize')
            raise ValueError(f'layer_bits entry {p!r} matches no quantized layer; {have}')


def find_rep_blocks(model: nn.Module, skip: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """The re-parameterized blocks of ``model`` as ``(name, module)``, in registration order:
    our :class:`RepBlock` s and not yet deployed foreign blocks (:data:`FOREIGN_BLOCKS`).

    Warns (:class:`LookAlikeWarning`) for every module that looks like a rep block but
    matches no known family (see the module docstring); ``skip`` silences that.

    Example:
        >>> from repq_mm.rep import RepVGGBlock
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), RepVGGBlock(8, 8))
        >>> [(name, type(m).__name__) for name, m in find_rep_blocks(net)]
        [('1', 'RepVGGBlock')]
    """
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    look_alikes: list = []
    found = [(n, m) for n, m, f in _walk(model, '', skip, look_alikes) if f is not None]
    _warn_look_alikes(look_alikes)
    return found


def _warn_look_alikes(look_alikes: list) -> None:
    for name, m, reason in look_alikes:
        _warn_look_alike(name, m, reason)


def set_pad_stats(model: nn.Module, pad_stats: str) -> int:
    """Set ``pad_stats`` (``'in_use'`` or ``'running'``) on every inner stage of ``model``
    that pads with a preceding BN's value (read from DBB's ``BNAndPadLayer``, see
    :class:`~repq_mm.rep.foreign_stages.BNPadConvStage`); returns how many were set.

    ``'running'`` pads as the original DBB (running statistics, detached affine parameters):
    the multi-branch computation, hence the batch statistics and running-statistics updates
    of the following BNs, are then the original's; ``'in_use'`` (default) pads with the
    statistics the BN uses, which is what the merged conv implies at the border.

    Example:
        >>> from repq_mm.rep import DiverseBranchBlock
        >>> set_pad_stats(DiverseBranchBlock(4, 4), 'running')    # ours has no such stage
        0
    """
    if pad_stats not in PAD_STATS:
        raise ValueError(f'pad_stats must be one of {PAD_STATS}, got {pad_stats!r}')
    n = 0
    for m in model.modules():
        if isinstance(m, _BNPadMixin):
            m.set_pad_stats(pad_stats)
            n += 1
    return n


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
_WRAPPER_MODULES = ('mmcv.cnn.bricks.wrappers',)   # Conv2d/Linear that only add empty-input handling


def _plain_kind(m: nn.Module, name: str) -> type | None:
    """``QConv2d`` / ``QLinear`` for a plain conv / linear that can be quantized."""
    for base, qcls in ((nn.Conv2d, QConv2d), (nn.Linear, QLinear)):
        if not isinstance(m, base) or isinstance(m, qcls):
            continue
        cls = type(m)
        if cls.forward is base.forward or cls.__module__ in _WRAPPER_MODULES:
            return qcls
        warnings.warn(f'{name!r}: {cls.__name__} overrides forward(); left unquantized')
    return None


def _quantized_copy(m: nn.Module, qcls: type, qcfg: QConfig, name: str) -> nn.Module:
    try:
        q = qcls.from_float(m, qcfg)
    except ValueError as e:
        raise ValueError(f'cannot quantize {name or "<root>"!r}: {e}') from None
    q.weight.requires_grad_(m.weight.requires_grad)
    if m.bias is not None:
        q.bias.requires_grad_(m.bias.requires_grad)
    return q.train(m.training)


def _settings(qcfg, settings: dict) -> RepQConfig:
    """``qcfg`` (a QConfig / RepQConfig / dict / None) plus keyword settings, validated."""
    if isinstance(qcfg, RepQConfig) and not settings:
        return qcfg                                 # checked when it was made
    for key in ('method', 'deploy'):
        if key in settings:
            raise TypeError(f'convert_to_repq: {key!r} is a RepQModel setting (merge_model '
                            f'before / after converting does what it selects)')
    if qcfg is None:
        base = {}
    elif isinstance(qcfg, QConfig):
        base = {f.name: getattr(qcfg, f.name) for f in dataclasses.fields(qcfg)}
    elif isinstance(qcfg, dict):
        base = dict(qcfg)
    else:
        raise TypeError(f'convert_to_repq: qcfg must be a QConfig, RepQConfig or dict, got '
                        f'{type(qcfg).__name__}')
    twice = [k for k in settings if k in base and base[k] != settings[k]]
    if twice:
        raise ValueError(f'convert_to_repq: {twice} given both in qcfg and as keywords, '
                         f'with different values')
    return RepQConfig.from_dict({**base, **settings}, 'convert_to_repq')


def convert_to_repq(model: nn.Module, qcfg: QConfig | dict | None = None, *,
                    quantize: bool = True, quantize_plain: bool = True, inplace: bool = True,
                    **settings) -> nn.Module:
    """Convert ``model`` for RepQ quantization-aware training.

    1. Foreign rep blocks (:data:`FOREIGN_BLOCKS`: mmpretrain ``RepVGGBlock`` /
       ``MobileOneBlock``, YOLOv6 ``RepVGGBlock`` / ``QARepVGGBlock``, YOLOv7 ``RepConv``,
       DingXiaoH's ``RepVGGBlock`` / ``RepVGGplusBlock`` / ``ACBlock`` /
       ``DiverseBranchBlock``, Apple's ``MobileOneBlock``) are read into a
       :class:`ForeignRepBlock` (same parameters and BN modules). Modules that only look
       like rep blocks get a :class:`LookAlikeWarning` (see the module docstring).
    2. Every rep block gets ``enable_repq(qcfg, quantize)``: forward
       ``act(conv(Q_a(x), Q_w(M), B))`` with the merged kernel ``M``.
    3. With ``quantize`` and ``quantize_plain``, every other ``nn.Conv2d`` / ``nn.Linear``
       (including those in a rep block's ``act``, e.g. SE) becomes ``QConv2d`` / ``QLinear``.

    With ``quantize=False`` the converted model computes what ``model`` computes, in eval
    and in train mode (running statistics included, ``bn_mode='exact'``), to float rounding.

    Args:
        model: any module (a rep block or conv at the root is replaced too).
        qcfg: settings as a :class:`~repq_mm.quant.QConfig` /
            :class:`~repq_mm.settings.RepQConfig` or a dict of their keys (``None``: the
            defaults). Keyword ``settings`` are added to it; a key given both ways with
            different values is an error. ``method`` and ``deploy`` are the caller's
            (``RepQModel`` merges before / after); as keywords they are refused.
        **settings: any :class:`~repq_mm.settings.RepQConfig` field:
            ``w_bits``, ``a_bits`` (2..8), ``bn_mode`` (``'exact'``: RepQ-BN, ``'est'``:
            RepQ-BNEst), ``per_channel``, ``act_signed``, ``symmetric``, ``impl``,
            ``est_refresh``, ``init``, ``est_stats`` (see :class:`~repq_mm.quant.QConfig`),
            and
        first_bits, last_bits: bit width (weights and activations) of the first and the
            last quantized layer in registration order (``None``: as the rest). When one
            layer is both, ``last_bits`` wins.
        layer_bits: ``{name or fnmatch pattern: bits}`` for any quantized layer (weights
            and activations; a pattern also matches the layers below a named module, as in
            ``skip``), applied after ``first_bits`` / ``last_bits``; later entries win.
            Every entry must match at least one quantized layer. E.g. a detector's
            per-level output convs: ``{'bbox_head.rtm_cls': 8, 'bbox_head.rtm_reg': 8}``.
        quantize: add quantizers; ``False`` only switches rep blocks to the merged forward.
        quantize_plain: also quantize plain convs / linears.
        skip: module names or ``fnmatch`` patterns left untouched, with their children
            (which also silences the :class:`LookAlikeWarning` for them).
        inplace: modify ``model`` (``False``: work on a deep copy).

    Returns:
        The converted model (the same object when ``inplace`` unless the root was replaced).

    Raises:
        KeyError: an unknown setting (with the closest valid key).
        ValueError: a bad setting (naming it and the value), or a module matched by a family of
            :data:`FOREIGN_BLOCKS` that cannot be read or does not reproduce its forward
            (naming its path and the reason).

    Example:
        >>> from repq_mm.rep import RepVGGBlock
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), RepVGGBlock(8, 8, act=nn.ReLU()),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        >>> qnet = convert_to_repq(net, w_bits=4, a_bits=4, first_bits=8, last_bits=8,
        ...                        inplace=False)
        >>> [type(m).__name__ for m in qnet if not isinstance(m, (nn.AdaptiveAvgPool2d,
        ...                                                        nn.Flatten))]
        ['QConv2d', 'RepVGGBlock', 'QLinear']
        >>> qnet[0].w_quant.bits, qnet[1].w_quant.bits, qnet[4].a_quant.bits
        (8, 4, 8)
        >>> qnet(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 10])
    """
    rcfg = _settings(qcfg, settings)
    qcfg, skip, layer_bits = rcfg.qconfig(), rcfg.skip, rcfg.layer_bits or {}
    first_bits, last_bits = rcfg.first_bits, rcfg.last_bits
    _check_skip(model, skip)
    if not inplace:
        model = copy.deepcopy(model)
    # nothing is changed unless everything can be converted: foreign blocks are all read
    # before any is replaced, quantized copies all built before any is put in place
    undo: list = []
    look_alikes: list = []
    model = _adapt_foreign(model, skip, undo, look_alikes)

    plain = quantize and quantize_plain
    targets = []                              # (name, module, QConv2d/QLinear or None)
    for name, m, family in _walk(model, '', skip):
        if family is not None:
            if not (m.w_quant is not None or m.a_quant is not None):   # not converted yet
                targets.append((name, m, None))
        elif plain and (qcls := _plain_kind(m, name)) is not None:
            targets.append((name, m, qcls))
    kinds = {id(m): qcls for _, m, qcls in targets}
    groups = _unique((n, m) for n, m, _ in targets)
    plan = []
    try:
        if quantize:
            _unmatched_layer_bits(layer_bits, [n for _, names in groups for n in names])
        for i, (m, names) in enumerate(groups):
            cfg = qcfg
            for bits, here in ((first_bits, i == 0), (last_bits, i == len(groups) - 1),
                               *((b, any(_skipped(n, (p,)) for n in names))
                                 for p, b in layer_bits.items())):
                if bits is not None and here:
                    cfg = cfg.replace(w_bits=bits, a_bits=bits)
            if kinds[id(m)] is None:
                try:
                    m.check_repq()
                except ValueError as e:
                    raise ValueError(f'cannot convert {names[0] or "<root>"!r}: {e}') from None
            q = None if kinds[id(m)] is None else _quantized_copy(m, kinds[id(m)], cfg,
                                                                   names[0])
            plan.append((m, names, cfg, q))
    except BaseException:
        _rollback(model, undo)
        raise
    for m, names, cfg, q in plan:
        if q is None:
            m.enable_repq(cfg, quantize)
            continue
        for name in names:
            model = _replace(model, name, q)
    for name, mod in model.named_modules():     # names for error messages
        if isinstance(mod, LSQQuantizer):
            mod.name = name
    install_est_refresh_schedule(model)
    _warn_look_alikes(look_alikes)
    return model


def merge_model(model: nn.Module, inplace: bool = False, skip: Iterable[str] = ()
                ) -> nn.Module:
    """Replace every rep block (foreign ones are read first) by its ``to_deploy()`` form:
    one ``nn.Conv2d`` (full precision) or ``QConv2d`` (quantized, weight already on the
    integer grid), followed by the block's ``act``; the weights of the other quantized
    ``QConv2d`` / ``QLinear`` layers are put on their grid too (:func:`snap_to_grid`), so
    every quantized weight of the result is ``codes * scale``.

    In eval mode the result computes what ``model`` computes (to float rounding; for a RepQ
    model exactly its quantized eval output). On a full-precision model this gives the
    single-branch network of the paper's LSQ baseline:
    ``convert_to_repq(merge_model(fp_model))``.

    Args:
        model: any module.
        inplace: modify ``model`` (default: work on a deep copy).
        skip: module names or ``fnmatch`` patterns left untouched (not merged), with their
            children, as in :func:`convert_to_repq` (silences look-alike warnings there too).

    Example:
        >>> from repq_mm.rep import RepVGGBlock
        >>> net = nn.Sequential(RepVGGBlock(4, 8), RepVGGBlock(8, 8, act=nn.ReLU())).eval()
        >>> merged = merge_model(net)
        >>> merged
        Sequential(
          (0): Conv2d(4, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
          (1): Sequential(
            (0): Conv2d(8, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
            (1): ReLU()
          )
        )
        >>> x = torch.randn(2, 4, 8, 8)
        >>> torch.allclose(net(x), merged(x), atol=1e-5)
        True
    """
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    _check_skip(model, skip)
    if not inplace:
        model = copy.deepcopy(model)
    look_alikes: list = []
    model = _adapt_foreign(model, skip, look_alikes=look_alikes)
    blocks = [(n, m) for n, m, f in _walk(model, '', skip) if f is not None]
    for blk, names in _unique(blocks):
        deployed = blk.to_deploy()
        deployed.training = blk.training          # the new conv / Sequential; act keeps its own
        if isinstance(deployed, nn.Sequential):
            deployed[0].training = blk.training
        for name in names:
            model = _replace(model, name, deployed)
    skipped = {id(m) for n, m in model.named_modules(remove_duplicate=False)
               if n and _skipped(n, skip)}
    for m in model.modules():
        if id(m) not in skipped:
            snap_to_grid(m, recurse=False)
    _warn_look_alikes(look_alikes)
    return model


@torch.no_grad()
def snap_to_grid(model: nn.Module, recurse: bool = True) -> int:
    """``weight <- Q_w(weight)`` for every ``QConv2d`` / ``QLinear`` whose weight quantizer
    is enabled and initialised, and ``bias <- quantized_bias()`` for those with ``int_bias``
    (what their forward uses anyway, so outputs do not change). Returns the number of
    layers (``recurse=False``: ``model`` itself only)."""
    n = 0
    for m in (model.modules() if recurse else (model,)):
        q = getattr(m, 'w_quant', None)
        if isinstance(m, (QConv2d, QLinear)) and q is not None and q.enabled and \
                q.is_initialized:
            if m.int_bias and m.bias is not None:
                m.bias.copy_(m.quantized_bias())
            m.weight.copy_(q(m.weight))
            n += 1
    return n
