"""How well RepQ-BNEst's estimated statistics match the exact batch statistics."""
from __future__ import annotations

import copy

import torch

from .base import RepBlock


@torch.no_grad()
def batch_stats(block: RepBlock, x: torch.Tensor, mode: str) -> list[tuple[torch.Tensor, ...]]:
    """``(mean, biased var)`` of every BN of ``block`` (order of ``block.bns()``) for input
    ``x`` with ``mode`` ``'exact'`` or ``'est'``; ``block`` itself is not changed."""
    blk = copy.deepcopy(block).train()
    blk.w_quant = None   # statistics of the full-precision kernel on the given input
    n = None
    for bn in blk.bns():
        bn.momentum = 1.0            # running stats := this batch's statistics
    blk.merge(x, mode)
    out = []
    for bn in blk.bns():
        n = n or 1
        out.append((bn.running_mean.clone(), bn.running_var.clone()))
    return out


@torch.no_grad()
def bnest_errors(block: RepBlock, x: torch.Tensor) -> list[dict]:
    """Per BN: error of the estimated mean in units of the exact standard deviation,
    relative error of the estimated variance, for input ``x``.

    Example:
        >>> from repq_mm.rep import RepVGGBlock
        >>> errs = bnest_errors(RepVGGBlock(4, 4), torch.randn(8, 4, 6, 6))
        >>> len(errs), sorted(errs[0])
        (3, ['bn', 'mean_err', 'var_err'])
    """
    exact, est = batch_stats(block, x, 'exact'), batch_stats(block, x, 'est')
    names = {id(m): n for n, m in block.named_modules()}
    rows = []
    for bn, (me, ve), (ma, va) in zip(block.bns(), exact, est):
        sd = ve.clamp(min=1e-12).sqrt()
        rows.append(dict(bn=names[id(bn)],
                         mean_err=((ma - me).abs() / sd).mean().item(),
                         var_err=((va - ve).abs() / ve.clamp(min=1e-12)).mean().item()))
    return rows
