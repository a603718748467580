"""``RepQModel``: any OpenMMLab model (an mmpretrain classifier, an mmdet detector) turned
into a RepQ / LSQ / PTQ / deploy model.

Example config (mmpretrain; the form every tool builds, see :mod:`repq_mm.mm.config`)::

    _base_ = 'mmpretrain::repvgg/repvgg-A0_8xb32_in1k.py'
    custom_imports = dict(imports=['repq_mm'], allow_failed_imports=False)
    model = dict(_delete_=True, type='RepQModel', architecture=_base_.model,
                 repq=dict(w_bits=4, a_bits=4, bn_mode='est'), init_checkpoint='fp.pth')
    custom_hooks = [dict(type='LSQCalibHook')]
"""
from __future__ import annotations

import copy
import difflib
import logging

from mmengine.logging import print_log
from mmengine.model import BaseModel
from mmengine.registry import MODELS, DefaultScope
from torch import nn

from ..convert import check_layer_bits, convert_to_repq, merge_model
from ..quant import BN_MODES, check_bits
from ..quant.lsq import LSQ_IMPLS
from .checkpoint import register_safe_globals

#: valid keys of the ``repq`` dict and their defaults
REPQ_DEFAULTS = dict(
    method='repq',          # 'repq' | 'lsq' | 'ptq' | 'fp'
    w_bits=8,
    a_bits=8,
    bn_mode='exact',        # 'exact' (RepQ-BN) | 'est' (RepQ-BNEst)
    per_channel=False,
    first_bits=None,
    last_bits=None,
    layer_bits=None,        # {module name / pattern: bits}, e.g. a head's output convs
    act_signed='auto',
    symmetric=False,
    skip=(),
    deploy=False,
    impl='fast',            # 'fast' | 'fused' | 'reference' (LSQ implementation)
    est_refresh=0,          # BNEst: exact statistics every k steps correct the estimate
    init='lsq',             # step init: 'lsq' (paper) | 'mse' (min quantization error)
)
METHODS = ('repq', 'lsq', 'ptq', 'fp')


def _closest(key, valid) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    return f' (did you mean {close[0]!r}?)' if close else ''


def _check_bool(key, v):
    if not isinstance(v, bool):
        raise ValueError(f'repq.{key} must be True or False, got {v!r}')


def check_repq_cfg(repq: dict | None) -> dict:
    """Validate a ``repq`` dict and return it completed with :data:`REPQ_DEFAULTS`.

    Raises:
        KeyError: unknown key (with the closest valid key and the list of valid keys).
        ValueError: a bad value, naming the key.
    """
    if repq is not None and not isinstance(repq, dict):      # ConfigDict is a dict
        raise ValueError(f'repq must be a dict of settings, got {type(repq).__name__}: '
                         f'{repq!r}')
    repq = dict(repq or {})
    unknown = [k for k in repq if k not in REPQ_DEFAULTS]
    if unknown:
        hints = '; '.join(f'{k!r}{_closest(k, REPQ_DEFAULTS)}' for k in unknown)
        raise KeyError(f'unknown repq key(s): {hints}. Valid keys: {sorted(REPQ_DEFAULTS)}')
    out = {**REPQ_DEFAULTS, **repq}
    if out['method'] not in METHODS:
        raise ValueError(f'repq.method must be one of {METHODS}, got {out["method"]!r}'
                         f'{_closest(out["method"], METHODS)}')
    for key in ('w_bits', 'a_bits', 'first_bits', 'last_bits'):
        if out[key] is None and key in ('first_bits', 'last_bits'):
            continue
        try:
            check_bits(out[key])
        except ValueError as e:
            raise ValueError(f'repq.{key}: {e}') from None
    if out['bn_mode'] not in BN_MODES:
        raise ValueError(f'repq.bn_mode must be one of {BN_MODES}, got {out["bn_mode"]!r}'
                         f'{_closest(out["bn_mode"], BN_MODES)}')
    for key in ('per_channel', 'symmetric', 'deploy'):
        _check_bool(key, out[key])
    if out['act_signed'] not in (True, False, 'auto') or out['act_signed'] in (0, 1) and \
            not isinstance(out['act_signed'], bool):
        raise ValueError(f"repq.act_signed must be True, False or 'auto', got "
                         f"{out['act_signed']!r}")
    if out['impl'] not in LSQ_IMPLS:
        raise ValueError(f"repq.impl must be one of {LSQ_IMPLS}, got {out['impl']!r}")
    skip = out['skip']
    if isinstance(skip, str):
        skip = (skip,)
    if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f'repq.skip must be a list of module names / patterns, got {skip!r}')
    out['skip'] = tuple(skip)
    if out['layer_bits'] is not None:
        try:
            out['layer_bits'] = check_layer_bits(out['layer_bits'])
        except ValueError as e:
            raise ValueError(f'repq.{e}') from None
    return out


