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
        self._init_cache: bool | None = None
        self._signed_cache: bool | None = None

    # -- state -------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + 'step'
        if key in state_dict and state_dict[key].shape != self.step.shape:
            # keep the Parameter object (optimizers / DDP may hold it), change its shape
            self.step.data = torch.empty_like(state_dict[key], device=self.step.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._init_cache = self._signed_cache = None

    @property
    def is_initialized(self) -> bool:
        if self._init_cache is None:
            self._init_cache = bool(self.initialized.item())
        return self._init_cache

    @property
    def is_signed(self) -> bool:
        if self.signed_mode != 'auto':
            return bool(self.signed_mode)
        if self._signed_cache is None:
            self._signed_cache = bool(self.signed.item())
        return self._signed_cache

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

    # -- init --------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Initialise the step from ``x`` (``init='lsq'``: ``s0 = 2 mean|x| / sqrt(Q_P)``;
        ``'mse'``: :func:`mse_step`), averaged over ranks."""
        x = x.detach().float()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if self.signed_mode == 'auto':
            neg = (x.min() < 0).float().reshape(1)
            if world > 1:
                dist.all_reduce(neg, op=dist.ReduceOp.MAX)
            self.signed.fill_(int(neg.item() > 0))
            self._signed_cache = None
        qn, qp = self.qrange
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
        if not bool(torch.isfinite(s0).all()):    # once per quantizer; NaN/inf reach s0
            raise FloatingPointError(
                f'LSQ quantizer {getattr(self, "name", "") or "(unnamed)"} ({self.extra_repr()}): '
                f'non-finite values (nan/inf) in the tensor its step size is initialised from')
        s0 = s0.clamp(min=1e-6)
        if self.step.shape != s0.shape:
            self.step.data = s0.to(self.step)     # same Parameter object, new shape
        else:
            self.step.copy_(s0)
        self.initialized.fill_(1)
        self._init_cache = True

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.is_initialized:
            self.initialize(x)
        qn, qp = self.qrange
        n = x.numel() // self.step.numel()
        grad_factor = 1.0 / math.sqrt(n * qp)
        return lsq_fake_quant(x, self.scale(), qn, qp, grad_factor,
                              self.ch_axis if self.per_channel else None, self.impl)

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
