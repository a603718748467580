"""RepQ-BNEst's BN fold as hand-written autograd nodes (the hot path of BNEst training).

For a kernel ``w`` ``(O, I/g, kh, kw)`` with bias ``b`` applied to an input with channel
means ``m`` and variances ``v`` (repq-method.md §3)::

    a = sum_{i,u,v} w[o,i,u,v] m[i]        mean = a + b
    var = sum_{i,u,v} w[o,i,u,v]^2 v[i]     s = gamma / sqrt(var + eps)
    w_f = w * s[o]                          b_f = beta - a * s

(``b_f = (b - mean) * s + beta``: the BN removes ``b``). The kernel is viewed as an
``(O, I/g * kh * kw)`` matrix with ``m``, ``v`` expanded to its columns, so the contractions
are matrix-vector products (dense) or row reductions (grouped) rather than reductions over
the tiny ``kh x kw`` axis, and the backward is written out: 4 passes over the kernel instead
of the ~8 autograd nodes of the plain composition (``apply_to_channels`` + ``_fold``).

* :class:`FoldEst`: one fold (any point of a branch chain, or ``post_bn``);
* :class:`MergeEst`: a whole block whose branches are single stages, each with a BN (RepVGG,
  ACNet, MobileOne, YOLO RepConv, ...): every fold and the centred sum of the folded kernels
  in one node.

Both agree with the autograd composition up to float rounding
(``tests/rep/test_blocks.py::test_fold_est_matches_autograd`` / ``test_merge_est_matches_generic``).
"""
from __future__ import annotations

import functools

import torch


def _without_autocast(fn):
    """Run an autograd ``forward`` / ``backward`` with autocast off on its tensors' device:
    the fold is float32 arithmetic (as BN statistics are under autocast), also when
    ``backward()`` is called inside an autocast region."""
    @functools.wraps(fn)
    def wrapper(ctx, *args):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), 'cpu')
        if not torch.is_autocast_enabled(dev):
            return fn(ctx, *args)
        with torch.autocast(dev, enabled=False):
            return fn(ctx, *args)
    return wrapper


def _per_output(c: torch.Tensor, groups: int, out_channels: int) -> torch.Tensor:
    """Input-channel vector ``c`` laid out like a grouped kernel's ``(O, I / groups)``."""
    ig = c.numel() // groups
    return c.reshape(groups, 1, ig).expand(groups, out_channels // groups, ig).reshape(
        out_channels, ig)


_N_SAVED = 8     # tensors one fold saves for its backward (the last item _forward returns)


def _forward(w, b, gamma, beta, m, v, eps, groups):
    """``(w_f, b_f, mean, var, saved)`` of one fold."""
    o, ig = w.shape[:2]
    kk = w[0, 0].numel()
    w2 = w.reshape(o, ig * kk)
    q2 = w2 * w2
    if groups == 1:          # column vectors; matrix-vector products
        me, ve = m.repeat_interleave(kk), v.repeat_interleave(kk)
        a, var = w2 @ me, q2 @ ve
    else:                    # (O, I/g * kh * kw): each output row sees its group's inputs
        me = _per_output(m, groups, o).repeat_interleave(kk, dim=1)
        ve = _per_output(v, groups, o).repeat_interleave(kk, dim=1)
        a, var = (w2 * me).sum(1), (q2 * ve).sum(1)
    rstd = torch.rsqrt(var + eps)
    scale = gamma * rstd if gamma is not None else rstd
    w_f = w * scale.reshape(-1, 1, 1, 1)
    b_f = -a * scale if beta is None else beta - a * scale
    mean = a + b if b is not None else a
    return w_f, b_f, mean, var, (w, gamma, me, ve, q2, a, rstd, scale)


def _backward(saved, groups, g_wf, g_bf, needs):
    """Gradients ``(w, b, gamma, beta, m, v)`` of one fold; ``needs``: the six
    ``needs_input_grad`` flags. ``g_wf`` may be a non-contiguous view."""
    w, gamma, me, ve, q2, a, rstd, scale = saved
    need_w, need_b, need_gamma, need_beta, need_m, need_v = needs
    o, ig = w.shape[:2]
    w2 = w.reshape(o, -1)
    gwf2 = g_wf.reshape(o, -1) if g_wf is not None else None
    g_scale = (gwf2 * w2).sum(1) if gwf2 is not None else torch.zeros_like(scale)
    g_a = None
    if g_bf is not None:
        g_scale = g_scale - g_bf * a
        g_a = -g_bf * scale
    g_gamma = g_scale * rstd if need_gamma and gamma is not None else None
    g_var = g_scale * (gamma if gamma is not None else 1.0) * (-0.5) * rstd ** 3

    def to_inputs(mat, g_out):      # sum_o g_out[o] mat[o, i*kk+uv] -> per input channel
        if groups == 1:
            return (mat.t() @ g_out).reshape(ig, -1).sum(1)
        return (mat * g_out[:, None]).reshape(groups, o // groups, ig, -1).sum(
            dim=(1, 3)).reshape(-1)

    g_w = g_m = g_v = None
    if need_w:
        g_w = w2 * ve
        g_w.mul_((2.0 * g_var)[:, None])
        if g_a is not None:
            if groups == 1:
                g_w.addr_(g_a, me)
            else:
                g_w.addcmul_(me, g_a[:, None])
        if gwf2 is not None:
            g_w.addcmul_(gwf2, scale[:, None])
        g_w = g_w.reshape(w.shape)
    if need_m and g_a is not None:
        g_m = to_inputs(w2, g_a)
    if need_v:
        g_v = to_inputs(q2, g_var)
    # the BN removes the bias: its gradient is exactly zero (a tensor, so DDP sees it used)
    g_b = torch.zeros_like(a) if need_b else None
    return g_w, g_b, g_gamma, (g_bf if need_beta else None), g_m, g_v


