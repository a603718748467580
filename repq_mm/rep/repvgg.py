"""RepVGG (Ding et al., CVPR 2021) and QARepVGG (Chu et al., 2022) blocks."""
from __future__ import annotations

from torch import nn

from .base import RepBlock, register_block
from .stages import ConvStage, IdentityStage


@register_block
class RepVGGBlock(RepBlock):
    """``BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)`` (identity when ``in == out`` and
    stride 1), then ``act``.

    Example:
        >>> import torch
        >>> blk = RepVGGBlock(8, 8, act=nn.ReLU()).eval()
        >>> x = torch.randn(2, 8, 16, 16)
        >>> deploy = blk.to_deploy()          # Sequential(Conv2d(8, 8, 3), ReLU)
        >>> torch.allclose(blk(x), deploy(x), atol=1e-5)
        True
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, groups=1,
                 act=None, use_identity=True, padding=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, act)
        k = self.kernel_size[0]
        p = self.padding[0]
        self.add_branch(ConvStage(in_channels, out_channels, k, stride, p, groups,
                                  bn=nn.BatchNorm2d(out_channels)))
        if k > 1:
            self.add_branch(ConvStage(in_channels, out_channels, 1, stride, p - k // 2, groups,
                                      bn=nn.BatchNorm2d(out_channels)))
        if use_identity and in_channels == out_channels and self.stride == (1, 1):
            self.add_branch(IdentityStage(in_channels, groups, bn=nn.BatchNorm2d(in_channels)))
        self.check()


@register_block
class QARepVGGBlock(RepBlock):
    """QARepVGG: ``BN(conv3x3(x)) + conv1x1(x) + x``, then a BN on the sum and ``act``
    (the quantization-friendly variant used by YOLOv6 v3)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, groups=1,
                 act=None, use_identity=True, padding=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, act)
        k, p = self.kernel_size[0], self.padding[0]
        self.add_branch(ConvStage(in_channels, out_channels, k, stride, p, groups,
                                  bn=nn.BatchNorm2d(out_channels)))
        self.add_branch(ConvStage(in_channels, out_channels, 1, stride, p - k // 2, groups))
        if use_identity and in_channels == out_channels and self.stride == (1, 1):
            self.add_branch(IdentityStage(in_channels, groups))
        self.post_bn = nn.BatchNorm2d(out_channels)
        self.check()
