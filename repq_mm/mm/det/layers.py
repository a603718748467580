"""Small building blocks of the YOLO-style detectors (mmcv ``ConvModule`` + our rep blocks).

* :func:`rep_block`: one of our re-parameterized blocks (``RepVGGBlock``,
  ``QARepVGGBlock``, ``RepConv``, ...) with an mmcv activation config;
* :class:`RepStage`: YOLOv6 ``RepBlock`` (n rep blocks in a row);
* :class:`SPPF`: YOLOv5/YOLOv6 fast spatial pyramid pooling (three chained max-pools);
* :class:`ELANBlock`: YOLOv7 E-ELAN-style aggregation block (tiny form).
"""
from __future__ import annotations

import math

import torch
from mmcv.cnn import ConvModule, build_activation_layer
from torch import nn

from ...rep import REP_BLOCKS

DEFAULT_NORM = dict(type='BN', momentum=0.03, eps=0.001)


def make_divisible(x: float, divisor: int = 8) -> int:
    """YOLOv5/YOLOv6 channel rounding: the next multiple of ``divisor``."""
    return int(math.ceil(x / divisor) * divisor)


def make_round(n: int, depth: float) -> int:
    """YOLOv6 depth scaling: ``max(round(n * depth), 1)`` for ``n > 1``."""
    return max(round(n * depth), 1) if n > 1 else n


def rep_block(block_type: str, in_channels: int, out_channels: int, stride: int = 1,
              act_cfg: dict | None = dict(type='ReLU', inplace=True),
              kernel_size: int = 3) -> nn.Module:
    """A rep block of ``block_type`` (a key of :data:`repq_mm.rep.REP_BLOCKS`)."""
    if block_type not in REP_BLOCKS:
        raise KeyError(f'unknown rep block type {block_type!r}; known: {sorted(REP_BLOCKS)}')
    act = build_activation_layer(dict(act_cfg)) if act_cfg else None
    cls = REP_BLOCKS[block_type]
    if block_type == 'RepConv':
        act = act if act is not None else False
    return cls(in_channels, out_channels, kernel_size=kernel_size, stride=stride, act=act)


class RepStage(nn.Sequential):
    """YOLOv6 ``RepBlock``: ``num_blocks`` rep blocks, the first ``in -> out``, the rest
    ``out -> out`` (stride 1)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 1,
                 block_type: str = 'RepVGGBlock', act_cfg=dict(type='ReLU', inplace=True)):
        super().__init__(*[rep_block(block_type, in_channels if i == 0 else out_channels,
                                     out_channels, 1, act_cfg) for i in range(num_blocks)])


class SPPF(nn.Module):
    """``cv2(cat(x, m(x), m(m(x)), m(m(m(x)))))`` with ``x = cv1(input)`` and ``m`` a
    ``k x k`` stride-1 max-pool (equals SPP with kernels k, 2k-1, 3k-2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5,
                 norm_cfg=DEFAULT_NORM, act_cfg=dict(type='ReLU', inplace=True)):
        super().__init__()
        mid = in_channels // 2
        self.cv1 = ConvModule(in_channels, mid, 1, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.pool = nn.MaxPool2d(kernel_size, 1, kernel_size // 2)
        self.cv2 = ConvModule(mid * 4, out_channels, 1, norm_cfg=norm_cfg, act_cfg=act_cfg)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class ELANBlock(nn.Module):
    """YOLOv7(-tiny) ELAN: two 1x1 convs ``in -> mid``; the second feeds a chain of
    ``depth`` 3x3 convs; the two 1x1 outputs and every 3x3 output are concatenated and fused
    by a 1x1 conv to ``out``."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None,
                 depth: int = 2, norm_cfg=DEFAULT_NORM, act_cfg=dict(type='SiLU')):
        super().__init__()
        mid = mid_channels or out_channels // 2
        self.cv1 = ConvModule(in_channels, mid, 1, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.cv2 = ConvModule(in_channels, mid, 1, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.convs = nn.ModuleList(
            ConvModule(mid, mid, 3, padding=1, norm_cfg=norm_cfg, act_cfg=act_cfg)
            for _ in range(depth))
        self.fuse = ConvModule(mid * (2 + depth), out_channels, 1, norm_cfg=norm_cfg,
                               act_cfg=act_cfg)

    def forward(self, x):
        y = self.cv2(x)
        outs = [self.cv1(x), y]
        for conv in self.convs:
            y = conv(y)
            outs.append(y)
        return self.fuse(torch.cat(outs, 1))
