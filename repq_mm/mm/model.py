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
import json
import logging
import warnings

from mmengine.logging import print_log
from mmengine.model import BaseModel
from mmengine.registry import MODELS, DefaultScope
import torch
from torch import nn

from ..convert import convert_to_repq, merge_model
from ..settings import REPQ_DEFAULTS, RepQConfig
from .checkpoint import register_safe_globals

__all__ = ['RepQModel', 'check_repq_cfg', 'REPQ_DEFAULTS', 'load_float_checkpoint',
           'RECORDED_KEYS', 'SettingsMismatchWarning', 'settings_mismatch']

#: the ``repq`` keys that decide what a trained model computes: recorded in every
#: ``RepQModel`` state dict (entry ``_extra_state``) and compared when one is loaded
RECORDED_KEYS = ('method', 'w_bits', 'a_bits', 'per_channel', 'act_signed', 'symmetric',
                 'first_bits', 'last_bits', 'layer_bits', 'skip', 'int_bias')


class SettingsMismatchWarning(UserWarning):
    """A checkpoint was trained with other ``repq`` settings than the model it is loaded
    into (bit widths, ``int_bias``, ...): its step sizes and biases mean something else."""


def _plain(v):
    """Settings as plain containers (lists for tuples, dicts for ConfigDicts)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def settings_mismatch(recorded: dict, current: dict, keys=RECORDED_KEYS) -> dict:
    """``{key: (recorded, current)}`` for the ``keys`` whose values differ (keys the
    record lacks are not compared)."""
    return {k: (recorded[k], _plain(current.get(k))) for k in keys
            if k in recorded and _plain(recorded[k]) != _plain(current.get(k))}


def mismatch_text(diff: dict) -> str:
    return ', '.join(f'{k}={a!r} (this model: {b!r})' for k, (a, b) in diff.items())


def check_repq_cfg(repq: dict | None) -> dict:
    """Validate a ``repq`` dict and return it completed with the defaults
    (:class:`~repq_mm.settings.RepQConfig` owns both).

    Raises:
        KeyError: unknown key (with the closest valid key and the list of valid keys).
        ValueError: a bad value, naming the key.
    """
    return RepQConfig.from_dict(repq, 'repq').to_dict()


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

            Every other key is a :class:`~repq_mm.settings.RepQConfig` field (``w_bits``,
            ``a_bits``, ``bn_mode``, ``est_stats``, ``per_channel``, ``first_bits``,
            ``last_bits``, ``layer_bits``, ``skip`` ...), passed to ``convert_to_repq``.
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

    #: the recorded settings of the last checkpoint loaded (``None``: none loaded, or one
    #: that records none)
    loaded_settings = None

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
        cfg = RepQConfig.from_dict(repq, 'repq')
        if cfg.method in ('lsq', 'ptq'):
            arch = merge_model(arch, inplace=True)
        if cfg.method != 'fp':
            arch = convert_to_repq(arch, cfg, inplace=True)
        if cfg.deploy:
            arch = merge_model(arch, inplace=True)
        return arch

    # -- the settings recorded in checkpoints ------------------------------------------------
    def recorded_settings(self) -> dict:
        """The :data:`RECORDED_KEYS` of this model's settings (plain containers)."""
        return {k: _plain(self.repq_cfg[k]) for k in RECORDED_KEYS}

    def get_extra_state(self) -> torch.Tensor:
        """Saved with the weights (``_extra_state``): the settings the weights belong to, as
        the UTF-8 bytes of ``{"repq": {...}}`` in a uint8 tensor (state dicts stay
        tensor-only for tracing, ONNX export and weight averaging)."""
        text = json.dumps({'repq': self.recorded_settings()}, sort_keys=True)
        return torch.tensor(list(text.encode('utf-8')), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """Keep the loaded checkpoint's settings (``loaded_settings``) and warn
        (:class:`SettingsMismatchWarning`) when they differ from this model's."""
        try:
            if isinstance(state, torch.Tensor):
                state = json.loads(bytes(state.to(torch.uint8).tolist()).decode('utf-8'))
        except (UnicodeDecodeError, ValueError):
            state = None
        rec = state.get('repq') if isinstance(state, dict) else None
        if not isinstance(rec, dict):
            raise ValueError(f'RepQModel: the checkpoint\'s recorded settings are unreadable: '
                             f'{state!r:.200}')
        self.__dict__['loaded_settings'] = rec
        diff = settings_mismatch(rec, self.repq_cfg)
        if diff:
            msg = ('RepQModel: the checkpoint was trained with other repq settings: '
                   f'{mismatch_text(diff)}. Its step sizes / biases belong to those settings; '
                   'use the config it was trained with (the copy in its work_dir) or set them, '
                   'e.g. --cfg-options ' + ' '.join(f'model.repq.{k}={a!r}'
                                                    for k, (a, _) in diff.items()))
            warnings.warn(msg, SettingsMismatchWarning, stacklevel=2)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + '_extra_state'
        had = key in state_dict
        self.__dict__['loaded_settings'] = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        if not had:       # a checkpoint from before the settings were recorded
            if key in missing_keys:
                missing_keys.remove(key)
            print_log('RepQModel: the checkpoint records no repq settings (written before '
                      'repq_mm recorded them); its bit widths and int_bias are not checked '
                      'against the config', logger='current', level=logging.WARNING)

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
