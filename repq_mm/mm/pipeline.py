"""Config + checkpoint -> model: the one pipeline the tools share.

``tools/merge_quant.py`` (:mod:`.deploy`), ``tools/export_onnx.py`` and the ONNX
evaluation (:mod:`.export`), and the analysis tools build their models here:

* :func:`repq_model_cfg`: the config's ``RepQModel`` (the only type check);
* :func:`repq_settings`: its ``repq`` dict as plain containers (weights-only safe);
* :func:`build_repq_model`: the model built the way mmengine's Runner builds it (a top-level
  ``data_preprocessor`` passed in), without loading ``init_checkpoint``, optionally with
  ``repq`` settings replaced;
* :func:`load_qat_model`: that model with a checkpoint's weights, in eval mode, optionally
  merged (the deploy form);
* :func:`eval_dataloader`: the data a tool checks or evaluates on: the test split, else
  the validation split (what ``tools/test.py`` evaluates).

Example::

    from mmengine.config import Config
    from repq_mm.mm import cli
    from repq_mm.mm.pipeline import load_qat_model
    cfg = Config.fromfile('configs/repvgg_fmnist/repvgg-A0w16_repq-bn_w4a4_fmnist.py')
    cli.prepare_cfg(cfg)
    model, ckpt, settings = load_qat_model(cfg, 'work_dirs/qat/epoch_1.pth', merge=True)
"""
from __future__ import annotations

import copy
import os.path as osp
import warnings

from mmengine.registry import MODELS, init_default_scope
from torch import nn

from ..convert import merge_model
from .checkpoint import load_weights
from .config import is_repq_model
from .model import (SettingsMismatchWarning, check_repq_cfg, mismatch_text,
                    settings_mismatch)

__all__ = ['repq_model_cfg', 'repq_settings', 'build_repq_model', 'load_qat_model',
           'eval_dataloader', 'EVAL_SPLITS']

#: the dataloaders a tool checks / evaluates on, in order of preference
EVAL_SPLITS = ('test_dataloader', 'val_dataloader')


def is_repq_config(cfg) -> bool:
    """Whether the config's model is a ``RepQModel``."""
    return is_repq_model(cfg.get('model', None))


def repq_model_cfg(cfg, error=ValueError):
    """The config's model section, which must be a ``RepQModel``; else ``error``."""
    if not is_repq_config(cfg):
        raise error("the config does not describe a RepQ model: its model must be "
                    "dict(type='RepQModel', architecture=..., repq=dict(...))")
    return cfg.model


def repq_settings(cfg) -> dict:
    """The ``repq`` dict of the config's ``RepQModel`` as plain containers (nested
    ConfigDicts, e.g. ``layer_bits``, are not weights-only safe), without
    ``init_checkpoint``; not completed with defaults."""
    repq = cfg.model.get('repq', None) or {}
    repq = repq.to_dict() if hasattr(repq, 'to_dict') else copy.deepcopy(dict(repq))
    repq.pop('init_checkpoint', None)
    return repq


def build_repq_model(cfg, repq_overrides: dict | None = None, error=ValueError,
                     init_checkpoint: str | None = None) -> nn.Module:
    """The (unmerged) ``RepQModel`` of ``cfg`` (already through
    :func:`~repq_mm.mm.cli.prepare_cfg`), built the way mmengine's Runner builds it, loading
    the float ``init_checkpoint`` given here (not the config's: the caller loads its own
    weights); ``repq_overrides`` replace ``repq`` settings first (e.g.
    ``dict(w_bits=4, a_bits=8)``, or ``dict(deploy=True)``)."""
    model_cfg = copy.deepcopy(repq_model_cfg(cfg, error))
    model_cfg['repq'] = {**repq_settings(cfg), **(repq_overrides or {})}   # checked by RepQModel
    model_cfg['init_checkpoint'] = init_checkpoint
    if cfg.get('data_preprocessor', None) is not None:   # what mmengine's Runner does
        model_cfg.setdefault('data_preprocessor', copy.deepcopy(cfg.data_preprocessor))
    init_default_scope(cfg.get('default_scope', None) or 'mmpretrain')
    return MODELS.build(model_cfg)


def load_qat_model(cfg, checkpoint: str, merge: bool = False, error=ValueError,
                   repq_overrides: dict | None = None) -> tuple[nn.Module, dict, dict]:
    """``(model, checkpoint_dict, settings)``: the model of ``cfg`` with the weights of
    ``checkpoint``, in eval mode. ``cfg`` is a QAT config (a training checkpoint) or a
    deploy config (``repq.deploy=True``: a ``merged.pth``); ``merge``: a QAT model is
    merged into its deploy form (weights on the integer grid). ``settings`` is the
    validated ``repq`` dict. Errors (no RepQ model, a missing or unreadable checkpoint, one
    of another architecture) are raised as ``error``, naming the reason."""
    model = build_repq_model(cfg, repq_overrides, error)
    settings = check_repq_cfg({**repq_settings(cfg), **(repq_overrides or {})})
    if not osp.isfile(checkpoint):
        raise error(f'checkpoint {checkpoint} does not exist')
    with warnings.catch_warnings():     # a mismatch is an error here (below)
        warnings.simplefilter('ignore', SettingsMismatchWarning)
        ck = load_weights(model, checkpoint, error)
    recorded = getattr(model, 'loaded_settings', None)
    if recorded is not None:
        diff = {k: v for k, v in settings_mismatch(recorded, settings).items()
                if k not in (repq_overrides or {})}
        if diff:
            raise error(f'checkpoint {checkpoint} was trained with other repq settings than '
                        f'the config: {mismatch_text(diff)}; use the config it was trained '
                        'with (the copy in its work_dir) or --cfg-options ' +
                        ' '.join(f'model.repq.{k}={a!r}' for k, (a, _) in diff.items()))
    model.eval()
    if merge and not settings['deploy']:
        model = merge_model(model, inplace=True).eval()
    return model, ck, settings


def eval_dataloader(cfg, error=ValueError, max_samples: int | None = None):
    """``(key, DataLoader)`` of the first of :data:`EVAL_SPLITS` the config has
    (workers as configured, not persistent without workers; ``max_samples``: the first
    samples of its dataset only)."""
    from mmengine.runner import Runner
    for key in EVAL_SPLITS:
        dl = cfg.get(key, None)
        if dl and dl.get('dataset', None) is not None:
            dl = copy.deepcopy(dl)
            if dl.get('num_workers', 0) == 0:
                dl['persistent_workers'] = False
            if max_samples is not None:
                dl['dataset']['indices'] = int(max_samples)
            return key, Runner.build_dataloader(dl, seed=0)
    raise error(f'the config has none of {EVAL_SPLITS}: nothing to check or evaluate on')
