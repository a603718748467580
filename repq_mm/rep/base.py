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

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.config import BN_MODES, QConfig
from ..quant.layers import QConv2d, _EvalWeightCache, frozen_copy
from .fold_est import fold_est, merge_est
from .kernels import apply_to_channels, centre_offset, compose, pad_to, regroup
from .stages import Stage, _pair
from .stats import (bn_uses_batch_stats, channel_var_mean, update_running_stats,
                    wants_sync)

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


def _fold(w, b, bn, mean, var):
    scale, shift = _bn_affine(bn, mean, var)
    return w * scale.reshape(-1, 1, 1, 1), (b - mean) * scale + shift, scale, shift


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
        self._est_calls = 0
        self._estc_seen = False
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
                    w, b = st.kernel()
                    c = (apply_to_channels(w, c, st.groups) if c is not None
                         else h.new_zeros(st.out_channels)) + (b if b is not None else 0)
                if st.bn is not None:
                    if track:
                        if bn_uses_batch_stats(st.bn):
                            var, mean, _ = channel_var_mean(h, wants_sync(st.bn))
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
    def _stats(self, bn, mode, h, W, B, moments, refresh=False):
        if mode == 'running' or not bn_uses_batch_stats(bn):
            return bn.running_mean, bn.running_var
        if mode == 'exact' or refresh:
            var, mean, n = channel_var_mean(h, wants_sync(bn))
        if mode == 'est':  # moments of the composed kernel applied to the input moments
            m, v, n = moments
            mean_e = apply_to_channels(W, m, self.groups) + B
            var_e = apply_to_channels(W * W, v, self.groups)
            if refresh:      # learn the correction from this step's exact statistics
                self._update_est_correction(bn, mean, var, mean_e, var_e)
            else:
                mean, var = self._corrected(bn, mean_e, var_e)
        self._update_running(bn, mean, var, n)
        return mean, var

    @staticmethod
    def _update_running(bn, mean, var, n):
        if bn.training and bn.track_running_stats:
            update_running_stats(bn, mean, var, n)

    # -- BNEst with periodic correction (est_refresh > 0) -----------------------------------
    def _corr_key(self, bn):
        return f'_estc_{self._bn_index[id(bn)]}'

    def _corrected(self, bn, mean, var):
        """Apply the learned per-channel correction (identity until the first refresh)."""
        if not self.est_refresh or not self._estc_seen:
            return mean, var
        k = self._corr_key(bn)
        var = var * getattr(self, k + '_var_ratio')
        return mean + getattr(self, k + '_mean_shift') * torch.sqrt(var + bn.eps), var

    @torch.no_grad()
    def _update_est_correction(self, bn, mean, var, mean_e, var_e, momentum=0.5):
        k = self._corr_key(bn)
        ratio = var / var_e.clamp(min=1e-12)
        shift = (mean - mean_e) / torch.sqrt(var + bn.eps)
        r_buf, s_buf = getattr(self, k + '_var_ratio'), getattr(self, k + '_mean_shift')
        first = not self._estc_seen
        r_buf.copy_(ratio if first else r_buf.lerp(ratio, momentum))
        s_buf.copy_(shift if first else s_buf.lerp(shift, momentum))

    def _setup_est_correction(self, refresh: int) -> None:
        self.est_refresh = int(refresh)
        self._est_calls = 0
        if not self.est_refresh:
            return
        if not hasattr(self, 'estc_ready'):
            self.register_buffer('estc_ready', torch.zeros((), dtype=torch.uint8))
        for i, bn in enumerate(self.bns()):
            c = bn.num_features
            dev = bn.weight.device if bn.affine else None
            if not hasattr(self, f'_estc_{i}_var_ratio'):
                self.register_buffer(f'_estc_{i}_var_ratio', torch.ones(c, device=dev))
                self.register_buffer(f'_estc_{i}_mean_shift', torch.zeros(c, device=dev))

    @property
    def _bn_index(self):
        return {id(bn): i for i, bn in enumerate(self.bns())}

    def merge(self, x: torch.Tensor | None = None, mode: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged kernel ``M`` ``(O, I/groups, kh, kw)`` and bias ``B`` ``(O,)``.

        Args:
            x: the block input (already activation-quantized in RepQ mode). Needed when some
                BN uses batch statistics (training mode).
            mode: ``'running'``, ``'exact'`` or ``'est'``; default: ``self.bn_mode`` for BNs
                in training mode, running statistics otherwise.

        Differentiable in every branch parameter (and in ``x`` through the statistics).
        BNs that use batch statistics update their running statistics, as in training.
        """
        mode = mode or self.bn_mode
        if mode not in BN_MODES + ('running',):
            raise ValueError(f'unknown merge mode {mode!r}')
        need_batch = mode != 'running' and any(bn_uses_batch_stats(b) for b in self.bns())
        if need_batch and x is None:
            raise ValueError(f'{type(self).__name__}.merge() needs the input x while BN uses '
                             'batch statistics (training mode); pass x or use eval()')
        refresh = need_batch and mode == 'est' and self.est_refresh > 0 and \
            self._est_calls % self.est_refresh == 0
        if need_batch and mode == 'est' and self.est_refresh:
            self._est_calls += 1
            self._estc_seen = bool(self.estc_ready.item())
        exact = need_batch and (mode == 'exact' or refresh)
        moments = None
        if need_batch and mode == 'est':
            sync = any(wants_sync(b) for b in self.bns())
            var, mean, n_in = channel_var_mean(x, sync)
            oh = (x.shape[2] + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
            ow = (x.shape[3] + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
            # elements per channel of the block output (all ranks), for the unbiased variance
            moments = (mean, var, n_in // (x.shape[2] * x.shape[3]) * oh * ow)
        g, K = self.groups, self.kernel_size
        keep_h = exact and self.post_bn is not None
        # BNEst without the periodic correction: folds written out as autograd nodes
        fast_est = moments is not None and not self.est_refresh and self.fused_est
        if fast_est and self.post_bn is None and all(
                len(br) == 1 and br[0].bn is not None and bn_uses_batch_stats(br[0].bn)
                for br in self.branches):
            return self._merge_single_stage_est(moments)
        W_sum = B_sum = h_sum = None
        sum_owned = False     # W_sum is a tensor this merge created (may be updated in place)
        for branch in self.branches:
            W = B = h = None
            owned = False     # W was created here (not a parameter / buffer / view of one)
            # full-precision branch ops are needed up to the last BN (all, with post_bn)
            last = len(branch) - 1 if keep_h else max(
                (i for i, st in enumerate(branch) if st.bn is not None), default=-1)
            for si, st in enumerate(branch):
                ws0, bs = st.kernel()
                ws = regroup(ws0, st.groups, g, st.in_channels)
                if exact and si <= last:  # FP branch op; later stages pad with the bias B
                    h = st.run(x if si == 0 else h, B if si else None)
                if W is None:
                    W, owned = ws, ws is not ws0
                    B = bs if bs is not None else ws.new_zeros(st.out_channels)
                else:
                    W, B = compose(W, B, ws, bs, g)
                    owned = True
                if st.bn is not None and fast_est and bn_uses_batch_stats(st.bn):
                    W, B, mean, var = fold_est(W, B, st.bn, moments[0], moments[1], g)
                    self._update_running(st.bn, mean, var, moments[2])
                    owned = True
                elif st.bn is not None:
                    mean, var = self._stats(st.bn, mode, h, W, B, moments, refresh)
                    W, B, scale, shift = _fold(W, B, st.bn, mean, var)
                    owned = True
                    if exact and (si < last or keep_h):
                        h = (h - mean.reshape(1, -1, 1, 1)) * scale.reshape(1, -1, 1, 1) + \
                            shift.reshape(1, -1, 1, 1)
            W_sum, sum_owned = _add_centred(W_sum, sum_owned, W, owned, K)
            B_sum = B if B_sum is None else B_sum + B
            if keep_h:
                h_sum = h if h_sum is None else h_sum + h
        if self.post_bn is not None and fast_est and bn_uses_batch_stats(self.post_bn):
            W_sum, B_sum, mean, var = fold_est(W_sum, B_sum, self.post_bn, moments[0],
                                                moments[1], g)
            self._update_running(self.post_bn, mean, var, moments[2])
        elif self.post_bn is not None:
            mean, var = self._stats(self.post_bn, mode, h_sum, W_sum, B_sum, moments, refresh)
            W_sum, B_sum = _fold(W_sum, B_sum, self.post_bn, mean, var)[:2]
        if refresh:
            self.estc_ready.fill_(1)
        return W_sum, B_sum

    def _merge_single_stage_est(self, moments):
        """BNEst merge of a block whose branches are single stages with a BN, in one
        autograd node (:func:`~repq_mm.rep.fold_est.merge_est`)."""
        kernels, bns = [], []
        for (st,) in self.branches:
            ws, bs = st.kernel()
            kernels.append((regroup(ws, st.groups, self.groups, st.in_channels), bs))
            bns.append(st.bn)
        m, v, n = moments
        W, B, means, variances = merge_est(kernels, bns, m, v, self.groups, self.kernel_size)
        for bn, mean, var in zip(bns, means, variances):
            self._update_running(bn, mean, var, n)
        return W, B

    # -- RepQ ----------------------------------------------------------------------------
    def enable_repq(self, qcfg: QConfig | None = None, quantize: bool = True) -> 'RepBlock':
        """Switch to the RepQ forward ``conv(Q_a(x), Q_w(M), B)`` with ``qcfg``'s
        quantizers (``quantize=False``: merged forward without quantizers)."""
        qcfg = qcfg or QConfig()
        self.repq = True
        self.bn_mode = qcfg.bn_mode
        self._setup_est_correction(qcfg.est_refresh)
        if quantize:
            self.w_quant = qcfg.weight_quantizer(self.out_channels)
            self.a_quant = qcfg.act_quantizer()
        return self

    def _merged_quantized(self, xq):
        need_batch = self.training and any(bn_uses_batch_stats(b) for b in self.bns())
        if need_batch:
            w, b = self.merge(xq)
            return (self.w_quant(w) if self.w_quant is not None else w), b

        def compute():
            w, b = self.merge(None, 'running')
            return (self.w_quant(w) if self.w_quant is not None else w), b
        return self._cached(list(self.parameters()) + list(self.buffers()), compute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.repq:
            return self.act(self.forward_branches(x))
        xq = self.a_quant(x) if self.a_quant is not None else x
        w, b = self._merged_quantized(xq)
        return self.act(F.conv2d(xq, w, b, self.stride, self.padding, 1, self.groups))

    # -- deploy --------------------------------------------------------------------------
    @torch.no_grad()
    def to_deploy(self) -> nn.Module:
        """One plain conv with the merged weights (running statistics), then ``act``.

        Quantized blocks give a :class:`QConv2d` whose weight is already on the integer grid
        (``Q_w(M)``) and whose quantizers carry the learned, frozen step sizes.
        """
        w, b = self.merge(None, 'running')
        kw = dict(stride=self.stride, padding=self.padding, groups=self.groups, bias=True,
                  device=w.device, dtype=w.dtype)
        if self.w_quant is None and self.a_quant is None:
            conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, **kw)
            conv.weight.copy_(w)
        else:
            conv = QConv2d(self.in_channels, self.out_channels, self.kernel_size,
                           w_quant=frozen_copy(self.w_quant), a_quant=frozen_copy(self.a_quant),
                           **kw)
            conv.weight.copy_(self.w_quant(w) if self.w_quant is not None else w)
        conv.bias.copy_(b)
        if isinstance(self.act, nn.Identity):
            return conv
        return nn.Sequential(conv, self.act)