def _build_architecture(cfg) -> nn.Module:
    """Build ``cfg`` with mmengine's root ``MODELS`` (the current default scope, e.g.
    mmpretrain, resolves the type). Without a default scope, unprefixed types are looked up
    in mmpretrain's then mmdet's registry."""
    if isinstance(cfg, nn.Module):
        return cfg
    cfg = copy.deepcopy(cfg)
    typ = cfg.get('type')
    if DefaultScope.get_current_instance() is None and isinstance(typ, str) and \
            '.' not in typ and '_scope_' not in cfg and MODELS.get(typ) is None:
        for scope in ('mmpretrain', 'mmdet'):
            try:
                with MODELS.switch_scope_and_registry(scope) as reg:
                    if reg.scope == scope and reg.get(typ) is not None:
                        return reg.build(cfg)
            except ImportError:
                continue
    return MODELS.build(cfg)


def load_float_checkpoint(module: nn.Module, filename: str, strict: bool = True) -> None:
    """Load a float checkpoint (mmengine / mmpretrain / a RepQModel of method 'fp') into
    ``module`` before conversion: ``state_dict`` unwrapped, ``module.`` (DDP) and
    ``architecture.`` (RepQModel) prefixes stripped; weights_only load."""
    from mmengine.runner.checkpoint import load_checkpoint
    register_safe_globals()
    load_checkpoint(module, filename, map_location='cpu', strict=strict, logger='current',
                    revise_keys=[(r'^module\.', ''), (r'^architecture\.', '')])


