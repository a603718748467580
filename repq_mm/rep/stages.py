"""Linear stages a branch is made of. Each stage knows its kernel (differentiable in its
parameters) and how to run itself in full precision; an optional BN follows it.

A stage with padding that is not the first of its branch pads its input with the value
the preceding affine map takes on a zero input (DBB/ECB-style bias padding), which makes
the merged single conv exactly equal to the branch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import identity_kernel


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class Stage(nn.Module):
    """Base class: a grouped linear map ``(in_channels) -> (out_channels)``.

    Subclasses implement :meth:`kernel` and may override :meth:`op` with a cheaper
    equivalent (identity, average pooling).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, stride=1,
                 padding=0, groups: int = 1, bn: nn.Module | None = None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'{type(self).__name__}: channels {in_channels}->{out_channels} '
                             f'not divisible by groups={groups}')
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.groups = _pair(padding), groups
        self.bn = bn

    def kernel(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def op(self, x: torch.Tensor, padding) -> torch.Tensor:
        """Full-precision op with zero ``padding``."""
        w, b = self.kernel()
        return F.conv2d(x, w, b, self.stride, padding, 1, self.groups)

    def run(self, x: torch.Tensor, pad_value: torch.Tensor | None = None) -> torch.Tensor:
        """Full-precision forward without BN; pads with ``pad_value`` per channel
        (zeros when ``None``)."""
        ph, pw = self.padding
        if pad_value is None or not (ph or pw):
            return self.op(x, self.padding)
        c = pad_value.reshape(1, -1, 1, 1)
        return self.op(F.pad(x - c, (pw, pw, ph, ph)) + c, 0)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}, padding={self.padding}, groups={self.groups}')


class ConvStage(Stage):
    """A learnable conv (optionally with bias)."""

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, padding=0,
                 groups=1, bias=False, bn=None, weight: torch.Tensor | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, bn)
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        if weight is None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:
            with torch.no_grad():
                self.weight.copy_(weight)

    def kernel(self):
        return self.weight, self.bias

    def op(self, x, padding):
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, 1, self.groups)


class IdentityStage(Stage):
    """Identity (``in == out``, stride 1): a 1x1 kernel with ones on the diagonal."""

    def __init__(self, channels: int, groups: int = 1, bn=None):
        super().__init__(channels, channels, 1, 1, 0, groups, bn)
        self.register_buffer('_id', identity_kernel(channels, groups), persistent=False)

    def kernel(self):
        return self._id, None

    def op(self, x, padding):
        return x


class AvgStage(Stage):
    """Fixed KxK average pooling (depthwise kernel ``1/(kh kw)``), DBB's avg branch."""

    def __init__(self, channels: int, kernel_size=3, stride=1, padding=0, bn=None):
        super().__init__(channels, channels, kernel_size, stride, padding, channels, bn)
        kh, kw = self.kernel_size
        self.register_buffer('_avg', torch.full((channels, 1, kh, kw), 1.0 / (kh * kw)),
                             persistent=False)

    def kernel(self):
        return self._avg, None

    def op(self, x, padding):
        # zero padding counted in the average = the fixed 1/(kh kw) kernel on a zero-padded map
        return F.avg_pool2d(x, self.kernel_size, self.stride, padding, count_include_pad=True)


class ScaleStage(Stage):
    """Learnable per-channel scaling (OREPA branch scaling), a depthwise 1x1 kernel."""

    def __init__(self, channels: int, init: float = 1.0, bn=None):
        super().__init__(channels, channels, 1, 1, 0, channels, bn)
        self.scale = nn.Parameter(torch.full((channels,), float(init)))

    def kernel(self):
        return self.scale.reshape(-1, 1, 1, 1), None

    def op(self, x, padding):
        return x * self.scale.reshape(1, -1, 1, 1)


class MaskStage(Stage):
    """Fixed depthwise mask with learnable per-channel scale and bias (ECBSR Sobel /
    Laplacian branches): ``kernel = scale[o] * mask``."""

    MASKS = {
        'sobel_x': [[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]],
        'sobel_y': [[1., 2., 1.], [0., 0., 0.], [-1., -2., -1.]],
        'laplacian': [[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]],
    }

    def __init__(self, channels: int, mask: str, padding=1, bn=None):
        super().__init__(channels, channels, 3, 1, padding, channels, bn)
        if mask not in self.MASKS:
            raise ValueError(f'unknown mask {mask!r}; expected one of {sorted(self.MASKS)}')
        self.mask_name = mask
        self.register_buffer('_mask', torch.tensor(self.MASKS[mask]).expand(channels, 1, 3, 3)
                             .clone(), persistent=False)
        self.scale = nn.Parameter(torch.randn(channels, 1, 1, 1) * 1e-3)
        self.bias = nn.Parameter(torch.randn(channels) * 1e-3)

    def kernel(self):
        return self._mask * self.scale, self.bias
