"""The re-parameterized block protocol shared by every block family.

A block is a sum of *branches*; a branch is a chain of linear :class:`Stage` s, each
optionally followed by a BN; an optional ``post_bn`` follows the sum, then ``act``.
From that description alone the base class provides:

* ``forward`` in full precision (``repq`` off): the multi-branch training form;
* :meth:`RepBlock.merge`: the deploy kernel and bias ``(M, B)`` as a differentiable function
  of the branch parameters, with BN folded using running statistics (eval), exact batch
  statistics (``bn_mode='exact'``, RepQ-BN) or statistics estimated from the input's channel
  moments (``bn_mode='est'``, RepQ-BNEst);
* ``forward`` in RepQ mode: ``act(conv(Q_a(x), Q_w(M), B))``;
* :meth:`RepBlock.to_deploy`: one plain conv (``nn.Conv2d``, or ``QConv2d`` carrying the
  learned step sizes when quantized), followed by ``act``.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.config import BN_MODES, QConfig
from ..quant.layers import QConv2d, _EvalWeightCache, frozen_copy, int_grid_bias
from .estimators import kron_estimate, tap_statistics
from .fold_est import fold_est, merge_est
from .kernels import apply_to_channels, centre_offset, compose, pad_to, regroup
from .stages import Stage, _pair
from .stats import bn_uses_batch_stats, channel_var_mean, sync_group, update_running_stats

#: name -> block class, filled by :func:`register_block` (the test suite runs every entry)
REP_BLOCKS: dict[str, type] = {}


def register_block(cls):
    """Class decorator adding a block family to :data:`REP_BLOCKS`."""
    REP_BLOCKS[cls.__name__] = cls
    return cls


def _bn_affine(bn, mean, var):
    """``(scale, shift)`` with ``BN(y) = scale * (y - mean) + shift``."""
    scale = bn.weight * torch.rsqrt(var + bn.eps) if bn.affine else torch.rsqrt(var + bn.eps)
    return scale, (bn.bias if bn.affine else torch.zeros_like(scale))


class _AddCentred(torch.autograd.Function):
    """``acc + pad_to(w)`` with ``w`` added into the centre slice of ``acc`` (in place when
    allowed): no padded copy of ``w`` forward, and a backward that passes the gradient
    through for ``acc`` and returns a view of it for ``w`` (autograd's own slice update
    would clone the full gradient)."""

    @staticmethod
    def forward(ctx, acc, w, ph, pw, inplace):
        kh, kw = w.shape[-2:]
        out = acc if inplace else acc.clone()
        out[:, :, ph:ph + kh, pw:pw + kw] += w
        if inplace:
            ctx.mark_dirty(out)
        ctx.region = (ph, pw, kh, kw)
        return out

    @staticmethod
    def backward(ctx, grad):
        ph, pw, kh, kw = ctx.region
        return grad, grad[:, :, ph:ph + kh, pw:pw + kw], None, None, None


def _add_centred(acc, acc_owned, w, w_owned, kernel_size):
    """``acc + pad_to(w, kernel_size)`` without materialising the padded kernel. ``acc`` is
    updated in place when this merge created it (``acc_owned``). Returns ``(sum, owned)``."""
    if acc is None:
        if tuple(w.shape[-2:]) != kernel_size:
            return pad_to(w, kernel_size), True
        return w, w_owned
    ph, pw = centre_offset(w.shape[-2:], kernel_size)
    if not (ph or pw):
        return acc + w, True
    return _AddCentred.apply(acc, w, ph, pw, acc_owned and acc._base is None), True


def _autocast_dtype(t: torch.Tensor | None):
    """The autocast dtype active for ``t``'s device, or ``None``."""
    if t is None:
        return None
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _float32_region(device_type: str):
    """Autocast off for ``device_type``: the kernel algebra, BN statistics and folds run in
    the parameters' dtype (float32), as PyTorch's BN computes its statistics under autocast."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _autocast_region(device_type: str, dtype):
    """Autocast back on (``dtype``) for the full-precision branch convs of RepQ-BN, which run
    in reduced precision like every other conv of an autocast model."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def _fold(w, b, bn, mean, var):
    scale, shift = _bn_affine(bn, mean, var)
    return w * scale.reshape(-1, 1, 1, 1), (b - mean) * scale + shift, scale, shift


