"""LSQ fake quantizer (Esser et al., ICLR 2020), see ``docs``/repq-method.md §4.

Forward::

    v_hat = s * round(clip(v / s, -Q_N, Q_P))

signed:   Q_N = 2^(b-1), Q_P = 2^(b-1) - 1   (``symmetric=True``: Q_N = Q_P)
unsigned: Q_N = 0,       Q_P = 2^b - 1

The step size ``s`` gets the straight-through LSQ gradient scaled by
``g = 1 / sqrt(N * Q_P)`` (``N`` = number of elements sharing one step size).

Implementations (``impl``):

* ``'fast'`` (default): the exact paper formulas as one autograd node whose forward and
  backward use only dense float arithmetic (the in-range mask is ``1 - sign|v - clip(v)|``,
  no boolean tensors or ``torch.where``) and which keeps only ``x`` for the backward. On
  CPU it is several times faster than the fused kernels
  (``tools/analysis_tools/bench_lsq_impl.py``). ``v = x / s`` is a true division, as in
  :meth:`LSQQuantizer.quantize_to_codes` and ONNX ``QuantizeLinear``, so the codes seen in
  training are the deployed ones bit for bit.
* ``'fused'``: PyTorch's kernels ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``
  (zero point 0): the same forward up to ``x * (1/s)`` instead of ``x / s``, and the same
  gradients except for a half-step difference at the clip edge (they test the range on the
  *rounded* value ``round(v/s)``).
* ``'reference'``: a plain autograd transcription of the formulas, used by the tests.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

_EPS = 1e-8
#: LSQ implementations (``impl`` of :class:`LSQQuantizer` / ``QConfig`` / the ``repq`` key)
LSQ_IMPLS = ('fast', 'fused', 'reference')


def check_bits(bits) -> int:
    """Validate a bit width: an ``int`` in 2..8, else ``ValueError`` naming the value."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f'bit width must be an int in 2..8, got {bits!r} '
                         f'({type(bits).__name__})')
    if not 2 <= bits <= 8:
        raise ValueError(f'bit width must be in 2..8, got {bits}')
    return bits


def quant_range(bits: int, signed: bool, symmetric: bool = False) -> tuple[int, int]:
    """Return ``(Q_N, Q_P)`` for ``bits`` (``-Q_N`` is the lowest code)."""
    check_bits(bits)
    if signed:
        qp = 2 ** (bits - 1) - 1
        qn = qp if symmetric else 2 ** (bits - 1)
    else:
        qn, qp = 0, 2 ** bits - 1
    return qn, qp


class _LSQReference(torch.autograd.Function):
    """Exact LSQ formulas (paper), ``scale`` broadcastable to ``x``."""

    @staticmethod
    def forward(ctx, x, scale, qn, qp, grad_factor):
        v = x / scale
        ctx.save_for_backward(v, scale)
        ctx.qn, ctx.qp, ctx.grad_factor = qn, qp, grad_factor
        return torch.round(v.clamp(-qn, qp)) * scale

    @staticmethod
    def backward(ctx, grad):
        v, scale = ctx.saved_tensors
        below, above = v < -ctx.qn, v > ctx.qp
        inside = ~(below | above)
        grad_x = grad * inside
        ds = torch.where(inside, torch.round(v) - v,
                         torch.where(below, torch.full_like(v, -ctx.qn),
                                     torch.full_like(v, ctx.qp)))
        grad_s = grad * ds * ctx.grad_factor
        # reduce to the shape of scale
        dims = [d for d in range(grad_s.dim()) if scale.shape[d] == 1] if scale.dim() else None
        grad_s = grad_s.sum(dim=dims, keepdim=True) if dims is not None else grad_s.sum()
        return grad_x, grad_s.reshape(scale.shape), None, None, None


