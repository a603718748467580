"""Diverse Branch Block (Ding et al., "Diverse Branch Block: Building a Convolution as an
Inception-like Unit", CVPR 2021)."""
from __future__ import annotations

from torch import nn

from .base import RepBlock, register_block
from .kernels import identity_kernel
from .stages import AvgStage, ConvStage


@register_block
class DiverseBranchBlock(RepBlock):
    """DBB: the sum of four branches, then ``act``:

    * ``BN(convKxK(x))``;
    * ``BN(conv1x1(x))`` (only when ``groups < out_channels``, as the original);
    * ``BN(avgKxK(BN(conv1x1(x))))`` (depthwise: ``BN(avgKxK(x))``);
    * ``BN(convKxK(BN(conv1x1(x))))`` with ``in_channels`` internal channels
      (``2 * in_channels`` when depthwise); the 1x1 starts as the identity when square
      (DBB's ``IdentityBasedConv1x1``).

    Inner KxK stages pad with the preceding BN's output on a zero input (DBB's
    ``BNAndPadLayer``, here with the statistics in use), so the merge is exact.

    Example:
        >>> import torch
        >>> blk = DiverseBranchBlock(8, 8, kernel_size=3, stride=2).eval()
        >>> x = torch.randn(2, 8, 9, 9)
        >>> torch.allclose(blk(x), blk.to_deploy()(x), atol=1e-5)
        True
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, groups=1,
                 act=None, padding=None, internal_channels_1x1_3x3=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, act)
        k, p = self.kernel_size, self.padding
        bn = nn.BatchNorm2d
        self.add_branch(ConvStage(in_channels, out_channels, k, stride, p, groups,
                                  bn=bn(out_channels)))
        if groups < out_channels:
            self.add_branch(ConvStage(in_channels, out_channels, 1, stride,
                                      (p[0] - k[0] // 2, p[1] - k[1] // 2), groups,
                                      bn=bn(out_channels)))
        avg = AvgStage(out_channels, k, stride, p, bn=bn(out_channels))
        if groups < out_channels or in_channels != out_channels:
            self.add_branch(ConvStage(in_channels, out_channels, 1, 1, 0, groups,
                                      bn=bn(out_channels)), avg)
        else:
            self.add_branch(avg)
        d = internal_channels_1x1_3x3 or (
            in_channels if groups < out_channels else 2 * in_channels)
        self.add_branch(
            ConvStage(in_channels, d, 1, 1, 0, groups, bn=bn(d),
                      weight=identity_kernel(d, groups) if d == in_channels else None),
            ConvStage(d, out_channels, k, stride, p, groups, bn=bn(out_channels)))
        self.check()
