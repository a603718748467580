"""OREPA (Hu et al., "Online Convolutional Re-parameterization", CVPR 2022)."""
from __future__ import annotations

from torch import nn

from .base import RepBlock, register_block
from .kernels import identity_kernel
from .stages import AvgStage, ConvStage, ScaleStage


@register_block
class OREPABlock(RepBlock):
    """OREPA-style block: BN-free linear branches, each scaled per channel by a learnable
    vector (:class:`ScaleStage`), summed, then one ``post_bn`` and ``act``:

    ``post_bn(s1*convKxK(x) + s2*conv1x1(x) + s3*convKxK(conv1x1(x)) + s4*avgKxK(conv1x1(x)))``

    Scales start at OREPA's values (origin 0.25, 1x1 1.0, 1x1-KxK 0.5, avg 0.25). The
    1x1-KxK branch has ``in_channels`` internal channels (``2 * in_channels`` when depthwise),
    its 1x1 starting as the identity when square.

    Example:
        >>> import torch
        >>> blk = OREPABlock(8, 8, kernel_size=3, groups=2).eval()
        >>> x = torch.randn(2, 8, 9, 9)
        >>> torch.allclose(blk(x), blk.to_deploy()(x), atol=1e-5)
        True
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, groups=1,
                 act=None, padding=None, init_scales=(0.25, 1.0, 0.5, 0.25)):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, act)
        k, p = self.kernel_size, self.padding
        s_kxk, s_1x1, s_1x1_kxk, s_avg = init_scales
        self.add_branch(ConvStage(in_channels, out_channels, k, stride, p, groups),
                        ScaleStage(out_channels, s_kxk))
        if k != (1, 1):
            self.add_branch(ConvStage(in_channels, out_channels, 1, stride,
                                      (p[0] - k[0] // 2, p[1] - k[1] // 2), groups),
                            ScaleStage(out_channels, s_1x1))
        d = in_channels if groups < out_channels else 2 * in_channels
        self.add_branch(
            ConvStage(in_channels, d, 1, 1, 0, groups,
                      weight=identity_kernel(d, groups) if d == in_channels else None),
            ConvStage(d, out_channels, k, stride, p, groups),
            ScaleStage(out_channels, s_1x1_kxk))
        if k != (1, 1):
            self.add_branch(ConvStage(in_channels, out_channels, 1, 1, 0, groups),
                            AvgStage(out_channels, k, stride, p),
                            ScaleStage(out_channels, s_avg))
        self.post_bn = nn.BatchNorm2d(out_channels)
        self.check()
