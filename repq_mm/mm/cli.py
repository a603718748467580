"""Helpers shared by the command-line tools (``tools/train.py``, ``tools/test.py``,
``tools/merge_quant.py``, ``tools/export_onnx.py``).

The tools take a config as it is: the model is what the config declares (a RepQ config
declares ``model = dict(type='RepQModel', ...)`` itself, see :mod:`repq_mm.mm.config`), so
mmpretrain's / mmdet's own tools build the same model from it. What :func:`prepare_cfg`
adds is only what makes the run and its dumped config self-contained.
"""
from __future__ import annotations

import os


def add_repq_import(cfg):
    """Make sure the config imports ``repq_mm`` (registration + checkpoint allowlist)."""
    ci = cfg.get('custom_imports', None)
    if ci is None:
        cfg.custom_imports = dict(imports=['repq_mm'], allow_failed_imports=False)
    else:
        imports = ci.get('imports', [])
        imports = [imports] if isinstance(imports, str) else list(imports)
        if 'repq_mm' not in imports:
            imports.append('repq_mm')
        ci['imports'] = imports
        cfg.custom_imports = ci
    return cfg


def set_default_scope(cfg) -> None:
    """What mmpretrain / mmdet tools do: a config without ``default_scope`` gets the scope of
    the package its model comes from (mmpretrain by default)."""
    if cfg.get('default_scope', None) is None:
        cfg.default_scope = 'mmpretrain'


def prepare_cfg(cfg):
    """Every tool, after ``--cfg-options`` are merged: ``repq_mm`` in ``custom_imports`` (so
    the config the Runner dumps works with the stock tools too), :func:`~repq_mm.mm.config.
    check_config` (which mmengine's ``Config`` also runs by itself once repq_mm is
    imported), default scope. Nothing else of the config changes. Returns ``cfg``."""
    from .config import check_config
    add_repq_import(cfg)
    check_config(cfg)
    set_default_scope(cfg)
    return cfg


def fix_dataloader_workers(cfg) -> None:
    """``persistent_workers`` is only valid with ``num_workers > 0``."""
    for field in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dl = cfg.get(field, None)
        if dl is not None and dl.get('num_workers', 0) == 0 and dl.get('persistent_workers'):
            dl['persistent_workers'] = False


def set_local_rank(local_rank) -> None:
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(local_rank)
