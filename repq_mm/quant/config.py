"""Quantization settings shared by RepQ blocks and plain quantized layers."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .lsq import LSQQuantizer, check_bits

BN_MODES = ('exact', 'est')


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

    def __post_init__(self):
        check_bits(self.w_bits)
        check_bits(self.a_bits)
        if self.bn_mode not in BN_MODES:
            raise ValueError(f'bn_mode must be one of {BN_MODES}, got {self.bn_mode!r}')
        if isinstance(self.est_refresh, bool) or not isinstance(self.est_refresh, int) or \
                self.est_refresh < 0:
            raise ValueError(f'est_refresh must be an int >= 0, got {self.est_refresh!r}')
        if self.init not in ('lsq', 'mse'):
            raise ValueError(f"init must be 'lsq' or 'mse', got {self.init!r}")
        from ..rep.estimators import ESTIMATORS
        if self.est_stats not in ESTIMATORS:
            raise ValueError(f'est_stats must be one of {ESTIMATORS}, got {self.est_stats!r}')

    @classmethod
    def from_dict(cls, d: dict) -> 'QConfig':
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise KeyError(f'unknown QConfig keys {sorted(unknown)}; valid keys: {sorted(names)}')
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **kw) -> 'QConfig':
        return QConfig(**{**self.to_dict(), **kw})

    def weight_quantizer(self, out_channels: int | None = None) -> LSQQuantizer:
        return LSQQuantizer(self.w_bits, signed=True, per_channel=self.per_channel, ch_axis=0,
                            symmetric=self.symmetric, impl=self.impl,
                            num_channels=out_channels, init=self.init)

    def act_quantizer(self) -> LSQQuantizer:
        return LSQQuantizer(self.a_bits, signed=self.act_signed, per_channel=False,
                            impl=self.impl, init=self.init)
