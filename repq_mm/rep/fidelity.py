"""How well RepQ-BNEst's estimated statistics match the exact batch statistics."""
from __future__ import annotations

import copy

import torch

from ..quant.config import EST_STATS, _one_of
from .base import RepBlock


@torch.no_grad()
def batch_stats(block: RepBlock, x: torch.Tensor, mode: str,
                est_stats: str | None = None) -> list[tuple[torch.Tensor, ...]]:
    """``(mean, biased var)`` of every BN of ``block`` (order of ``block.bns()``) for input
    ``x`` with ``mode`` ``'exact'`` or ``'est'`` (estimator ``est_stats``, default the
    block's own); ``block`` itself is not changed."""
    blk = copy.deepcopy(block).train()
    blk.w_quant = None   # statistics of the full-precision kernel on the given input
    if est_stats is not None:
        _one_of('est_stats', est_stats, EST_STATS)
        blk.est_stats = est_stats
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
def bnest_errors(block: RepBlock, x: torch.Tensor, est_stats: str | None = None) -> list[dict]:
    """Per BN: error of the estimated mean in units of the exact standard deviation,
    relative error of the estimated variance, for input ``x`` and estimator ``est_stats``
    (``'diag'``, ``'kron'``; default the block's own), and the kernel size of the map the
    BN normalises (``kernel``).

    Example:
        >>> from repq_mm.rep import RepVGGBlock
        >>> errs = bnest_errors(RepVGGBlock(4, 4), torch.randn(8, 4, 6, 6), 'kron')
        >>> len(errs), sorted(errs[0]), [e['kernel'] for e in errs]
        (3, ['bn', 'kernel', 'mean_err', 'var_err'], [(3, 3), (1, 1), (1, 1)])
    """
    exact = batch_stats(block, x, 'exact')
    est = batch_stats(block, x, 'est', est_stats)
    names = {id(m): n for n, m in block.named_modules()}
    geoms = block._bn_geometries()
    rows = []
    for bn, (me, ve), (ma, va) in zip(block.bns(), exact, est):
        sd = ve.clamp(min=1e-12).sqrt()
        rows.append(dict(bn=names[id(bn)], kernel=tuple(geoms[id(bn)][0]),
                         mean_err=((ma - me).abs() / sd).mean().item(),
                         var_err=((va - ve).abs() / ve.clamp(min=1e-12)).mean().item()))
    return rows