class _InputMoments(NamedTuple):
    """What RepQ-BNEst knows about a block input: channel ``mean`` / ``var`` ('diag'), or
    ``taps(bn) -> TapStats`` ('kron'); ``n``: elements per channel of the block output."""
    mean: torch.Tensor | None
    var: torch.Tensor | None
    n: int
    taps: object


class _CallCounter:
    """Calls of a block's BNEst merge (``est_refresh`` schedule)."""

    def __init__(self):
        self.calls = 0


class EstRefreshSchedule:
    """Forward pre-hook of a model's root module that decides, once per forward call and
    outside ``torch.compile``'s graph, which rep blocks compute exact statistics on this
    call (``est_refresh``): each block then only reads a bool (two compiled variants: a
    refresh step and a plain step) instead of a call counter, which ``torch.compile`` would
    treat as a constant and recompile for at every step. Installed by
    :func:`install_est_refresh_schedule`; without it a block counts its own calls (same
    schedule, one graph break per block under ``torch.compile``)."""

    def __init__(self, blocks):
        self.blocks = list(blocks)

    @torch.compiler.disable
    def __call__(self, module, args):
        for blk in self.blocks:
            if blk.repq and blk.est_refresh and blk.bn_mode == 'est' and any(
                    bn_uses_batch_stats(bn) for bn in blk.bns()):
                blk._refresh_next = blk._count_refresh()


def install_est_refresh_schedule(model: nn.Module):
    """Register an :class:`EstRefreshSchedule` on ``model`` for its rep blocks with
    ``est_refresh > 0``, replacing any registered before on ``model`` or on a module inside
    it (e.g. by an earlier conversion of a sub-module), so each call is counted once;
    returns the hook handle, or ``None`` when no block needs one."""
    for m in model.modules():
        for key, hook in list(m._forward_pre_hooks.items()):
            if isinstance(hook, EstRefreshSchedule):
                del m._forward_pre_hooks[key]
    blocks = [m for m in model.modules() if isinstance(m, RepBlock) and m.est_refresh]
    if not blocks:
        return None
    return model.register_forward_pre_hook(EstRefreshSchedule(blocks))


class EstCorrection(nn.Module):
    """Per-channel correction of the BNEst estimate learned from periodic exact statistics
    (``est_refresh``): for BN ``k`` of a block, the variance ratio ``V / V_est`` and the mean
    shift ``(mu - mu_est) / sigma``, exponential averages with momentum 0.5. Two flat
    buffers (one slice per BN, in :meth:`RepBlock.bns` order) and ``ready`` (a correction
    has been learned), all saved in the checkpoint."""

    def __init__(self, channels: list[int], momentum: float = 0.5, device=None):
        super().__init__()
        self.momentum = momentum
        self.offsets = [0]
        for c in channels:
            self.offsets.append(self.offsets[-1] + c)
        self.register_buffer('var_ratio', torch.ones(self.offsets[-1], device=device))
        self.register_buffer('mean_shift', torch.zeros(self.offsets[-1], device=device))
        self.register_buffer('ready', torch.zeros((), dtype=torch.uint8, device=device))
        self.is_ready = False        # Python mirror of ``ready`` (no sync, compile-friendly)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.is_ready = bool(self.ready.item())

    def mark_ready(self) -> None:
        self.ready.fill_(1)
        self.is_ready = True

    def _slice(self, k: int) -> slice:
        return slice(self.offsets[k], self.offsets[k + 1])

    def correct(self, k: int, mean, var, eps: float):
        """The corrected ``(mean, var)`` of BN ``k``."""
        sl = self._slice(k)
        var = var * self.var_ratio[sl]
        return mean + self.mean_shift[sl] * torch.sqrt(var + eps), var

    @torch.no_grad()
    def update(self, k: int, mean, var, mean_e, var_e, eps: float, first: bool) -> None:
        """Learn from exact ``(mean, var)`` against the estimate ``(mean_e, var_e)``."""
        sl = self._slice(k)
        ratio = var / var_e.clamp(min=1e-12)
        shift = (mean - mean_e) / torch.sqrt(var + eps)
        for buf, new in ((self.var_ratio, ratio), (self.mean_shift, shift)):
            buf[sl] = new if first else buf[sl].lerp(new.to(buf.dtype), self.momentum)


