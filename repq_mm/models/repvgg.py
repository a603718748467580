"""RepVGG classifier (Ding et al., CVPR 2021) built from :class:`repq_mm.rep.RepVGGBlock`.

Torch only. The layer structure follows mmpretrain's ``RepVGG`` backbone with a
``GlobalAveragePooling`` neck and a ``LinearClsHead`` (same block count, channels, strides,
branch layout and non-inplace ReLU per block), so timings of the two are comparable:

* stem: ``RepVGGBlock(in_channels, min(64, 64 * a), stride=strides[0])`` (no identity
  branch since ``in != out``);
* stage ``i`` (``i = 0..3``): ``num_blocks[i]`` blocks with ``64 * 2**i * w_i`` channels,
  the first with ``stride=strides[i + 1]``, where ``w = (a, a, a, b)``;
* global average pool, ``nn.Linear(512 * b, num_classes)``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..rep import RepBlock, RepVGGBlock

#: arch -> (num_blocks, (a, b)), from the RepVGG paper (Table 2) / mmpretrain
REPVGG_ARCHS: dict[str, tuple[tuple[int, ...], tuple[float, float]]] = {
    'A0': ((2, 4, 14, 1), (0.75, 2.5)),
    'A1': ((2, 4, 14, 1), (1.0, 2.5)),
    'A2': ((2, 4, 14, 1), (1.5, 2.75)),
    'B0': ((4, 6, 16, 1), (1.0, 2.5)),
}


class RepVGGNet(nn.Module):
    """RepVGG image classifier.

    Args:
        arch: ``'A0'``, ``'A1'``, ``'A2'`` or ``'B0'`` (case-insensitive).
        in_channels: input image channels.
        num_classes: outputs of the linear head.
        width_multiplier: ``(a, b)`` overriding the arch's multipliers (e.g. a
            width-reduced net for tests).
        strides: stride of the stem and of the first block of each of the 4 stages.
        num_blocks: blocks per stage overriding the arch's (4 values).
        base_channels: channels of stage 0 before the multiplier (64 in the paper).

    Example:
        >>> net = RepVGGNet('A0', num_classes=10, width_multiplier=(0.125, 0.25),
        ...                 num_blocks=(1, 1, 1, 1)).eval()
        >>> x = torch.randn(2, 3, 32, 32)
        >>> deployed = net.deploy()
        >>> torch.allclose(net(x), deployed(x), atol=1e-5)
        True
    """

    def __init__(self, arch: str = 'A0', in_channels: int = 3, num_classes: int = 1000,
                 width_multiplier: tuple[float, float] | None = None,
                 strides: tuple[int, ...] = (2, 2, 2, 2, 2),
                 num_blocks: tuple[int, ...] | None = None, base_channels: int = 64):
        super().__init__()
        key = arch.upper()
        if key not in REPVGG_ARCHS:
            raise ValueError(f'unknown RepVGG arch {arch!r}; expected one of '
                             f'{sorted(REPVGG_ARCHS)}')
        arch_blocks, arch_width = REPVGG_ARCHS[key]
        a, b = width_multiplier if width_multiplier is not None else arch_width
        num_blocks = tuple(num_blocks) if num_blocks is not None else arch_blocks
        if len(num_blocks) != 4 or len(strides) != 5:
            raise ValueError(f'need 4 num_blocks and 5 strides, got {num_blocks} / {strides}')
        self.arch = key
        widths = (a, a, a, b)
        stem_channels = min(base_channels, int(base_channels * a))
        self.stem = RepVGGBlock(in_channels, stem_channels, stride=strides[0], act=nn.ReLU())
        channels = stem_channels
        stages = []
        for i, n in enumerate(num_blocks):
            out = int(base_channels * 2 ** i * widths[i])
            blocks = []
            for j in range(n):
                blocks.append(RepVGGBlock(channels, out, stride=strides[i + 1] if j == 0 else 1,
                                          act=nn.ReLU()))
                channels = out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.out_channels = channels
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.gap(self.forward_features(x)), 1))

    def rep_blocks(self) -> list[RepBlock]:
        """All rep blocks, stem first."""
        return [m for m in self.modules() if isinstance(m, RepBlock)]

    @torch.no_grad()
    def deploy(self, inplace: bool = False) -> 'RepVGGNet':
        """Every block replaced by its ``to_deploy()`` form (one conv + ReLU)."""
        net = self if inplace else copy.deepcopy(self)
        net.stem = net.stem.to_deploy()
        for stage in net.stages:
            for j, blk in enumerate(stage):
                if isinstance(blk, RepBlock):
                    stage[j] = blk.to_deploy()
        return net
