"""YOLOv7 RepConv (Wang et al., "YOLOv7: Trainable bag-of-freebies sets new
state-of-the-art for real-time object detectors", CVPR 2023; RepVGG-style block)."""
from __future__ import annotations

from torch import nn

from .base import RepBlock, register_block
from .stages import ConvStage, IdentityStage


@register_block
class RepConv(RepBlock):
    """YOLOv7 ``RepConv``: ``BN(convKxK(x)) + BN(conv1x1(x)) + BN(x)`` (identity when
    ``in == out`` and stride 1), branches in this order (``rbr_dense``, ``rbr_1x1``,
    ``rbr_identity``), then ``act``.

    ``act`` follows YOLOv7: ``True`` (default) gives ``nn.SiLU()``, a module is used as is,
    anything else (``False``, ``None``) gives no activation.

    Example:
        >>> import torch
        >>> blk = RepConv(8, 8).eval()       # act: SiLU
        >>> x = torch.randn(2, 8, 9, 9)
        >>> torch.allclose(blk(x), blk.to_deploy()(x), atol=1e-5)
        True
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None,
                 groups=1, act=True, use_identity=True):
        act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else None)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, act)
        k, p = self.kernel_size, self.padding
        self.add_branch(ConvStage(in_channels, out_channels, k, stride, p, groups,
                                  bn=nn.BatchNorm2d(out_channels)))
        if k != (1, 1):
            self.add_branch(ConvStage(in_channels, out_channels, 1, stride,
                                      (p[0] - k[0] // 2, p[1] - k[1] // 2), groups,
                                      bn=nn.BatchNorm2d(out_channels)))
        if use_identity and in_channels == out_channels and self.stride == (1, 1):
            self.add_branch(IdentityStage(in_channels, groups, bn=nn.BatchNorm2d(in_channels)))
        self.check()