@MODELS.register_module()
class RepQModel(BaseModel):
    """Wrap an OpenMMLab model for RepQ quantization-aware training.

    Args:
        architecture: the original model config (e.g. an mmpretrain ``ImageClassifier``)
            or module.
        repq: what to do with it (validated, see :data:`REPQ_DEFAULTS`):

            * ``method='repq'`` (default): :func:`~repq_mm.convert.convert_to_repq` (RepQ-BN
              or RepQ-BNEst per ``bn_mode``): rep blocks keep training their branches,
              the merged kernel is quantized;
            * ``'lsq'`` (the paper's baseline): merge the rep blocks, then LSQ QAT;
            * ``'ptq'``: same model as ``'lsq'``, meant for 0 training iterations
              (calibration only, see ``LSQCalibHook``);
            * ``'fp'``: the architecture as it is;
            * ``deploy=True``: after the above, every rep block is merged into one conv
              (the form ``tools/merge_quant.py`` writes checkpoints for).

            Other keys: ``w_bits``, ``a_bits``, ``bn_mode``, ``per_channel``,
            ``first_bits``, ``last_bits``, ``layer_bits``, ``act_signed``, ``symmetric``, ``skip``,
            ``impl`` (passed to ``convert_to_repq``).
        init_checkpoint: float checkpoint loaded into the architecture before conversion
            (strict). When given, ``init_weights`` leaves the weights alone.
        data_preprocessor: passed to the architecture when its config has none (what
            mmengine's Runner does with a top-level ``data_preprocessor``); the wrapper uses
            the architecture's own preprocessor, so batches are prepared exactly as for the
            original model.
        init_cfg: mmengine init config of the wrapper.

    ``forward`` / ``train_step`` / ``val_step`` / ``test_step`` go through the architecture's
    ``forward`` (losses and predictions are the original model's). Attributes the wrapper
    does not have are looked up on ``architecture`` (``model.backbone``, ``model.head``).
    """

    def __init__(self, architecture, repq: dict | None = None,
                 init_checkpoint: str | None = None, data_preprocessor=None,
                 init_cfg=None):
        repq = dict(repq or {})
        if 'init_checkpoint' in repq:     # accepted here too, for hand-written configs
            ck = repq.pop('init_checkpoint')
            if init_checkpoint is not None and ck is not None and ck != init_checkpoint:
                raise ValueError(f'init_checkpoint given twice: {init_checkpoint!r} and '
                                 f'repq.init_checkpoint={ck!r}')
            init_checkpoint = init_checkpoint or ck
        repq_cfg = check_repq_cfg(repq)
        if isinstance(architecture, dict):
            architecture = copy.deepcopy(architecture)
            if isinstance(data_preprocessor, dict):
                architecture.setdefault('data_preprocessor', data_preprocessor)
            elif isinstance(data_preprocessor, nn.Module):
                architecture.setdefault('data_preprocessor', data_preprocessor)
        arch_cfg = copy.deepcopy(architecture) if isinstance(architecture, dict) else None
        arch = _build_architecture(architecture)
        dp = getattr(arch, 'data_preprocessor', None)
        if not isinstance(dp, nn.Module):
            dp = data_preprocessor     # a plain nn.Module architecture: BaseModel builds one
        super().__init__(data_preprocessor=dp, init_cfg=init_cfg)
        if isinstance(arch, BaseModel) and arch.data_preprocessor is not self.data_preprocessor:
            arch.data_preprocessor = self.data_preprocessor

        self.repq_cfg = repq_cfg
        self._arch_cfg = arch_cfg
        self.init_checkpoint = init_checkpoint
        if init_checkpoint:
            print_log(f'RepQModel: loading float checkpoint {init_checkpoint}',
                      logger='current')
            load_float_checkpoint(arch, init_checkpoint, strict=True)
        self.architecture = self.convert(arch, self.repq_cfg)

    # -- conversion ------------------------------------------------------------------------
    @staticmethod
    def convert(arch: nn.Module, repq: dict) -> nn.Module:
        """Apply ``repq`` (validated) to ``arch`` in place; returns the converted module."""
        method = repq['method']
        kwargs = {k: repq[k] for k in ('w_bits', 'a_bits', 'bn_mode', 'per_channel',
                                       'first_bits', 'last_bits', 'layer_bits', 'act_signed',
                                       'symmetric', 'impl', 'skip', 'est_refresh', 'init')}
        if method in ('lsq', 'ptq'):
            arch = merge_model(arch, inplace=True)
        if method != 'fp':
            arch = convert_to_repq(arch, inplace=True, **kwargs)
        if repq['deploy']:
            arch = merge_model(arch, inplace=True)
        return arch

    # -- mmengine API ----------------------------------------------------------------------
    def init_weights(self):
        """What ``Runner.train`` calls before loading / resuming.

        With ``init_checkpoint`` (or ``deploy``) the weights are left alone. Otherwise the
        architecture is initialised as the original model would be (its ``init_cfg``:
        Kaiming, ``Pretrained`` backbones ...) *before* conversion, which renames and
        replaces modules: a fresh copy is built, initialised, converted the same way, and
        its state loaded into ``architecture``.
        """
        if self.init_checkpoint or self.repq_cfg['deploy']:
            print_log('RepQModel: init_weights skipped (weights come from '
                      f'{self.init_checkpoint or "the deploy checkpoint"})',
                      logger='current', level=logging.INFO)
            self._is_init = True
            return
        if self._arch_cfg is None:           # built from a module: initialise in place
            super().init_weights()
            return
        fresh = _build_architecture(self._arch_cfg)
        if hasattr(fresh, 'init_weights'):
            fresh.init_weights()
        fresh = self.convert(fresh, self.repq_cfg)
        self.architecture.load_state_dict(fresh.state_dict(), strict=True)
        if self.init_cfg:
            from mmengine.model.weight_init import initialize
            initialize(self, self.init_cfg)
        self._is_init = True

    def forward(self, inputs, data_samples=None, mode: str = 'tensor'):
        return self.architecture(inputs, data_samples, mode=mode)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get('_modules', {})
            arch = modules.get('architecture')
            if arch is None or name.startswith('__'):
                raise
            return getattr(arch, name)

    def extra_repr(self) -> str:
        return f'repq={self.repq_cfg}'