class _LSQFast(torch.autograd.Function):
    """The paper formulas (as :class:`_LSQReference`) with dense float ops only.

    ``scale`` is broadcastable to ``x``; ``dims`` are the dims of ``x`` that ``scale``
    broadcasts over (summed for its gradient). Only ``x`` and ``scale`` are saved.
    """

    @staticmethod
    def forward(ctx, x, scale, qn, qp, grad_factor, dims):
        ctx.save_for_backward(x, scale)
        ctx.qn, ctx.qp, ctx.grad_factor, ctx.dims = qn, qp, grad_factor, dims
        out = torch.div(x, scale).clamp_(-qn, qp).round_()
        return out.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        # three full-size temporaries, everything else in place (allocation is a large part
        # of the cost of elementwise ops on CPU)
        v = torch.div(x, scale)
        q = v.clamp(-ctx.qn, ctx.qp)
        inside = torch.sub(v, q).abs_().sign_().neg_().add_(1.0)   # 1 in range, 0 outside
        grad_s = None
        if ctx.needs_input_grad[1]:
            # d v_hat / d s: round(v) - v inside, -Q_N below, Q_P above  (= q - v * inside)
            ds = q.round_().sub_(v.mul_(inside)).mul_(grad)
            grad_s = (ds.sum(dim=ctx.dims, keepdim=True) if ctx.dims else ds.sum())
            grad_s = grad_s.mul_(ctx.grad_factor).reshape(scale.shape)
        grad_x = inside.mul_(grad) if ctx.needs_input_grad[0] else None
        return grad_x, grad_s, None, None, None, None


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, qn: int, qp: int,
                   grad_factor: float, ch_axis: int | None = None,
                   impl: str = 'fast') -> torch.Tensor:
    """Functional LSQ fake quantization.

    Args:
        x: tensor to quantize.
        scale: step size, shape ``(1,)`` (per tensor) or ``(C,)`` with ``ch_axis``.
        qn, qp: ``Q_N`` and ``Q_P``.
        grad_factor: LSQ gradient scale on ``scale``.
        ch_axis: channel axis for per-channel step sizes, ``None`` for per tensor.
        impl: ``'fast'`` (default), ``'fused'`` (PyTorch kernels) or ``'reference'``;
            see the module docstring.
    """
    if impl == 'fast':
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        shape = [1] * xf.dim()               # scale broadcast to x; summed over ``dims``
        if ch_axis is not None:
            shape[ch_axis] = -1
        dims = [d for d in range(xf.dim()) if ch_axis is None or d != ch_axis % xf.dim()]
        sb = scale.to(xf.dtype).reshape(shape)
        return _LSQFast.apply(xf, sb, qn, qp, grad_factor, dims).to(x.dtype)
    if impl == 'fused':
        orig_dtype = x.dtype
        xf = x.float() if orig_dtype != torch.float32 else x
        zp = torch.zeros_like(scale)
        if ch_axis is None:
            out = torch._fake_quantize_learnable_per_tensor_affine(
                xf, scale, zp, -qn, qp, grad_factor)
        else:
            out = torch._fake_quantize_learnable_per_channel_affine(
                xf, scale, zp, ch_axis, -qn, qp, grad_factor)
        return out.to(orig_dtype) if orig_dtype != torch.float32 else out
    if impl != 'reference':
        raise ValueError(f"impl must be one of {LSQ_IMPLS}, got {impl!r}")
    if ch_axis is not None:
        shape = [1] * x.dim()
        shape[ch_axis] = -1
        scale = scale.reshape(shape)
    else:
        scale = scale.reshape([1] * x.dim()) if x.dim() else scale.reshape(())
    return _LSQReference.apply(x, scale, qn, qp, grad_factor)


@torch.no_grad()
def mse_step(x: torch.Tensor, qn: int, qp: int, ch_axis: int | None = None,
             grid: int = 80) -> torch.Tensor:
    """Step size minimising ``||Q(x) - x||^2`` over ``s = alpha * max|x| / Q_P`` for ``grid``
    values of ``alpha`` in (0, 1] (per slice along ``ch_axis`` when given).

    A calibration for post-training quantization and a better start for 8-bit QAT than the
    LSQ rule ``2 mean|x| / sqrt(Q_P)``, which leaves most 8-bit levels unused.
    """
    x = x.detach().float()
    if ch_axis is None:
        x2 = x.reshape(1, -1)
    else:
        x2 = x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1)
    top = x2.abs().amax(dim=1).clamp(min=1e-8)
    best_err = torch.full_like(top, float('inf'))
    best = top / qp
    for alpha in torch.linspace(1.0 / grid, 1.0, grid).tolist():
        s = (top * alpha / qp)[:, None]
        err = ((torch.round(x2 / s).clamp(-qn, qp) * s - x2) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s[:, 0], best)
    return best if ch_axis is not None else best.reshape(1)


