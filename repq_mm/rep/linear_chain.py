"""Linear expansion chain (ExpandNets: Guo et al., "ExpandNets: Linear
Over-parameterization to Train Compact Convolutional Networks", NeurIPS 2020)."""
from __future__ import annotations

from torch import nn

from .base import RepBlock, register_block
from .stages import ConvStage


@register_block
class LinearChainBlock(RepBlock):
    """``BN(convKxK(conv1x1(x)))`` with the 1x1 expanding to ``expand * out_channels``
    channels, both with bias and no nonlinearity in between, then ``act``. The KxK pads
    with the 1x1's bias, so the merged conv is exact.

    Example:
        >>> import torch
        >>> blk = LinearChainBlock(4, 8, expand=4, stride=2).eval()
        >>> x = torch.randn(2, 4, 9, 9)
        >>> torch.allclose(blk(x), blk.to_deploy()(x), atol=1e-5)
        True
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, groups=1,
                 expand=4, act=None, padding=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, act)
        d = expand * out_channels
        self.add_branch(ConvStage(in_channels, d, 1, 1, 0, groups, bias=True),
                        ConvStage(d, out_channels, self.kernel_size, stride, self.padding,
                                  groups, bias=True, bn=nn.BatchNorm2d(out_channels)))
        self.check()
