"""ACNet (Ding et al., "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via
Asymmetric Convolution Blocks", ICCV 2019)."""
from __future__ import annotations

from torch import nn

from .base import RepBlock, register_block
from .stages import ConvStage


@register_block
class ACBlock(RepBlock):
    """Asymmetric convolution block: ``BN(convKxK(x)) + BN(conv1xK(x)) + BN(convKx1(x))``,
    then ``act``. The 1xK and Kx1 kernels sit on the centre row / column of the KxK one.

    Example:
        >>> import torch
        >>> blk = ACBlock(8, 16, kernel_size=3, stride=2, groups=2).eval()
        >>> x = torch.randn(2, 8, 9, 9)
        >>> torch.allclose(blk(x), blk.to_deploy()(x), atol=1e-5)
        True
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, groups=1,
                 act=None, padding=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, act)
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if kh != kw:
            raise ValueError(f'ACBlock needs a square kernel, got {self.kernel_size}')
        self.add_branch(ConvStage(in_channels, out_channels, (kh, kw), stride, (ph, pw), groups,
                                  bn=nn.BatchNorm2d(out_channels)))
        if kh > 1:
            self.add_branch(ConvStage(in_channels, out_channels, (1, kw), stride,
                                      (ph - kh // 2, pw), groups,
                                      bn=nn.BatchNorm2d(out_channels)))
            self.add_branch(ConvStage(in_channels, out_channels, (kh, 1), stride,
                                      (ph, pw - kw // 2), groups,
                                      bn=nn.BatchNorm2d(out_channels)))
        self.check()
