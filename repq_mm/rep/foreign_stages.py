"""Stages the adapters of :mod:`repq_mm.convert` need to read the original authors' blocks
exactly (torch only); each reuses the foreign module's own ``nn.Parameter``.

* :class:`CroppedConvStage`: a conv whose padding may be negative, meaning that many rows /
  columns of the input are cropped first (ACNet's asymmetric branches when
  ``padding < kernel_size // 2``).
* :class:`IdentityBasedConvStage`: a 1x1 conv whose kernel is ``weight + I`` with a fixed
  identity ``I`` (DBB's ``IdentityBasedConv1x1``).
* :class:`BNPadConvStage` / :class:`BNPadAvgStage`: an inner KxK conv / average pooling that
  follows a BN and is padded with that BN's value on a zero input (DBB's ``BNAndPadLayer``).
  ``pad_stats='in_use'`` (default) pads with the statistics the BN uses (batch statistics in
  training), which is what makes the merged conv equal to the branch in training as well;
  ``pad_stats='running'`` pads as the original DBB does: with the running statistics after
  the BN's update, and the BN's affine parameters detached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import identity_kernel
from .stages import AvgStage, ConvStage, Stage

__all__ = ['shared_conv_stage', 'CroppedConvStage', 'IdentityBasedConvStage', 'BNPadConvStage',
           'BNPadAvgStage', 'PAD_STATS']

#: values of ``pad_stats`` (see :class:`BNPadConvStage`)
PAD_STATS = ('in_use', 'running')


def shared_conv_stage(conv: nn.Conv2d, padding=None, cls=ConvStage, **kwargs):
    """A ``cls`` (a :class:`ConvStage`) with ``conv``'s geometry and ``padding`` (default:
    ``conv.padding``) whose weight / bias are ``conv``'s own Parameters (the same objects:
    values and ``requires_grad`` kept)."""
    padding = conv.padding if padding is None else padding
    stage = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding,
                conv.groups, bias=conv.bias is not None, weight=conv.weight.detach(), **kwargs)
    stage.weight = conv.weight
    if conv.bias is not None:
        stage.bias = conv.bias
    return stage


class CroppedConvStage(ConvStage):
    """A :class:`ConvStage` whose ``padding`` may be negative: ``-p`` crops ``p`` rows
    (columns) on each side before the conv, as ACNet does for its 1xK / Kx1 branches when
    ``padding < kernel_size // 2``. The kernel (hence the merge) is that of the conv.

    Example:
        >>> st = CroppedConvStage(2, 4, (3, 1), padding=(0, -1))
        >>> st.run(torch.randn(1, 2, 5, 5)).shape       # 5 - 3 + 1 rows, 5 - 2 columns
        torch.Size([1, 4, 3, 3])
    """

    def op(self, x, padding):
        ph, pw = padding
        ch, cw = max(-ph, 0), max(-pw, 0)
        if ch or cw:
            x = x[:, :, ch:x.shape[2] - ch, cw:x.shape[3] - cw]
        return F.conv2d(x, self.weight, self.bias, self.stride, (max(ph, 0), max(pw, 0)), 1,
                        self.groups)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, padding) -> 'CroppedConvStage':
        """Read ``conv`` (its own Parameters) with the effective ``padding``."""
        return shared_conv_stage(conv, padding, cls)


class IdentityBasedConvStage(Stage):
    """1x1 conv with kernel ``weight + I`` (``I``: the fixed grouped identity), DBB's
    ``IdentityBasedConv1x1``; ``weight`` is the foreign module's Parameter.

    Example:
        >>> st = IdentityBasedConvStage(nn.Parameter(torch.zeros(4, 2, 1, 1)), groups=2)
        >>> x = torch.randn(1, 4, 3, 3)
        >>> torch.equal(st.run(x), x)                   # zero weight: the identity
        True
    """

    def __init__(self, weight: nn.Parameter, groups: int = 1, bn=None):
        channels = weight.shape[0]
        if tuple(weight.shape) != (channels, channels // groups, 1, 1):
            raise ValueError(f'IdentityBasedConvStage: weight of shape {tuple(weight.shape)} '
                             f'is not a square 1x1 kernel with groups={groups}')
        super().__init__(channels, channels, 1, 1, 0, groups, bn)
        self.weight = weight
        self.register_buffer('_id', identity_kernel(channels, groups, weight.dtype,
                                                    weight.device), persistent=False)

    def kernel(self):
        return self.weight + self._id, None


class _BNPadMixin:
    """``run`` for an inner stage padded with the preceding BN's value on a zero input;
    ``pad_stats`` chooses the statistics (see the module docstring)."""

    pad_stats: str

    def _init_pad(self, prev: Stage, pad_stats: str) -> None:
        # plain (unregistered) reference: the stage and its BN already live in the block
        self._pad_source = (prev,)
        self.set_pad_stats(pad_stats)

    def set_pad_stats(self, pad_stats: str) -> None:
        if pad_stats not in PAD_STATS:
            raise ValueError(f'pad_stats must be one of {PAD_STATS}, got {pad_stats!r}')
        bn = self._pad_source[0].bn
        if pad_stats == 'running' and (bn is None or not bn.track_running_stats
                                       or bn.running_mean is None):
            raise ValueError("pad_stats='running' needs a preceding BN with running "
                             'statistics')
        self.pad_stats = pad_stats

    @torch.no_grad()
    def running_pad_value(self) -> torch.Tensor:
        """The preceding stage's bias (or zero), through its BN with running statistics and
        detached affine parameters: DBB's ``BNAndPadLayer`` pad value."""
        prev = self._pad_source[0]
        bn = prev.bn
        b = prev.kernel()[1]
        rm, rv = bn.running_mean, bn.running_var
        c = (b if b is not None else torch.zeros_like(rm)) - rm
        c = c * torch.rsqrt(rv + bn.eps)
        if bn.affine:
            c = c * bn.weight + bn.bias
        return c

    def run(self, x, pad_value=None):
        if self.pad_stats == 'running' and pad_value is not None:
            pad_value = self.running_pad_value()
        return super().run(x, pad_value)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, pad_stats={self.pad_stats}'


class BNPadConvStage(_BNPadMixin, ConvStage):
    """Inner KxK :class:`ConvStage` after a BN (DBB's ``dbb_1x1_kxk.conv2`` after
    ``BNAndPadLayer``); ``padding`` is the BN layer's ``pad_pixels`` plus the conv's own.

    Example:
        >>> first = ConvStage(4, 4, 1, bn=nn.BatchNorm2d(4))
        >>> conv = nn.Conv2d(4, 4, 3, bias=False)
        >>> st = BNPadConvStage.from_conv(conv, 1, first, pad_stats='running')
        >>> st.padding, st.pad_stats
        ((1, 1), 'running')
        >>> st.weight is conv.weight
        True
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, padding, prev: Stage,
                  pad_stats: str = 'in_use') -> 'BNPadConvStage':
        stage = shared_conv_stage(conv, padding, cls)
        stage._init_pad(prev, pad_stats)
        return stage


class BNPadAvgStage(_BNPadMixin, AvgStage):
    """Inner KxK average pooling after a BN (DBB's ``dbb_avg.avg`` after
    ``BNAndPadLayer``)."""

    def __init__(self, channels, kernel_size, stride, padding, prev: Stage,
                 pad_stats: str = 'in_use', bn=None):
        super().__init__(channels, kernel_size, stride, padding, bn)
        self._init_pad(prev, pad_stats)
