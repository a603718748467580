"""One schema for every RepQ setting: :class:`RepQConfig`.

:class:`~repq_mm.quant.QConfig` holds what a quantized layer or rep block needs (bit widths,
step sizes, BN mode, BNEst estimator); :class:`RepQConfig` adds what a whole model needs
(``method``, ``first_bits`` / ``last_bits`` / ``layer_bits``, ``skip``, ``deploy``). Every
default and every check lives in these two dataclasses; the ``repq`` dict of a config
(``RepQModel``), :func:`~repq_mm.convert.convert_to_repq`'s keyword arguments and the tools
are all read through :meth:`RepQConfig.from_dict`, which names a misspelt key's closest
valid key.

Example:
    >>> from repq_mm.settings import RepQConfig
    >>> cfg = RepQConfig.from_dict(dict(w_bits=4, a_bits=4, bn_mode='est', skip='head'))
    >>> cfg.skip, cfg.qconfig().bn_mode
    (('head',), 'est')
    >>> RepQConfig.from_dict(dict(bnmode='est'))
    Traceback (most recent call last):
    ...
    KeyError: "unknown repq key(s): 'bnmode' (did you mean 'bn_mode'?). Valid keys: [...]"
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .quant.config import QConfig, closest
from .quant.lsq import check_bits

METHODS = ('repq', 'lsq', 'ptq', 'fp')


def check_layer_bits(layer_bits) -> dict[str, int]:
    """Validate a ``layer_bits`` mapping (see :func:`~repq_mm.convert.convert_to_repq`);
    returns a copy (``{}`` for ``None``)."""
    if layer_bits is None:
        return {}
    if not isinstance(layer_bits, dict):
        raise ValueError(f'layer_bits must be a dict {{module name or pattern: bits}}, got '
                         f'{type(layer_bits).__name__}: {layer_bits!r}')
    for p, bits in layer_bits.items():
        if not isinstance(p, str) or not p:
            raise ValueError(f'layer_bits keys must be module names or fnmatch patterns '
                             f'(non-empty strings), got {p!r}')
        try:
            check_bits(bits)
        except ValueError as e:
            raise ValueError(f'layer_bits[{p!r}]: {e}') from None
    return dict(layer_bits)


@dataclass
class RepQConfig(QConfig):
    """Every RepQ setting of a model: the :class:`~repq_mm.quant.QConfig` fields plus

    Args:
        method: ``'repq'`` (RepQ-BN / RepQ-BNEst per ``bn_mode``), ``'lsq'`` (merge the rep
            blocks, then LSQ QAT: the paper's baseline), ``'ptq'`` (the ``'lsq'`` model,
            calibration only) or ``'fp'`` (the architecture as it is).
        first_bits, last_bits: bit width of the first / last quantized layer (``None``: as
            the rest; ``last_bits`` wins when one layer is both).
        layer_bits: ``{module name or fnmatch pattern: bits}`` for any quantized layer.
        skip: module names / patterns left untouched (a string is one name).
        deploy: merge every rep block into one conv after the above (the form
            ``tools/merge_quant.py`` writes checkpoints for).
    """

    method: str = 'repq'
    first_bits: int | None = None
    last_bits: int | None = None
    layer_bits: dict | None = None
    skip: tuple = ()
    deploy: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f'method must be one of {METHODS}, got {self.method!r}'
                             f'{closest(self.method, METHODS)}')
        for key in ('first_bits', 'last_bits'):
            if getattr(self, key) is not None:
                try:
                    check_bits(getattr(self, key))
                except ValueError as e:
                    raise ValueError(f'{key}: {e}') from None
        if not isinstance(self.deploy, bool):
            raise ValueError(f'deploy must be True or False, got {self.deploy!r}')
        skip = (self.skip,) if isinstance(self.skip, str) else self.skip
        if not isinstance(skip, (list, tuple)):
            raise ValueError(f'skip must be a list of module names / patterns, got '
                             f'{self.skip!r}')
        for p in skip:
            if not isinstance(p, str) or not p:
                raise ValueError(f'skip entries must be module names or fnmatch patterns '
                                 f'(non-empty strings), got {p!r}')
        self.skip = tuple(skip)
        if self.layer_bits is not None:
            self.layer_bits = check_layer_bits(self.layer_bits)

    @classmethod
    def from_dict(cls, d: dict | None, where: str = 'repq') -> 'RepQConfig':
        """See :meth:`QConfig.from_dict` (errors name the key as ``repq.key``)."""
        return super().from_dict(d, where)

    def qconfig(self) -> QConfig:
        """The per-layer part."""
        return QConfig(**{f.name: getattr(self, f.name) for f in fields(QConfig)})


#: every key of a ``repq`` dict and its default (derived from :class:`RepQConfig`)
REPQ_DEFAULTS = RepQConfig().to_dict()
