"""Backbones of the YOLO-style RepQ detectors (registered in mmdet's ``MODELS``).

* :class:`EfficientRep`: YOLOv6 (v1/v2) backbone: a stride-2 rep-block stem, four stages of
  (stride-2 rep block, :class:`~.layers.RepStage`), :class:`~.layers.SPPF` at the end.
* :class:`ELANNet`: YOLOv7-tiny-style backbone: two stride-2 convs, ELAN blocks separated by
  2x2 max-pools, SPPF at the end.

Both return the stride 8 / 16 / 32 feature maps (``out_indices=(2, 3, 4)``).
"""
from __future__ import annotations

from mmcv.cnn import ConvModule
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import DEFAULT_NORM, SPPF, ELANBlock, RepStage, make_divisible, make_round, rep_block


class _Backbone(BaseModule):
    """Stages in ``self.stages`` (index 0: stem); returns the outputs of ``out_indices``."""

    def __init__(self, out_indices, frozen_stages: int = -1, norm_eval: bool = False,
                 init_cfg=None):
        super().__init__(init_cfg)
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

    def _check(self):
        n = len(self.stages)
        if any(not 0 <= i < n for i in self.out_indices):
            raise ValueError(f'out_indices {self.out_indices} out of range for {n} stages')

    def forward(self, x):
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def _freeze_stages(self):
        for i in range(self.frozen_stages + 1):
            m = self.stages[i]
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


@MODELS.register_module()
class EfficientRep(_Backbone):
    """YOLOv6 EfficientRep backbone built from our rep blocks.

    Args:
        in_channels: image channels.
        base_channels: widths of stem and stages 1-4 before ``widen_factor``
            (YOLOv6: 64, 128, 256, 512, 1024).
        num_repeats: blocks of stem and stages 1-4 before ``deepen_factor``
            (YOLOv6: 1, 6, 12, 18, 6).
        deepen_factor, widen_factor: YOLOv6 scaling (n: 0.33 / 0.25, s: 0.33 / 0.5,
            t: 0.33 / 0.375).
        block_type: rep block (``'RepVGGBlock'``, ``'QARepVGGBlock'``, any key of
            ``repq_mm.rep.REP_BLOCKS`` with the ``(in, out, kernel_size, stride, act)``
            signature).
        act_cfg: activation after each rep block / conv (YOLOv6: ReLU).
        out_indices: which of ``[stem, stage1, ..., stage4]`` to return.

    Example:
        >>> import torch
        >>> m = EfficientRep(widen_factor=0.125, deepen_factor=0.33)
        >>> [tuple(o.shape) for o in m(torch.randn(1, 3, 64, 64))]
        [(1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 2, 2)]
    """

    def __init__(self, in_channels: int = 3, base_channels=(64, 128, 256, 512, 1024),
                 num_repeats=(1, 6, 12, 18, 6), deepen_factor: float = 0.33,
                 widen_factor: float = 0.25, block_type: str = 'RepVGGBlock',
                 act_cfg=dict(type='ReLU', inplace=True), norm_cfg=DEFAULT_NORM,
                 spp_kernel_size: int = 5, out_indices=(2, 3, 4), frozen_stages: int = -1,
                 norm_eval: bool = False, init_cfg=None):
        super().__init__(out_indices, frozen_stages, norm_eval, init_cfg)
        if len(base_channels) != 5 or len(num_repeats) != 5:
            raise ValueError('base_channels and num_repeats need 5 entries (stem, 4 stages)')
        ch = [make_divisible(c * widen_factor) for c in base_channels]
        reps = [make_round(n, deepen_factor) for n in num_repeats]
        self.channels = ch
        stages = [rep_block(block_type, in_channels, ch[0], 2, act_cfg)]
        for i in range(1, 5):
            layers = [rep_block(block_type, ch[i - 1], ch[i], 2, act_cfg),
                      RepStage(ch[i], ch[i], reps[i], block_type, act_cfg)]
            if i == 4:
                layers.append(SPPF(ch[i], ch[i], spp_kernel_size, norm_cfg, act_cfg))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.out_channels = [ch[i] for i in self.out_indices]
        self._check()


@MODELS.register_module()
class ELANNet(_Backbone):
    """YOLOv7-tiny-style backbone: ``conv3x3 s2 -> conv3x3 s2 + ELAN -> (maxpool + ELAN) x3
    -> SPPF`` (plain convs; the rep blocks of the YOLOv7-style detector are the
    ``RepConv`` outputs of :class:`~.necks.ELANPAN`).

    Args:
        base_channels: widths of stem and stages 1-4 before ``widen_factor``
            (YOLOv7-tiny: 32, 64, 128, 256, 512); the SPPF halves the last one.
        elan_depth: 3x3 convs per ELAN block (tiny: 2).
        act_cfg: YOLOv7-tiny: LeakyReLU(0.1); YOLOv7: SiLU.

    Example:
        >>> import torch
        >>> m = ELANNet(widen_factor=0.25)
        >>> [tuple(o.shape) for o in m(torch.randn(1, 3, 64, 64))]
        [(1, 32, 8, 8), (1, 64, 4, 4), (1, 64, 2, 2)]
    """

    def __init__(self, in_channels: int = 3, base_channels=(32, 64, 128, 256, 512),
                 widen_factor: float = 1.0, elan_depth: int = 2,
                 act_cfg=dict(type='LeakyReLU', negative_slope=0.1, inplace=True),
                 norm_cfg=DEFAULT_NORM, spp_kernel_size: int = 5, out_indices=(2, 3, 4),
                 frozen_stages: int = -1, norm_eval: bool = False, init_cfg=None):
        super().__init__(out_indices, frozen_stages, norm_eval, init_cfg)
        if len(base_channels) != 5:
            raise ValueError('base_channels needs 5 entries (stem, 4 stages)')
        ch = [make_divisible(c * widen_factor) for c in base_channels]
        kw = dict(norm_cfg=norm_cfg, act_cfg=act_cfg)
        stages = [ConvModule(in_channels, ch[0], 3, 2, 1, **kw),
                  nn.Sequential(ConvModule(ch[0], ch[1], 3, 2, 1, **kw),
                                ELANBlock(ch[1], ch[1], ch[1] // 2, elan_depth, **kw))]
        for i in range(2, 5):
            layers = [nn.MaxPool2d(2, 2), ELANBlock(ch[i - 1], ch[i], ch[i] // 2, elan_depth,
                                                    **kw)]
            if i == 4:
                layers.append(SPPF(ch[i], ch[i] // 2, spp_kernel_size, **kw))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.channels = ch[:4] + [ch[4] // 2]
        self.out_channels = [self.channels[i] for i in self.out_indices]
        self._check()