class RepBlock(nn.Module, _EvalWeightCache):
    """Base class of all re-parameterized blocks.

    Args:
        in_channels, out_channels: channels of the merged conv.
        kernel_size: kernel of the merged conv (int or pair).
        stride, groups: of the merged conv.
        padding: of the merged conv; defaults to ``kernel_size // 2``.
        act: module applied after the linear part (``None``: identity).

    Subclasses build branches with :meth:`add_branch` (and optionally set ``post_bn``) and
    call :meth:`check` at the end of ``__init__``.
    """

    #: whether the family supports stride 2 / grouped / depthwise / in != out in tests
    supports_stride = True
    supports_groups = True
    #: BNEst folds through the hand-written autograd nodes of :mod:`.fold_est` (``False``:
    #: the plain autograd composition, kept as the reference the tests compare against)
    fused_est = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 padding=None, groups: int = 1, act: nn.Module | None = None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding = _pair(padding) if padding is not None else tuple(
            k // 2 for k in self.kernel_size)
        self.groups = groups
        self.branches = nn.ModuleList()
        self.post_bn: nn.Module | None = None
        self.act = act if act is not None else nn.Identity()
        # RepQ state (set by enable_repq)
        self.repq = False
        self.bn_mode = 'exact'
        self.est_refresh = 0      # BNEst: exact statistics every k steps to correct the estimate
        self.int_bias = False     # bias on the int32 grid (QConfig.int_bias)
        self.est_stats = 'diag'   # BNEst estimator: 'diag' (paper) | 'kron' (estimators.py)
        self._est_schedule = _CallCounter()
        self._refresh_next: bool | None = None
        self._estc_seen = False
        self.est_correction: EstCorrection | None = None
        self.w_quant = None
        self.a_quant = None

    # -- construction ------------------------------------------------------------------
    def add_branch(self, *stages: Stage) -> None:
        self.branches.append(nn.ModuleList(stages))

    def check(self) -> None:
        """Validate that every branch is a chain whose merge is exact."""
        if not self.branches:
            raise ValueError(f'{type(self).__name__} has no branches')
        for bi, branch in enumerate(self.branches):
            c = self.in_channels
            stride = [1, 1]
            kh = kw = 1
            ph = pw = 0
            for si, st in enumerate(branch):
                if st.in_channels != c:
                    raise ValueError(f'branch {bi} stage {si}: expects {st.in_channels} '
                                     f'input channels, gets {c}')
                if st.groups % self.groups:
                    raise ValueError(f'branch {bi} stage {si}: groups={st.groups} is not a '
                                     f'multiple of the block groups={self.groups}')
                if si and st.kernel_size != (1, 1) and (kh, kw) != (1, 1):
                    raise ValueError(f'branch {bi}: two non-1x1 stages cannot be merged')
                if si and st.stride != (1, 1) and (kh, kw, *stride) != (1, 1, 1, 1):
                    raise ValueError(f'branch {bi}: stride must be on the first stage or '
                                     'after a 1x1 stride-1 prefix')
                c = st.out_channels
                stride = [stride[0] * st.stride[0], stride[1] * st.stride[1]]
                kh, kw = max(kh, st.kernel_size[0]), max(kw, st.kernel_size[1])
                ph, pw = ph + st.padding[0], pw + st.padding[1]
            if c != self.out_channels:
                raise ValueError(f'branch {bi} ends with {c} channels, block has '
                                 f'{self.out_channels}')
            if tuple(stride) != self.stride:
                raise ValueError(f'branch {bi} has stride {tuple(stride)}, block {self.stride}')
            K, P = self.kernel_size, self.padding
            if kh > K[0] or kw > K[1] or (K[0] - kh) != 2 * (P[0] - ph) or \
                    (K[1] - kw) != 2 * (P[1] - pw):
                raise ValueError(f'branch {bi} ({kh}x{kw}, padding {(ph, pw)}) is not '
                                 f'centred in the {K[0]}x{K[1]} kernel with padding {P}')

    def bns(self):
        """All BN modules of the block (branch BNs, then ``post_bn``)."""
        out = [st.bn for br in self.branches for st in br if st.bn is not None]
        if self.post_bn is not None:
            out.append(self.post_bn)
        return out

    # -- full-precision multi-branch forward -----------------------------------------------
    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        """The training-form linear part: sum of branches (then ``post_bn``)."""
        out = None
        for branch in self.branches:
            # c: the per-channel value h takes where x is zero, needed to pad later stages
            h, c = x, None
            track = any(any(s.padding) for s in branch[1:])
            for si, st in enumerate(branch):
                h = st.run(h, c if si else None)
                if track:
                    with _float32_region(x.device.type):
                        w, b = st.kernel()
                        c = (apply_to_channels(w, c, st.groups) if c is not None
                             else w.new_zeros(st.out_channels)) + (b if b is not None else 0)
                if st.bn is not None:
                    if track:
                        if bn_uses_batch_stats(st.bn):
                            var, mean, _ = channel_var_mean(h, sync_group(st.bn))
                        else:
                            mean, var = st.bn.running_mean, st.bn.running_var
                        scale, shift = _bn_affine(st.bn, mean, var)
                        c = (c - mean) * scale + shift
                    h = st.bn(h)
            out = h if out is None else out + h
        if self.post_bn is not None:
            out = self.post_bn(out)
        return out

    # -- merge ---------------------------------------------------------------------------
    def merge(self, x: torch.Tensor | None = None, mode: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged kernel ``M`` ``(O, I/groups, kh, kw)`` and bias ``B`` ``(O,)``.

        Args:
            x: the block input (already activation-quantized in RepQ mode). Needed when some
                BN uses batch statistics (training mode).
            mode: ``'running'``, ``'exact'`` or ``'est'``; default: ``self.bn_mode`` for BNs
                that use batch statistics (training mode), running statistics for the others.

        Differentiable in every branch parameter (and in ``x`` through the statistics).
        BNs that use batch statistics update their running statistics, as in training.
        Under autocast the kernel algebra, the statistics and the folds run in float32 (the
        parameters' dtype); RepQ-BN's full-precision branch convs run under autocast, as the
        convs of the multi-branch model would.
        """
        mode = mode or self.bn_mode
        if mode not in BN_MODES + ('running',):
            raise ValueError(f'unknown merge mode {mode!r}')
        need_batch = mode != 'running' and any(bn_uses_batch_stats(b) for b in self.bns())
        if need_batch and x is None:
            raise ValueError(f'{type(self).__name__}.merge() needs the input x while BN uses '
                             'batch statistics (training mode); pass x or use eval()')
        amp = _autocast_dtype(x)
        with _float32_region(self._device_type(x)):
            if not need_batch:
                return self._merge_folded()
            if mode == 'exact':
                return self._merge_folded(self._exact_stats, x, amp)
            return self._merge_est(x, amp)

    def _merge_folded(self, batch_stats=None, x=None, amp=None, fold=None):
        """The merge itself: every branch's stage kernels composed, each BN folded, the
        branches summed (smaller kernels centred), ``post_bn`` folded last.

        A BN that uses batch statistics is folded with ``fold(W, B, bn) -> (W_f, B_f)`` when
        given (BNEst's fused nodes), else with ``batch_stats(bn, h, W, B) -> (mean, var)``
        (``W``, ``B``: the kernel and bias composed up to that BN; ``h``: the full-precision
        branch output there when ``x`` is given). Every other BN (and every BN when neither
        is given) is folded with its running statistics. With ``x`` the full-precision branch
        ops run too, up to the last BN of each branch (every stage when there is a
        ``post_bn``), later stages padded with the bias of the map before them.
        """
        g, K = self.groups, self.kernel_size
        run_fp = x is not None
        keep_h = run_fp and self.post_bn is not None
        dev = x.device.type if run_fp else 'cpu'
        W_sum = B_sum = h_sum = None
        sum_owned = False     # W_sum is a tensor this merge created (may be updated in place)
        for branch in self.branches:
            W = B = h = None
            owned = False     # W was created here (not a parameter / buffer / view of one)
            last = len(branch) - 1 if keep_h else max(
                (i for i, st in enumerate(branch) if st.bn is not None), default=-1)
            for si, st in enumerate(branch):
                ws0, bs = st.kernel()
                ws = regroup(ws0, st.groups, g, st.in_channels)
                if run_fp and si <= last:   # FP branch op; later stages pad with the bias B
                    with _autocast_region(dev, amp):
                        h = st.run(x if si == 0 else h, B if si else None)
                if W is None:
                    W, owned = ws, ws is not ws0
                    B = bs if bs is not None else ws.new_zeros(st.out_channels)
                else:
                    W, B = compose(W, B, ws, bs, g)
                    owned = True
                if st.bn is not None:
                    W, B, h = self._fold_bn(st.bn, W, B, h, batch_stats, fold,
                                            run_fp and (si < last or keep_h))
                    owned = True
            W_sum, sum_owned = _add_centred(W_sum, sum_owned, W, owned, K)
            B_sum = B if B_sum is None else B_sum + B
            if keep_h:
                h_sum = h if h_sum is None else h_sum + h
        if self.post_bn is not None:
            W_sum, B_sum, _ = self._fold_bn(self.post_bn, W_sum, B_sum, h_sum, batch_stats,
                                            fold, False)
        return W_sum, B_sum

    def _device_type(self, x=None) -> str:
        if x is not None:
            return x.device.type
        t = next(self.parameters(), None)
        if t is None:
            t = next(self.buffers(), None)
        return t.device.type if t is not None else 'cpu'

    def _fold_bn(self, bn, W, B, h, batch_stats, fold, update_h):
        """Fold ``bn`` into ``(W, B)``; with ``update_h`` also apply it to ``h``."""
        if (batch_stats is None and fold is None) or not bn_uses_batch_stats(bn):
            if bn.running_mean is None:
                raise ValueError(f'{type(self).__name__}: a BN without running statistics '
                                 '(track_running_stats=False) cannot be folded with running '
                                 'statistics')
            mean, var = bn.running_mean, bn.running_var
        elif fold is not None:
            return (*fold(W, B, bn), h)
        else:
            mean, var = batch_stats(bn, h, W, B)
        W, B, scale, shift = _fold(W, B, bn, mean, var)
        if update_h:
            h = (h - mean.reshape(1, -1, 1, 1)) * scale.reshape(1, -1, 1, 1) + \
                shift.reshape(1, -1, 1, 1)
        return W, B, h

    # -- statistics ------------------------------------------------------------------------
    @staticmethod
    def _update_running(bn, mean, var, n):
        if bn.training and bn.track_running_stats:
            update_running_stats(bn, mean, var, n)

    def _exact_stats(self, bn, h, W, B):
        """RepQ-BN: the batch statistics of the full-precision branch output ``h``."""
        var, mean, n = channel_var_mean(h, sync_group(bn))
        self._update_running(bn, mean, var, n)
        return mean, var

    def _input_moments(self, x):
        """BNEst: ``(mean, var, n)`` of the block input per channel; ``n``: elements per
        channel of the block output (all ranks), for the unbiased running variance."""
        sync = next((grp for grp in map(sync_group, self.bns()) if grp is not False), False)
        var, mean, n_in = channel_var_mean(x, sync)
        oh = (x.shape[2] + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
        ow = (x.shape[3] + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
        return mean, var, n_in // (x.shape[2] * x.shape[3]) * oh * ow

    def _estimate(self, W, B, moments, bn=None):
        """BNEst: mean and variance of ``conv(x, W) + B`` (``W``: the kernel composed up to
        ``bn``) from the block input: ``est_stats='diag'``: from the input moments (diagonal
        covariance, zero padding ignored; repq-method.md section 3); ``'kron'``: from the
        tap statistics of ``bn``'s geometry (:func:`~repq_mm.rep.estimators.kron_estimate`)."""
        if self.est_stats == 'kron':
            return kron_estimate(W, B, moments.taps(bn), self.groups)
        m, v = moments.mean, moments.var
        return (apply_to_channels(W, m, self.groups) + B,
                apply_to_channels(W * W, v, self.groups))

    def _bn_geometries(self) -> dict:
        """``id(bn) -> (kernel, stride, padding)`` of the map each BN normalises: the branch
        prefix up to its stage (``post_bn``: the block's own)."""
        out = {}
        for branch in self.branches:
            k, s, p = [1, 1], [1, 1], [0, 0]
            for st in branch:
                for d in (0, 1):
                    k[d] = max(k[d], st.kernel_size[d])
                    p[d] += st.padding[d]
                    s[d] *= st.stride[d]
                if st.bn is not None:
                    out[id(st.bn)] = (tuple(k), tuple(s), tuple(p))
        if self.post_bn is not None:
            out[id(self.post_bn)] = (self.kernel_size, self.stride, self.padding)
        return out

    def _kron_statistics(self, x):
        """``bn -> TapStats`` for ``est_stats='kron'``, each geometry computed once per call;
        a geometry centred in the block's own (same stride, e.g. a 1x1 branch without
        padding in a 3x3 block with padding 1: the same output grid) uses the block's
        statistics (:func:`~.estimators.kron_estimate` takes the centre taps)."""
        geoms = self._bn_geometries()
        sync = next((grp for grp in map(sync_group, self.bns()) if grp is not False), False)
        own = (tuple(self.kernel_size), tuple(self.stride), tuple(self.padding))
        cache = {}

        def centred(g):
            (k, s, p), (K, S, P) = g, own
            return s == S and all(K[d] >= k[d] and (K[d] - k[d]) % 2 == 0 and
                                  P[d] - p[d] == (K[d] - k[d]) // 2 for d in (0, 1))

        def stats(bn):
            g = geoms[id(bn)]
            if g != own and centred(g) and any(geoms[id(b)] == own for b in self.bns()):
                g = own
            if g not in cache:
                cache[g] = tap_statistics(x, *g, sync=sync)
            return cache[g]
        return stats

    def _merge_est(self, x, amp):
        """RepQ-BNEst (with ``est_refresh``: exact statistics every k-th call, which also
        update the correction applied to the estimate on the calls between)."""
        refresh = False
        if self.est_refresh:
            refresh = self._refresh_due()
            self._estc_seen = self.est_correction.is_ready
        kron = self.est_stats == 'kron'
        if kron:
            taps = self._kron_statistics(x)
            moments = _InputMoments(None, None, taps(self.bns()[-1]).n if self.bns() else 0,
                                    taps)
        else:
            moments = _InputMoments(*self._input_moments(x), None)
        n = moments.n
        if refresh:
            def refreshed(bn, h, W, B):
                var, mean, _ = channel_var_mean(h, sync_group(bn))
                self.est_correction.update(self._bn_position(bn), mean, var,
                                           *self._estimate(W, B, moments, bn), bn.eps,
                                           first=not self._estc_seen)
                self._update_running(bn, mean, var, n)
                return mean, var
            out = self._merge_folded(refreshed, x, amp)
            self.est_correction.mark_ready()
            return out
        if self.est_refresh or not self.fused_est or kron:
            def estimated(bn, h, W, B):
                mean, var = self._estimate(W, B, moments, bn)
                if self._estc_seen:
                    mean, var = self.est_correction.correct(self._bn_position(bn), mean, var,
                                                          bn.eps)
                self._update_running(bn, mean, var, n)
                return mean, var
            return self._merge_folded(estimated)
        if self.post_bn is None and all(
                len(br) == 1 and br[0].bn is not None and bn_uses_batch_stats(br[0].bn)
                for br in self.branches):
            return self._merge_single_stage_est(moments)

        def fused(W, B, bn):        # BNEst folds written out as autograd nodes
            W, B, mean, var = fold_est(W, B, bn, moments.mean, moments.var, self.groups)
            self._update_running(bn, mean, var, n)
            return W, B
        return self._merge_folded(fold=fused)

    def _merge_single_stage_est(self, moments):
        """BNEst merge of a block whose branches are single stages with a BN, in one
        autograd node (:func:`~repq_mm.rep.fold_est.merge_est`)."""
        kernels, bns = [], []
        for (st,) in self.branches:
            ws, bs = st.kernel()
            kernels.append((regroup(ws, st.groups, self.groups, st.in_channels), bs))
            bns.append(st.bn)
        W, B, means, variances = merge_est(kernels, bns, moments.mean, moments.var,
                                           self.groups, self.kernel_size)
        n = moments.n
        for bn, mean, var in zip(bns, means, variances):
            self._update_running(bn, mean, var, n)
        return W, B

    # -- BNEst with periodic correction (est_refresh > 0) -----------------------------------
    def _refresh_due(self) -> bool:
        """Whether this call computes exact statistics: decided by the model's
        :class:`EstRefreshSchedule` when installed, else counted here."""
        due = self._refresh_next
        if due is None:
            return self._count_refresh()
        self._refresh_next = None
        return due

    @torch.compiler.disable
    def _count_refresh(self) -> bool:
        due = self._est_schedule.calls % self.est_refresh == 0
        self._est_schedule.calls += 1
        return due

    def _bn_position(self, bn) -> int:
        for i, b in enumerate(self.bns()):
            if b is bn:
                return i
        raise KeyError('BN is not part of this block')

    def _setup_est_correction(self, refresh: int) -> None:
        self.est_refresh = int(refresh)
        self._est_schedule = _CallCounter()
        self._refresh_next = None
        self._estc_seen = False
        if self.est_refresh and getattr(self, 'est_correction', None) is None:
            bns = self.bns()
            dev = next((b.weight.device for b in bns if b.affine), None)
            self.est_correction = EstCorrection([b.num_features for b in bns], device=dev)

    # -- RepQ ----------------------------------------------------------------------------
    def check_repq(self) -> None:
        """Raise ``ValueError`` if the block cannot be trained with RepQ and deployed as one
        conv (what :meth:`enable_repq` and ``convert_to_repq`` check first)."""
        for i, bn in enumerate(self.bns()):
            if not bn.track_running_stats or bn.running_mean is None:
                raise ValueError(
                    f'{type(self).__name__}: BN {i} ({type(bn).__name__}) has no running '
                    'statistics (track_running_stats=False): the deployed conv folds fixed BN '
                    'statistics, so such a block cannot be merged. Use a BN with '
                    'track_running_stats=True or leave the block out (skip)')

    def enable_repq(self, qcfg: QConfig | None = None, quantize: bool = True) -> 'RepBlock':
        """Switch to the RepQ forward ``conv(Q_a(x), Q_w(M), B)`` with ``qcfg``'s
        quantizers (``quantize=False``: merged forward without quantizers). Raises
        ``ValueError`` (:meth:`check_repq`) and changes nothing for a block that cannot be
        merged."""
        self.check_repq()
        qcfg = qcfg or QConfig()
        self.repq = True
        self.bn_mode = qcfg.bn_mode
        self.est_stats = qcfg.est_stats
        self.int_bias = qcfg.int_bias
        self._setup_est_correction(qcfg.est_refresh)
        if quantize:
            self.w_quant = qcfg.weight_quantizer(self.out_channels)
            self.a_quant = qcfg.act_quantizer()
        return self

    def _quantized(self, w, b):
        wq = self.w_quant(w) if self.w_quant is not None else w
        if self.int_bias:
            b = int_grid_bias(b, self.w_quant, self.a_quant)
        return wq, b

    def _merged_quantized(self, xq):
        if any(bn_uses_batch_stats(b) for b in self.bns()):
            return self._quantized(*self.merge(xq))

        def compute():
            return self._quantized(*self.merge(None, 'running'))
        return self._cached(list(self.parameters()) + list(self.buffers()), compute,
                            (self.w_quant, self.a_quant) if self.int_bias else self.w_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.repq:
            return self.act(self.forward_branches(x))
        xq = self.a_quant(x) if self.a_quant is not None else x
        w, b = self._merged_quantized(xq)
        if w.dtype != xq.dtype and not torch.is_autocast_enabled(xq.device.type):
            w, b = w.to(xq.dtype), b.to(xq.dtype)   # a reduced-precision model (no autocast)
        return self.act(F.conv2d(xq, w, b, self.stride, self.padding, 1, self.groups))

    # -- deploy --------------------------------------------------------------------------
    @torch.no_grad()
    def to_deploy(self) -> nn.Module:
        """One plain conv with the merged weights (running statistics), then ``act``.

        Quantized blocks give a :class:`QConv2d` whose weight is already on the integer grid
        (``Q_w(M)``) and whose quantizers carry the learned, frozen step sizes.
        """
        w, b = self.merge(None, 'running')
        p = next(self.parameters(), w)
        kw = dict(stride=self.stride, padding=self.padding, groups=self.groups, bias=True,
                  device=w.device, dtype=p.dtype)
        if self.w_quant is None and self.a_quant is None:
            conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, **kw)
            conv.weight.copy_(w)
        else:
            conv = QConv2d(self.in_channels, self.out_channels, self.kernel_size,
                           w_quant=frozen_copy(self.w_quant), a_quant=frozen_copy(self.a_quant),
                           int_bias=self.int_bias, **kw)
            w, b = self._quantized(w, b)
            conv.weight.copy_(w)
        conv.bias.copy_(b)
        if isinstance(self.act, nn.Identity):
            return conv
        return nn.Sequential(conv, self.act)
