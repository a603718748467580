"""ECB (Zhang et al., "Edge-oriented Convolution Block for Real-time Super Resolution on
Mobile Devices", ACM MM 2021; ECBSR)."""
from __future__ import annotations

from .base import RepBlock, register_block
from .stages import ConvStage, IdentityStage, MaskStage


@register_block
class ECBBlock(RepBlock):
    """Edge-oriented convolution block (3x3, stride 1, groups 1, no BN), then ``act``:

    ``conv3x3(x) + conv3x3(conv1x1(x)) + sum_m mask_m(conv1x1_m(x)) [+ x]``

    with ``conv1x1 -> conv3x3`` expanding to ``depth_multiplier * out_channels`` channels,
    the masks Sobel-x, Sobel-y and Laplacian (depthwise, learnable per-channel scale and
    bias), every conv with bias, and the identity only with ``with_idt`` and
    ``in == out``. Inner 3x3 stages pad with the 1x1's bias (as ECBSR), so the merge is
    exact.

    Example:
        >>> import torch
        >>> blk = ECBBlock(4, 8, depth_multiplier=2)
        >>> x = torch.randn(2, 4, 9, 9)
        >>> torch.allclose(blk(x), blk.to_deploy()(x), atol=1e-5)
        True
    """

    supports_stride = False
    supports_groups = False

    def __init__(self, in_channels, out_channels, depth_multiplier=2.0, act=None,
                 with_idt=False):
        super().__init__(in_channels, out_channels, 3, 1, 1, 1, act)
        mid = int(out_channels * depth_multiplier)
        if mid < 1:
            raise ValueError(f'ECBBlock: depth_multiplier={depth_multiplier} gives '
                             f'{mid} expansion channels for out_channels={out_channels}')
        self.add_branch(ConvStage(in_channels, out_channels, 3, 1, 1, bias=True))
        self.add_branch(ConvStage(in_channels, mid, 1, bias=True),
                        ConvStage(mid, out_channels, 3, 1, 1, bias=True))
        for mask in ('sobel_x', 'sobel_y', 'laplacian'):
            self.add_branch(ConvStage(in_channels, out_channels, 1, bias=True),
                            MaskStage(out_channels, mask))
        if with_idt and in_channels == out_channels:
            self.add_branch(IdentityStage(in_channels))
        self.check()
