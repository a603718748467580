"""Quantization settings shared by RepQ blocks and plain quantized layers."""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields

from .lsq import LSQ_IMPLS, LSQQuantizer, check_bits

BN_MODES = ('exact', 'est')
EST_STATS = ('diag', 'kron')      # RepQ-BNEst estimators (repq_mm.rep.estimators)
INITS = ('lsq', 'mse')


def closest(key, valid) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``valid`` to ``key``, else ``''``."""
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.5)
    return f' (did you mean {close[0]!r}?)' if close else ''


def _one_of(key, value, valid):
    if value not in valid:
        raise ValueError(f'{key} must be one of {valid}, got {value!r}{closest(value, valid)}')


@dataclass
class QConfig:
    """What to quantize and how.

    Args:
        w_bits: weight bit width (2..8), signed.
        a_bits: activation bit width (2..8); signedness decided from the first batch
            (``act_signed='auto'``) unless given.
        per_channel: per-output-channel weight step sizes.
        bn_mode: ``'exact'`` (RepQ-BN) or ``'est'`` (RepQ-BNEst) batch statistics for BN
            inside rep blocks during training.
        act_signed: ``True``, ``False`` or ``'auto'``.
        symmetric: symmetric signed weight range ``[-Q_P, Q_P]``.
        impl: LSQ implementation, ``'fast'`` (default), ``'fused'`` (PyTorch kernels) or
            ``'reference'`` (see :mod:`repq_mm.quant.lsq`).
        init: step-size initialisation, ``'lsq'`` (the paper's rule) or ``'mse'``
            (minimum quantization error on the first tensor / calibration batches).
        est_refresh: RepQ-BNEst with periodic correction: every ``est_refresh`` training
            steps a block computes exact batch statistics too (the RepQ-BN pass) and learns
            a per-channel correction of the estimate (variance ratio, mean shift in units
            of sigma) applied in the steps between. 0: the paper's plain BNEst.
        est_stats: how RepQ-BNEst estimates a branch's BN statistics from the block input:
            ``'diag'`` (the paper's diagonal-covariance estimate) or ``'kron'`` (exact means
            with zero padding and stride, exact variances of 1x1 / identity branches,
            Kronecker-factored patch covariance for KxK; :mod:`repq_mm.rep.estimators`).
        int_bias: biases on the integer accumulator's grid ``s_a s_w`` in the forward
            (straight-through), as the int32 bias of an integer conv / GEMM: the merged
            model then computes exactly what the integer ONNX model computes (without it the
            export rounds the bias, which can flip low-bit activation codes).
    """

    w_bits: int = 8
    a_bits: int = 8
    per_channel: bool = False
    bn_mode: str = 'exact'
    act_signed: bool | str = 'auto'
    symmetric: bool = False
    impl: str = 'fast'
    est_refresh: int = 0
    init: str = 'lsq'
    est_stats: str = 'diag'
    int_bias: bool = False

    def __post_init__(self):
        """Every check of a per-layer setting (the only place they are written)."""
        for key in ('w_bits', 'a_bits'):
            try:
                check_bits(getattr(self, key))
            except ValueError as e:
                raise ValueError(f'{key}: {e}') from None
        _one_of('bn_mode', self.bn_mode, BN_MODES)
        for key in ('per_channel', 'symmetric', 'int_bias'):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f'{key} must be True or False, got {getattr(self, key)!r}')
        if not (isinstance(self.act_signed, bool) or self.act_signed == 'auto'):
            raise ValueError(f"act_signed must be True, False or 'auto', got "
                             f"{self.act_signed!r}")
        _one_of('impl', self.impl, LSQ_IMPLS)
        if isinstance(self.est_refresh, bool) or not isinstance(self.est_refresh, int) or \
                self.est_refresh < 0:
            raise ValueError(f'est_refresh must be an int >= 0, got {self.est_refresh!r}')
        _one_of('init', self.init, INITS)
        _one_of('est_stats', self.est_stats, EST_STATS)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: dict | None, where: str = 'qconfig'):
        """Build from a settings dict (``None``: the defaults); errors name the key as
        ``{where}.{key}``, unknown keys get their closest valid key and the valid list."""
        if d is not None and not isinstance(d, dict):          # ConfigDict is a dict
            raise ValueError(f'{where} must be a dict of settings, got {type(d).__name__}: '
                             f'{d!r}')
        d = dict(d or {})
        valid = cls.keys()
        unknown = [k for k in d if k not in valid]
        if unknown:
            hints = '; '.join(f'{k!r}{closest(k, valid)}' for k in unknown)
            raise KeyError(f'unknown {where} key(s): {hints}. Valid keys: {sorted(valid)}')
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f'{where}.{e}') from None

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **kw):
        return type(self)(**{**self.to_dict(), **kw})

    def weight_quantizer(self, out_channels: int | None = None) -> LSQQuantizer:
        return LSQQuantizer(self.w_bits, signed=True, per_channel=self.per_channel, ch_axis=0,
                            symmetric=self.symmetric, impl=self.impl,
                            num_channels=out_channels, init=self.init)

    def act_quantizer(self) -> LSQQuantizer:
        return LSQQuantizer(self.a_bits, signed=self.act_signed, per_channel=False,
                            impl=self.impl, init=self.init)
