"""Necks of the YOLO-style RepQ detectors (registered in mmdet's ``MODELS``).

* :class:`RepPAN`: YOLOv6 (v1/v2) Rep-PAN: top-down and bottom-up paths whose fusion stages
  are :class:`~.layers.RepStage` s of rep blocks.
* :class:`ELANPAN`: YOLOv7-tiny-style PAN with ELAN fusion blocks and YOLOv7 ``RepConv``
  outputs.

Both take the stride 8 / 16 / 32 maps and return three maps of ``out_channels`` each (an
output rep block per level), as mmdet's single-level-width heads (``RTMDetSepBNHead``)
expect.
"""
from __future__ import annotations

import torch
from mmcv.cnn import ConvModule
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from torch import nn

from .layers import DEFAULT_NORM, ELANBlock, RepStage, make_divisible, make_round, rep_block


def _up(x):
    return nn.functional.interpolate(x, scale_factor=2.0, mode='nearest')


@MODELS.register_module()
class RepPAN(BaseModule):
    """YOLOv6 Rep-PAN neck.

    Args:
        in_channels: widths of C3, C4, C5.
        base_channels: the six neck widths before ``widen_factor`` (YOLOv6: 256, 128, 128,
            256, 256, 512: reduce-C5, reduce-P4, down-P3, out-P4, down-P4, out-P5).
        num_repeats: blocks of the four RepStages before ``deepen_factor`` (YOLOv6: 12 each).
        out_channels: width of every output (an output rep block per level); ``None``:
            no output blocks, the widths are ``[c1, c3, c5]`` of the scaled base widths.
        block_type / out_block_type: rep blocks of the stages / of the outputs.

    Example:
        >>> import torch
        >>> neck = RepPAN([32, 64, 128], widen_factor=0.125, out_channels=32)
        >>> feats = [torch.randn(1, c, s, s) for c, s in ((32, 8), (64, 4), (128, 2))]
        >>> [tuple(o.shape) for o in neck(feats)]
        [(1, 32, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2)]
    """

    def __init__(self, in_channels, base_channels=(256, 128, 128, 256, 256, 512),
                 num_repeats=(12, 12, 12, 12), deepen_factor: float = 0.33,
                 widen_factor: float = 0.25, out_channels: int | None = None,
                 block_type: str = 'RepVGGBlock', out_block_type: str | None = None,
                 act_cfg=dict(type='ReLU', inplace=True), norm_cfg=DEFAULT_NORM,
                 init_cfg=None):
        super().__init__(init_cfg)
        c3, c4, c5 = in_channels
        n = [make_divisible(c * widen_factor) for c in base_channels]
        r = [make_round(k, deepen_factor) for k in num_repeats]
        kw = dict(norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.reduce0 = ConvModule(c5, n[0], 1, **kw)
        self.rep_p4 = RepStage(c4 + n[0], n[0], r[0], block_type, act_cfg)
        self.reduce1 = ConvModule(n[0], n[1], 1, **kw)
        self.rep_p3 = RepStage(c3 + n[1], n[1], r[1], block_type, act_cfg)
        self.down2 = ConvModule(n[1], n[2], 3, 2, 1, **kw)
        self.rep_n3 = RepStage(n[2] + n[1], n[3], r[2], block_type, act_cfg)
        self.down1 = ConvModule(n[3], n[4], 3, 2, 1, **kw)
        self.rep_n4 = RepStage(n[4] + n[0], n[5], r[3], block_type, act_cfg)
        widths = [n[1], n[3], n[5]]
        if out_channels is None:
            self.out_convs = None
            self.out_channels = widths
        else:
            self.out_convs = nn.ModuleList(
                rep_block(out_block_type or block_type, w, out_channels, 1, act_cfg)
                for w in widths)
            self.out_channels = [out_channels] * 3

    def forward(self, inputs):
        x3, x2, x1 = inputs
        fpn0 = self.reduce0(x1)
        f4 = self.rep_p4(torch.cat([_up(fpn0), x2], 1))
        fpn1 = self.reduce1(f4)
        p3 = self.rep_p3(torch.cat([_up(fpn1), x3], 1))
        p4 = self.rep_n3(torch.cat([self.down2(p3), fpn1], 1))
        p5 = self.rep_n4(torch.cat([self.down1(p4), fpn0], 1))
        outs = [p3, p4, p5]
        if self.out_convs is not None:
            outs = [conv(o) for conv, o in zip(self.out_convs, outs)]
        return tuple(outs)


@MODELS.register_module()
class ELANPAN(BaseModule):
    """YOLOv7-tiny-style PAN: lateral 1x1 convs, ELAN fusion blocks top-down and bottom-up,
    and a YOLOv7 ``RepConv`` (3x3 + 1x1 + identity branches with BN) on every output.

    Args:
        in_channels: widths of C3, C4, C5.
        mid_channels: widths of P3, P4, P5 before ``widen_factor`` (tiny: 64, 128, 256).
        out_channels: width of the three outputs (the ``RepConv`` s).
        out_block_type: the output rep block (default ``'RepConv'``).

    Example:
        >>> import torch
        >>> neck = ELANPAN([32, 64, 64], widen_factor=0.25, out_channels=32)
        >>> feats = [torch.randn(1, c, s, s) for c, s in ((32, 8), (64, 4), (64, 2))]
        >>> [tuple(o.shape) for o in neck(feats)]
        [(1, 32, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2)]
    """

    def __init__(self, in_channels, mid_channels=(64, 128, 256), widen_factor: float = 1.0,
                 out_channels: int = 128, elan_depth: int = 2,
                 out_block_type: str = 'RepConv',
                 act_cfg=dict(type='LeakyReLU', negative_slope=0.1, inplace=True),
                 norm_cfg=DEFAULT_NORM, init_cfg=None):
        super().__init__(init_cfg)
        c3, c4, c5 = in_channels
        m3, m4, m5 = [make_divisible(c * widen_factor) for c in mid_channels]
        kw = dict(norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.lat5 = ConvModule(c5, m4, 1, **kw)
        self.lat4 = ConvModule(c4, m4, 1, **kw)
        self.td4 = ELANBlock(2 * m4, m4, m4 // 2, elan_depth, **kw)
        self.lat4b = ConvModule(m4, m3, 1, **kw)
        self.lat3 = ConvModule(c3, m3, 1, **kw)
        self.td3 = ELANBlock(2 * m3, m3, m3 // 2, elan_depth, **kw)
        self.down3 = ConvModule(m3, m4, 3, 2, 1, **kw)
        self.bu4 = ELANBlock(2 * m4, m4, m4 // 2, elan_depth, **kw)
        self.down4 = ConvModule(m4, m5, 3, 2, 1, **kw)
        self.bu5 = ELANBlock(m5 + c5, m5, m5 // 2, elan_depth, **kw)
        self.out_convs = nn.ModuleList(
            rep_block(out_block_type, w, out_channels, 1, act_cfg) for w in (m3, m4, m5))
        self.out_channels = [out_channels] * 3

    def forward(self, inputs):
        x3, x4, x5 = inputs
        t4 = self.td4(torch.cat([_up(self.lat5(x5)), self.lat4(x4)], 1))
        p3 = self.td3(torch.cat([_up(self.lat4b(t4)), self.lat3(x3)], 1))
        p4 = self.bu4(torch.cat([self.down3(p3), t4], 1))
        p5 = self.bu5(torch.cat([self.down4(p4), x5], 1))
        return tuple(conv(p) for conv, p in zip(self.out_convs, (p3, p4, p5)))
