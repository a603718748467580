"""BN statistics of a branch estimated from the block input alone (RepQ-BNEst).

A BN inside a rep block normalises ``y = conv(x, W) + B``, where ``W`` is the kernel the
branch composes up to that BN (stride ``s``, zero padding ``p``). Two estimators:

* ``'diag'`` (the paper's, repq-method.md section 3): ``mean = sum W m + B``,
  ``var = sum W^2 v`` from the input's channel means ``m`` and variances ``v``: no zero
  padding, no stride, independent channels and positions (implemented in
  :mod:`.fold_est` and :mod:`.base`).
* ``'kron'`` (:func:`tap_statistics` + :func:`kron_estimate`, ours): the output at position
  ``q`` is ``W . P(q) + B`` with ``P(q)`` the patch (``C x K`` values, ``K = kh kw`` taps, zeros
  where a tap falls in the padding), so

  - the **mean is exact**: ``mean_o = sum_{i,t} W[o,i,t] M[i,t] + B_o`` with ``M[i,t]`` the
    mean of channel ``i`` over the positions tap ``t`` reads (padding included), computed
    from one reduction of ``x`` over the batch;
  - the variance is ``w_o^T Cov(P) w_o``; the patch covariance is approximated by a
    Kronecker product ``Cov(P) ~ C (x) R``: ``C`` the channel covariance at the centre tap
    (exact on the output grid, so a 1x1 or identity branch gets its **exact variance**
    ``w_o^T C w_o``) and ``R`` the ``K x K`` tap-pair covariance summed over channels and
    normalised to ``R[c, c] = 1`` (spatial correlation, zero padding and stride included),
    measured on at most ``budget`` input elements. Assumption: the spatial correlation
    between taps is the same for every channel pair, up to the scale ``C_ij``.

  Cost per block input: one pass for the tap means, a ``C x C`` Gram matrix of the centre
  tap (``N Ho Wo C^2`` multiply-adds, a ninth of a dense 3x3 conv with ``C`` outputs), ``K^2``
  products over the budget subsample; per BN ``O C^2 K + O C K^2`` for the quadratic form.

Both are differentiable in ``W``, ``B`` and ``x`` and synchronised over ranks
(``SyncBatchNorm`` semantics): the tap means first (one all-reduce), then the second moments
centred on the global means (a second all-reduce), so no ``E[x^2] - mean^2`` cancellation.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..quant.config import EST_STATS as ESTIMATORS  # values of the ``est_stats`` setting
from .stats import stats_dtype

#: input elements the tap-pair correlation ``R`` is measured on (a subset of the images)
KRON_BUDGET = 1 << 15


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` with its gradient (the sum of every rank's gradient, as
    ``SyncBatchNorm``'s backward all-reduces its statistics' gradients)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _all_reduce_sum(t, group):
    return t if group is False else _AllReduceSum.apply(t, group)


class TapStats(NamedTuple):
    """Input statistics for one conv geometry (:func:`tap_statistics`)."""
    means: torch.Tensor       # (C, kh, kw): mean of each channel under each tap
    cov: torch.Tensor         # (C, C): channel covariance at the centre tap
    corr: torch.Tensor        # (kh*kw, kh*kw): tap-pair covariance, R[c, c] = 1
    n: int                    # output positions x images (all ranks)


def _out_size(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def _tap_views(xp, kernel, stride, out_hw):
    """The ``kh * kw`` strided views of the padded input, one per tap: (K, N, C, Ho, Wo)."""
    (kh, kw), (sh, sw), (ho, wo) = kernel, stride, out_hw
    return [xp[:, :, u:u + sh * (ho - 1) + 1:sh, v:v + sw * (wo - 1) + 1:sw]
            for u in range(kh) for v in range(kw)]


def tap_statistics(x: torch.Tensor, kernel, stride, padding, sync=False,
                   budget: int = KRON_BUDGET) -> TapStats:
    """:class:`TapStats` of the block input ``x`` (N, C, H, W) for a conv with
    ``kernel`` / ``stride`` / ``padding`` (pairs), in float32 (float64 for float64 ``x``).

    ``sync``: ``False`` or a process group (statistics of every rank's batch).
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    sd = stats_dtype(x.dtype)
    xs = x if x.dtype == sd else x.to(sd)
    n_img, c = xs.shape[:2]
    ho, wo = _out_size(xs.shape[2], kh, sh, ph), _out_size(xs.shape[3], kw, sw, pw)
    group = sync
    # tap means from the batch sum (one pass over x)
    total = xs.sum(0, keepdim=True)
    taps = _tap_views(F.pad(total, (pw, pw, ph, ph)), kernel, stride, (ho, wo))
    sums = torch.stack([t.sum((0, 2, 3)) for t in taps], 1)          # (C, K)
    count = xs.new_tensor([float(n_img * ho * wo)])
    sums, count = _all_reduce_sum(torch.cat([sums.reshape(-1), count]), group).split(
        [c * kh * kw, 1])
    n = count.item() if group is not False else float(n_img * ho * wo)
    means = (sums / count).reshape(c, kh * kw)
    centre = (kh // 2) * kw + kw // 2
    # channel covariance at the centre tap, centred on the global tap means
    oh, ow = kh // 2 - ph, kw // 2 - pw        # input row / column of the first centre tap
    if oh >= 0 and ow >= 0 and oh + sh * (ho - 1) < xs.shape[2] and \
            ow + sw * (wo - 1) < xs.shape[3]:  # never in the padding: no padded copy
        view = xs[:, :, oh:oh + sh * (ho - 1) + 1:sh, ow:ow + sw * (wo - 1) + 1:sw]
    else:
        view = _tap_views(F.pad(xs, (pw, pw, ph, ph)), kernel, stride, (ho, wo))[centre]
    zc = view.transpose(0, 1).reshape(c, -1) - means[:, centre, None]   # (C, N Ho Wo)
    gram = zc @ zc.t()                                                 # (C, C)
    if kh * kw == 1:             # one tap: no spatial correlation to measure
        gram = _all_reduce_sum(gram, group)
        return TapStats(means.reshape(c, 1, 1), gram / count, xs.new_ones((1, 1)),
                        int(round(n)))
    # tap-pair covariance summed over channels, on at most `budget` input elements
    n_sub = max(1, min(n_img, math.ceil(budget / max(1, c * ho * wo))))
    xp = F.pad(xs[:n_sub], (pw, pw, ph, ph))
    zt = torch.stack([t - means[:, k].reshape(1, -1, 1, 1) for k, t in
                      enumerate(_tap_views(xp, kernel, stride, (ho, wo)))])
    zt = zt.reshape(kh * kw, -1)
    pair = zt @ zt.t()                                                 # (K, K)
    packed = _all_reduce_sum(torch.cat([gram.reshape(-1), pair.reshape(-1)]), group)
    gram, pair = packed[:c * c].reshape(c, c), packed[c * c:].reshape(kh * kw, kh * kw)
    cov = gram / count
    corr = pair / pair[centre, centre].clamp(min=torch.finfo(sd).tiny)
    return TapStats(means.reshape(c, kh, kw), cov, corr, int(round(n)))


def _centre_slice(stats: TapStats, kh: int, kw: int):
    """Tap means and correlation of a smaller kernel centred in the statistics' kernel."""
    c, KH, KW = stats.means.shape
    oh, ow = (KH - kh) // 2, (KW - kw) // 2
    means = stats.means[:, oh:oh + kh, ow:ow + kw].reshape(c, kh * kw)
    corr = stats.corr.reshape(KH, KW, KH, KW)[oh:oh + kh, ow:ow + kw, oh:oh + kh, ow:ow + kw]
    return means, corr.reshape(kh * kw, kh * kw)


def kron_estimate(W: torch.Tensor, B: torch.Tensor, stats: TapStats, groups: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, var)`` of ``conv(x, W) + B`` per output channel from ``stats`` (the
    geometry of ``stats`` with ``W`` centred in it): exact mean, Kronecker-factored
    variance (module docstring)."""
    o, ig, kh, kw = W.shape
    k = kh * kw
    means, corr = _centre_slice(stats, kh, kw)
    c = means.shape[0]
    if c != ig * groups:
        raise ValueError(f'statistics for {c} channels, kernel for {ig * groups}')
    og = o // groups
    wg = W.reshape(groups, og, ig, k).to(stats.cov.dtype)
    mg = means.reshape(groups, ig, k)
    mean = torch.einsum('goit,git->go', wg, mg).reshape(o) + B
    cov = torch.stack([stats.cov[g * ig:(g + 1) * ig, g * ig:(g + 1) * ig]
                       for g in range(groups)]) if groups > 1 else stats.cov[None]
    # W^T C W per output channel, (K, K): one (O K, C) x (C, C) product per group, then a
    # batch of (K, C) x (C, K) products (no einsum permutes of the kernel)
    wt = wg.transpose(2, 3)                                             # (g, o, K, C)
    cw = torch.matmul(wt.reshape(groups, og * k, ig), cov).reshape(groups * og, k, ig)
    quad = torch.bmm(cw, wg.reshape(groups * og, ig, k))                # (O, K, K)
    var = (quad * corr).sum((1, 2)).clamp(min=0)
    return mean, var