def _add(acc, x):
    return x if acc is None else (acc if x is None else acc + x)


class FoldEst(torch.autograd.Function):
    """One BNEst fold: ``(w_f, b_f, mean, var)``; ``mean`` / ``var`` (for the running
    statistics) are not differentiable."""

    @staticmethod
    @_without_autocast
    def forward(ctx, w, b, gamma, beta, m, v, eps, groups):
        w_f, b_f, mean, var, saved = _forward(w, b, gamma, beta, m, v, eps, groups)
        ctx.save_for_backward(*saved)
        ctx.groups = groups
        ctx.mark_non_differentiable(mean, var)
        return w_f, b_f, mean, var

    @staticmethod
    @_without_autocast
    def backward(ctx, g_wf, g_bf, _g_mean, _g_var):
        grads = _backward(ctx.saved_tensors, ctx.groups, g_wf, g_bf, ctx.needs_input_grad[:6])
        return (*grads, None, None)


class MergeEst(torch.autograd.Function):
    """A block of single-stage BN branches in one node.

    ``apply(kernel_size, groups, eps, m, v, w_1, b_1, gamma_1, beta_1, w_2, ...)`` returns
    ``(M, B, mean_1, .., mean_n, var_1, .., var_n)``: the merged kernel (folded kernels
    summed, smaller ones centred in ``kernel_size``) and bias; the statistics are not
    differentiable.
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, kernel_size, groups, eps, m, v, *tensors):
        nb = len(eps)
        kh_, kw_ = kernel_size
        M = B = None
        saved, regions, means, variances = [], [], [], []
        for k in range(nb):
            w, b, gamma, beta = tensors[4 * k:4 * k + 4]
            w_f, b_f, mean, var, sv = _forward(w, b, gamma, beta, m, v, eps[k], groups)
            kh, kw = w.shape[-2:]
            ph, pw = (kh_ - kh) // 2, (kw_ - kw) // 2
            if M is None and (kh, kw) == (kh_, kw_):
                M = w_f                                   # fresh tensor: accumulate in place
            else:
                if M is None:
                    M = w_f.new_zeros(*w_f.shape[:2], kh_, kw_)
                M[:, :, ph:ph + kh, pw:pw + kw] += w_f
            B = _add(B, b_f)
            saved.extend(sv)
            regions.append((ph, pw, kh, kw))
            means.append(mean)
            variances.append(var)
        ctx.save_for_backward(*saved)
        ctx.groups, ctx.regions = groups, regions
        ctx.mark_non_differentiable(*means, *variances)
        return (M, B, *means, *variances)

    @staticmethod
    @_without_autocast
    def backward(ctx, g_M, g_B, *_g_stats):
        saved, groups = ctx.saved_tensors, ctx.groups
        needs = ctx.needs_input_grad
        g_m = g_v = None
        grads = []
        for k, (ph, pw, kh, kw) in enumerate(ctx.regions):
            g_wf = None if g_M is None else g_M[:, :, ph:ph + kh, pw:pw + kw]
            g_w, g_b, g_gamma, g_beta, gm, gv = _backward(
                saved[_N_SAVED * k:_N_SAVED * (k + 1)], groups, g_wf, g_B,
                needs[5 + 4 * k:9 + 4 * k] + needs[3:5])
            grads.extend((g_w, g_b, g_gamma, g_beta))
            g_m, g_v = _add(g_m, gm), _add(g_v, gv)
        return (None, None, None, g_m, g_v, *grads)


def _bn_args(bn):
    return (bn.weight if bn.affine else None), (bn.bias if bn.affine else None)


def fold_est(w, b, bn, m, v, groups):
    """``(w_f, b_f, mean, var)``: :class:`FoldEst` for ``bn`` (affine or not)."""
    return FoldEst.apply(w, b, *_bn_args(bn), m, v, bn.eps, groups)


def merge_est(kernels, bns, m, v, groups, kernel_size):
    """``(M, B, means, vars)`` of the branches ``kernels`` (list of ``(w, b)``) folded with
    ``bns`` (:class:`MergeEst`)."""
    flat = []
    for (w, b), bn in zip(kernels, bns):
        flat.extend((w, b, *_bn_args(bn)))
    out = MergeEst.apply(tuple(kernel_size), groups, tuple(bn.eps for bn in bns), m, v, *flat)
    n = len(bns)
    return out[0], out[1], out[2:2 + n], out[2 + n:]
