"""Batch-norm statistics used by RepQ: exact batch statistics, input moments for BNEst,
running-statistics updates with ``nn.BatchNorm2d`` semantics, SyncBN all-reduce."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def wants_sync(bn: nn.Module | None) -> bool:
    """SyncBN semantics: the module is a ``SyncBatchNorm`` and more than one rank runs."""
    return isinstance(bn, nn.SyncBatchNorm) and _world() > 1


def _var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased per-channel ``(var, mean)`` over all dims but 1.

    Uses ATen's batch-norm statistics kernel (``torch.batch_norm_update_stats`` without running
    buffers): the same values as ``torch.var_mean(x, (0, 2, 3), unbiased=False)`` and 3-5x
    faster on CPU (measured on A0-sized maps, 1 thread), because it is the channel-blocked
    kernel ``nn.BatchNorm2d`` itself uses; ``var_mean`` is the fallback for other dtypes.
    """
    if x.dtype in (torch.float32, torch.float64) and x.dim() >= 2 and x.numel():
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        return var, mean
    return torch.var_mean(x, dim=[0, *range(2, x.dim())], unbiased=False)


class _ChannelVarMean(torch.autograd.Function):
    """Per-channel biased ``(var, mean)`` over (N, H, W) with a one-pass backward
    ``dx = (g_mean + 2 g_var (x - mean)) / n`` (autograd's generic one is ~2x slower on CPU)."""

    @staticmethod
    def forward(ctx, x):
        var, mean = _var_mean(x)
        ctx.save_for_backward(x, mean)
        return var, mean

    @staticmethod
    def backward(ctx, g_var, g_mean):
        x, mean = ctx.saved_tensors
        n = x.numel() // x.shape[1]
        shape = (1, -1, 1, 1)
        if g_var is None:
            return (g_mean / n).reshape(shape).expand_as(x).clone()
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
        return torch.addcmul((g_mean / n).reshape(shape), x - mean.reshape(shape),
                             (2.0 / n * g_var).reshape(shape))


def channel_var_mean(y: torch.Tensor, sync: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel biased variance and mean of ``y`` (N, C, H, W) over (N, H, W).

    With ``sync`` the moments are all-reduced over ranks with autograd support
    (SyncBN semantics). Returns ``(var, mean, n)`` with ``n`` elements per channel (global).
    """
    c = y.shape[1]
    n = y.numel() // c
    if not sync:
        if y.requires_grad and torch.is_grad_enabled():
            var, mean = _ChannelVarMean.apply(y)
        else:
            var, mean = _var_mean(y)
        return var, mean, n
    from torch.distributed.nn.functional import all_reduce
    packed = torch.cat([y.sum(dim=(0, 2, 3)), (y * y).sum(dim=(0, 2, 3)),
                        y.new_full((1,), float(n))])
    packed = all_reduce(packed)
    n_tot = packed[-1]
    mean = packed[:c] / n_tot
    var = (packed[c:2 * c] / n_tot - mean * mean).clamp(min=0)
    return var, mean, int(round(n_tot.item()))


@torch.no_grad()
def update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor,
                         var: torch.Tensor, n: int) -> None:
    """Update ``bn.running_mean/var`` exactly like ``nn.BatchNorm2d`` in training mode
    (unbiased variance, ``momentum=None`` meaning a cumulative average)."""
    if not bn.track_running_stats or bn.running_mean is None:
        return
    bn.num_batches_tracked.add_(1)
    m = bn.momentum
    if m is None:
        m = 1.0 / float(bn.num_batches_tracked)
    unbiased = var.detach() * (n / max(n - 1, 1))
    bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
    bn.running_var.mul_(1 - m).add_(unbiased, alpha=m)


def bn_uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Same rule as ``_BatchNorm.forward``."""
    return bn.training or not bn.track_running_stats or bn.running_mean is None


def input_moments(x: torch.Tensor, sync: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of the block input (one ``var_mean`` pass)."""
    var, mean, _ = channel_var_mean(x, sync)
    return mean, var
