"""MobileOne (Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone",
CVPR 2023)."""
from __future__ import annotations

from torch import nn

from .base import RepBlock, register_block
from .stages import ConvStage, IdentityStage


@register_block
class MobileOneBlock(RepBlock):
    """MobileOne block: ``sum_k BN(convKxK_k(x)) + BN(conv1x1(x)) + BN(x)``, then ``act``.

    Branch order (relied upon by checkpoint adapters): ``num_conv_branches`` KxK conv+BN
    branches, then the 1x1 conv+BN "scale" branch (``use_scale`` and ``kernel_size > 1``),
    then the identity BN (``use_identity``, ``in == out`` and stride 1). Depthwise
    (``groups == in_channels``) is supported.

    Example:
        >>> import torch
        >>> blk = MobileOneBlock(8, 8, groups=8, num_conv_branches=3).eval()
        >>> x = torch.randn(2, 8, 9, 9)
        >>> torch.allclose(blk(x), blk.to_deploy()(x), atol=1e-5)
        True
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, groups=1,
                 num_conv_branches=1, use_scale=True, use_identity=True, act=None,
                 padding=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, act)
        k, p = self.kernel_size, self.padding
        for _ in range(num_conv_branches):
            self.add_branch(ConvStage(in_channels, out_channels, k, stride, p, groups,
                                      bn=nn.BatchNorm2d(out_channels)))
        if use_scale and k != (1, 1):
            self.add_branch(ConvStage(in_channels, out_channels, 1, stride,
                                      (p[0] - k[0] // 2, p[1] - k[1] // 2), groups,
                                      bn=nn.BatchNorm2d(out_channels)))
        if use_identity and in_channels == out_channels and self.stride == (1, 1):
            self.add_branch(IdentityStage(in_channels, groups, bn=nn.BatchNorm2d(in_channels)))
        self.check()