class LSQQuantizer(nn.Module):
    """Learned-step-size fake quantizer.

    Args:
        bits: bit width, 2..8.
        signed: ``True`` / ``False``, or ``'auto'`` (activations: signed iff the first batch
            seen has negative values; decided once and kept in the state dict).
        per_channel: one step size per slice along ``ch_axis`` (weights: output channels).
        ch_axis: channel axis for ``per_channel``.
        symmetric: signed range ``[-Q_P, Q_P]`` instead of ``[-Q_N, Q_P]``.
        impl: ``'fast'`` (default), ``'fused'`` (PyTorch kernels) or ``'reference'``
            (see the module docstring).
        num_channels: number of step sizes for ``per_channel`` (known at construction so the
            optimizer and DDP see the final Parameter; else fixed at the first call).
        init: ``'lsq'`` (paper: ``s0 = 2 mean|v| / sqrt(Q_P)``) or ``'mse'`` (the step
            minimising the quantization MSE of the tensor, :func:`mse_step`).

    The step size is initialised on the first forward call from the tensor it sees
    (``s0 = 2 mean|v| / sqrt(Q_P)``; per channel: per slice). Under ``torch.distributed``
    the initial values are averaged over ranks so every rank starts identical. Whether the
    quantizer is initialised is a buffer (``initialized``), so a loaded or resumed checkpoint
    is never re-initialised. The used step size is ``max(step, 1e-8)`` with a straight-through
    gradient, so it stays strictly positive.

    Example:
        >>> import torch
        >>> q = LSQQuantizer(bits=4, signed=True)
        >>> w = torch.randn(8, 3, 3, 3)
        >>> wq = q(w)                       # first call initialises the step
        >>> bool(q.initialized)
        True
        >>> codes = torch.round(wq / q.scale())
        >>> int(codes.min()) >= -8 and int(codes.max()) <= 7
        True
    """

    def __init__(self, bits: int = 8, signed: bool | str = True, per_channel: bool = False,
                 ch_axis: int = 0, symmetric: bool = False, impl: str = 'fast',
                 num_channels: int | None = None, init: str = 'lsq'):
        super().__init__()
        self.bits = check_bits(bits)
        if signed not in (True, False, 'auto'):
            raise ValueError(f"signed must be True, False or 'auto', got {signed!r}")
        if impl not in LSQ_IMPLS:
            raise ValueError(f"impl must be one of {LSQ_IMPLS}, got {impl!r}")
        if init not in ('lsq', 'mse'):
            raise ValueError(f"init must be 'lsq' or 'mse', got {init!r}")
        self.init_method = init
        self.signed_mode = signed
        self.per_channel = per_channel
        self.ch_axis = ch_axis
        self.symmetric = symmetric
        self.impl = impl
        self.enabled = True
        # step size; without num_channels a per-channel shape is fixed at the first call
        self.step = nn.Parameter(torch.ones(num_channels if per_channel and num_channels
                                            else 1))
        self.register_buffer('initialized', torch.zeros((), dtype=torch.uint8))
        self.register_buffer('signed', torch.tensor(int(signed is True), dtype=torch.uint8))
        # Python mirrors of the two buffers, so that forward never syncs on a tensor (and
        # torch.compile sees plain bools); kept in step by every method that writes them
        self._init_cache = False
        self._signed_cache = signed is True
        self._calib: dict | None = None

    # -- state -------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + 'step'
        if key in state_dict and state_dict[key].shape != self.step.shape:
            # keep the Parameter object (optimizers / DDP may hold it), change its shape
            self.step.data = torch.empty_like(state_dict[key], device=self.step.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.sync_state()

    def sync_state(self) -> None:
        """Re-read the ``initialized`` / ``signed`` buffers into their Python mirrors (after
        anything wrote the buffers directly, e.g. a broadcast)."""
        self._init_cache = bool(self.initialized.item())
        self._signed_cache = bool(self.signed.item())

    @property
    def is_initialized(self) -> bool:
        return self._init_cache

    @property
    def is_signed(self) -> bool:
        if self.signed_mode != 'auto':
            return bool(self.signed_mode)
        return self._signed_cache

    def state_key(self) -> tuple:
        """What a cached quantized weight depends on besides the tensors themselves."""
        return (self.enabled, self.bits, self.is_signed, self.symmetric, self.per_channel,
                self.impl)

    @property
    def qrange(self) -> tuple[int, int]:
        """``(Q_N, Q_P)`` currently in use."""
        return quant_range(self.bits, self.is_signed, self.symmetric)

    def scale(self) -> torch.Tensor:
        """The strictly positive step size actually used (straight-through clamp)."""
        s = self.step
        return s.detach().clamp(min=_EPS) + (s - s.detach())  # value clamped, gradient 1

    def extra_repr(self) -> str:
        return (f'bits={self.bits}, signed={self.signed_mode}, per_channel={self.per_channel}, '
                f'symmetric={self.symmetric}, init={self.init_method}, impl={self.impl}, '
                f'enabled={self.enabled}')

    @torch.no_grad()
    def set_step(self, step: torch.Tensor, signed: bool | None = None) -> None:
        """Set the step size (same ``Parameter`` object, new shape if needed) and, for
        ``signed='auto'`` quantizers, the signedness; marks the quantizer initialised."""
        if signed is not None and self.signed_mode == 'auto':
            self.signed.fill_(int(bool(signed)))
            self._signed_cache = bool(signed)
        step = step.detach().to(self.step)
        if self.step.shape != step.shape:
            self.step.data = step.clone()         # the optimizer keeps the same Parameter
        else:
            self.step.copy_(step)
        self.initialized.fill_(1)
        self._init_cache = True

    def reset(self) -> None:
        """Mark the quantizer uninitialised: it initialises again at its next call (or
        calibration)."""
        self.initialized.fill_(0)
        self._init_cache = False
        self._calib = None

    def _name(self) -> str:
        return getattr(self, 'name', '') or '(unnamed)'

    def _check_finite(self, s0: torch.Tensor, what: str) -> None:
        if not bool(torch.isfinite(s0).all()):
            raise FloatingPointError(f'LSQ quantizer {self._name()} ({self.extra_repr()}): '
                                     f'non-finite values (nan/inf) in {what}')

    # -- init --------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Initialise the step from ``x`` (``init='lsq'``: ``s0 = 2 mean|x| / sqrt(Q_P)``;
        ``'mse'``: :func:`mse_step`), averaged over ranks."""
        x = x.detach().float()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        signed = None
        if self.signed_mode == 'auto':
            neg = (x.min() < 0).float().reshape(1)
            if world > 1:
                dist.all_reduce(neg, op=dist.ReduceOp.MAX)
            signed = bool(neg.item() > 0)
        qn, qp = quant_range(self.bits, self.is_signed if signed is None else signed,
                             self.symmetric)
        axis = self.ch_axis % x.dim() if self.per_channel else None
        if self.init_method == 'mse':
            s0 = mse_step(x, qn, qp, axis)
        elif axis is not None:
            dims = [d for d in range(x.dim()) if d != axis]
            s0 = 2 * x.abs().mean(dim=dims) / math.sqrt(qp)
        else:
            s0 = 2 * x.abs().mean().reshape(1) / math.sqrt(qp)
        if world > 1:
            dist.all_reduce(s0)
            s0 /= world
        self._check_finite(s0, 'the tensor its step size is initialised from')
        self.set_step(s0.clamp(min=1e-6), signed)

    # -- calibration protocol: observe() batches, then finalize() --------------------------
    def start_calibration(self) -> None:
        """Forget statistics of an earlier, unfinished calibration."""
        self._calib = None

    @torch.no_grad()
    def observe(self, x: torch.Tensor, generator: torch.Generator | None = None,
                max_samples: int = 1 << 16, name: str | None = None) -> None:
        """Accumulate calibration statistics of ``x`` (an activation batch): ``mean|x|``
        (per channel when ``per_channel``), whether ``x`` has negative values, and for
        ``init='mse'`` a random sample of at most ``max_samples`` values. :meth:`finalize`
        turns them into the step size. ``name``: how error messages call the quantizer
        (default: its name in the converted model)."""
        x = x.detach().float()
        c = self._calib
        if c is None:
            c = self._calib = dict(total=0.0, per_channel=None, count=0, neg=False,
                                   samples=[])
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f'LSQ calibration: non-finite values (nan/inf) in the '
                                     f'input of {name or self._name()} '
                                     f'(batch {c["count"] + 1})')
        if self.init_method == 'mse':   # a fixed-size random sample for the MSE search
            flat = x.reshape(-1)
            if flat.numel() > max_samples:
                idx = torch.randint(flat.numel(), (max_samples,), generator=generator)
                flat = flat[idx.to(flat.device)]
            c['samples'].append(flat.cpu())
        if self.per_channel:
            dims = [d for d in range(x.dim()) if d != self.ch_axis % x.dim()]
            m = x.abs().mean(dim=dims)
            c['per_channel'] = m if c['per_channel'] is None else c['per_channel'] + m
        else:
            c['total'] += float(x.abs().mean())
        c['count'] += 1
        c['neg'] = c['neg'] or bool(x.min() < 0)

    @torch.no_grad()
    def finalize(self) -> bool:
        """Set the step size from the observed batches (``init='lsq'``: ``2 mean_b(mean|x|)
        / sqrt(Q_P)``; ``'mse'``: :func:`mse_step` on the samples), signedness
        (``'auto'``) from any negative value; statistics combined over ranks (every rank gets
        the same step; every rank must call it, in the same order). Returns ``False`` (and
        changes nothing) when no batch was observed on any rank."""
        c = self._calib or dict(total=0.0, per_channel=None, count=0, neg=False, samples=[])
        self._calib = None
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        dev = self.step.device
        stats = torch.tensor([c['total'], float(c['count']), float(c['neg'])],
                             dtype=torch.float64)
        if world > 1:
            stats = stats.to(dev)
            dist.all_reduce(stats)
            stats = stats.cpu()
        total, count, neg = stats.tolist()
        if count == 0:
            return False
        signed = (neg > 0) if self.signed_mode == 'auto' else None
        qn, qp = quant_range(self.bits, self.is_signed if signed is None else signed,
                             self.symmetric)
        if self.init_method == 'mse' and not self.per_channel:
            s0 = mse_step(torch.cat(c['samples']), qn, qp).to(dev) if c['samples'] else \
                torch.zeros(1, device=dev)
            if world > 1:
                have = torch.tensor([float(bool(c['samples']))], device=dev)
                s0 = s0 * have
                dist.all_reduce(s0)
                dist.all_reduce(have)
                s0 = s0 / have.clamp(min=1)
        elif self.per_channel:
            m = c['per_channel']
            m = m.to(dev) if m is not None else torch.zeros_like(self.step)
            if world > 1:
                dist.all_reduce(m)
            s0 = 2 * (m / count) / math.sqrt(qp)
        else:
            s0 = 2 * torch.full((1,), total / count, device=dev) / math.sqrt(qp)
        self._check_finite(s0, 'the calibration batches')
        self.set_step(s0.clamp(min=1e-6), signed)
        return True

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self._init_cache:
            self._init_from_first_call(x)
        if self.training and self.step.requires_grad:
            with torch.no_grad():      # keep the parameter itself valid (the optimizer may
                self.step.clamp_(min=_EPS)   # have pushed it below zero): value = use
        qn, qp = self.qrange
        n = x.numel() // self.step.numel()
        grad_factor = 1.0 / math.sqrt(n * qp)
        return lsq_fake_quant(x, self.scale(), qn, qp, grad_factor,
                              self.ch_axis if self.per_channel else None, self.impl)

    @torch.compiler.disable
    def _init_from_first_call(self, x: torch.Tensor) -> None:
        """First-call initialisation (data-dependent, collective): run eagerly under
        ``torch.compile``; calibrate before compiling to avoid the graph break."""
        self.initialize(x)

    @torch.no_grad()
    def quantize_to_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes and step size such that ``codes * scale`` equals ``forward(x)``."""
        if not self.is_initialized:
            raise RuntimeError('LSQQuantizer is not initialised: run a forward pass or load '
                               'a checkpoint before exporting integer codes')
        qn, qp = self.qrange
        s = self.scale().detach()
        sb = s.reshape([-1 if d == self.ch_axis % x.dim() else 1 for d in range(x.dim())]) \
            if self.per_channel else s
        codes = torch.round(x / sb).clamp(-qn, qp)
        return codes.to(torch.int8 if qp <= 127 else torch.int16), s
