"""mmengine hooks for RepQ training: LSQ calibration and BN statistics management.

* :class:`LSQCalibHook`: LSQ step-size initialisation from ``num_batches`` training batches
  (before training; before val / test when quantizers are still uninitialised, e.g. PTQ),
  optional step-size freezing, step-size statistics in the log.
* :class:`BNEstHook`: ``bn_mode`` schedule (``'est'`` / ``'exact'``) over training and a
  BN re-estimation of every rep block at the end of training (:func:`reestimate_bn`).
"""
from __future__ import annotations

import copy

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn
from torch.utils.data import DataLoader

from .. import calib
from ..calib import quantizers, rep_blocks, set_bn_mode  # noqa: F401 (re-exported)
from ..quant import BN_MODES
from ..quant.layers import clear_weight_caches  # noqa: F401 (re-exported)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def _fresh_loader(dataloader):
    """A loader over the same data that does not touch ``dataloader``'s own iterator (a
    persistent-worker loader would reset the training loop's iterator otherwise)."""
    if not isinstance(dataloader, DataLoader):
        return dataloader
    kw = dict(num_workers=dataloader.num_workers, collate_fn=dataloader.collate_fn,
              pin_memory=False, worker_init_fn=dataloader.worker_init_fn)
    if dataloader.batch_size is None or type(dataloader.batch_sampler) is not \
            torch.utils.data.BatchSampler:
        return DataLoader(dataloader.dataset, batch_sampler=copy.deepcopy(
            dataloader.batch_sampler), **kw)
    return DataLoader(dataloader.dataset, batch_size=dataloader.batch_size,
                      sampler=dataloader.sampler, drop_last=dataloader.drop_last, **kw)


def _forward_fn(model: nn.Module):
    """``forward(batch)`` of an OpenMMLab model: ``mode='tensor'``, the batch prepared by
    ``model.data_preprocessor`` without training-time batch augmentation."""
    def forward(batch):
        data = model.data_preprocessor(batch, False)
        if isinstance(data, dict):
            return model(**data, mode='tensor')
        return model(*data, mode='tensor')
    return forward


def _run_batches(model: nn.Module, dataloader, num_batches: int) -> int:
    """Run up to ``num_batches`` batches of ``dataloader`` through ``model``."""
    return calib.run_batches(_forward_fn(model), _fresh_loader(dataloader), num_batches)


def _resolve_iter(when, max_iters: int) -> int:
    """A float in [0, 1] is a fraction of ``max_iters``; an int is an iteration."""
    if isinstance(when, bool) or not isinstance(when, (int, float)):
        raise ValueError(f'expected an iteration (int) or a fraction (float in [0, 1]), '
                         f'got {when!r}')
    if isinstance(when, float):
        if not 0.0 <= when <= 1.0:
            raise ValueError(f'a float iteration must be a fraction in [0, 1], got {when}')
        return int(round(when * max_iters))
    return int(when)


def _get_train_loader(runner):
    """The runner's training dataloader when it has (or can build) one, else ``None``."""
    loop = getattr(runner, '_train_loop', None)
    if loop is not None and not isinstance(loop, dict):
        return runner.train_dataloader
    cfg = getattr(runner, '_train_dataloader', None)
    if cfg is None:
        return None
    if isinstance(cfg, DataLoader):
        return cfg
    try:
        return runner.build_dataloader(cfg, seed=runner.seed)
    except Exception as e:  # pragma: no cover - data missing in a test-only setup
        print_log(f'LSQCalibHook: cannot build the training dataloader ({e})',
                  logger='current', level=30)
        return None


# --------------------------------------------------------------------------------------
# LSQ calibration
# --------------------------------------------------------------------------------------
def calibrate_lsq(model: nn.Module, dataloader, num_batches: int = 1,
                  logger='current') -> dict:
    """:func:`repq_mm.calib.calibrate_lsq` on ``num_batches`` batches of an OpenMMLab
    ``dataloader`` (prepared by the model's data preprocessor, ``mode='tensor'``), logged.
    Returns its summary."""
    model = _unwrap(model)
    summary = calib.calibrate_lsq(model, _fresh_loader(dataloader), _forward_fn(model),
                                  num_batches)
    if summary['weight'] or summary['act'] or summary['missed']:
        print_log(calib.calibration_message(summary), logger=logger)
    return summary


def step_stats(model: nn.Module) -> dict:
    """``{kind: (mean, min, max)}`` of the (initialised) step sizes per quantizer kind."""
    out = {}
    for kind in ('weight', 'act'):
        steps = [q.scale().detach().flatten().float().cpu()
                 for _, q, k in quantizers(_unwrap(model)) if k == kind and q.is_initialized]
        if steps:
            s = torch.cat(steps)
            out[kind] = (float(s.mean()), float(s.min()), float(s.max()))
    return out


@HOOKS.register_module()
class LSQCalibHook(Hook):
    """LSQ step-size calibration, optional freezing and logging.

    Args:
        num_batches: training batches used to initialise uninitialised quantizers
            (:func:`calibrate_lsq`); run before training, and before val / test when the
            model still has uninitialised quantizers (PTQ, or a test run without training).
        freeze_step_at: freeze all step sizes from this iteration on (float in [0, 1]: a
            fraction of ``max_iters``; int: an iteration; ``None``: never). Frozen steps keep
            their values exactly (restored after every iteration, so optimizers with weight
            decay or momentum do not move them; outside DDP they also stop requiring grad).
        log_interval: every this many iterations, log mean / min / max step size per
            quantizer kind (``train/lsq_w_step_mean`` ...) through the message hub.
        save_calibrated: after calibrating before training, save ``calibrated.pth`` (model
            only) in the work dir: the checkpoint of a PTQ run (``train_cfg.max_iters=0``),
            for ``tools/merge_quant.py``.
    """

    priority = 'NORMAL'

    def __init__(self, num_batches: int = 4, freeze_step_at=None, log_interval: int = 50,
                 save_calibrated: bool = False):
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f'num_batches must be a positive int, got {num_batches!r}')
        if freeze_step_at is not None:
            _resolve_iter(freeze_step_at, 1)     # validate
        self.num_batches = num_batches
        self.freeze_step_at = freeze_step_at
        self.log_interval = log_interval
        self.save_calibrated = save_calibrated
        self._frozen: dict | None = None

    # -- calibration -----------------------------------------------------------------------
    def _calibrate(self, runner, fallback_loader=None) -> bool:
        model = _unwrap(runner.model)
        if all(q.is_initialized for _, q, _ in quantizers(model)):
            return False
        loader = _get_train_loader(runner)
        if loader is None:
            loader = fallback_loader
            print_log('LSQCalibHook: no training dataloader; calibrating on the '
                      'evaluation data', logger='current', level=30)
        if loader is None:
            return False
        calibrate_lsq(model, loader, self.num_batches)
        return True

    def before_train(self, runner) -> None:
        if self._calibrate(runner) and self.save_calibrated:
            runner.save_checkpoint(runner.work_dir, 'calibrated.pth', save_optimizer=False,
                                   save_param_scheduler=False)
            print_log(f'LSQCalibHook: saved {runner.work_dir}/calibrated.pth',
                      logger='current')

    def before_val(self, runner) -> None:
        self._calibrate(runner, runner.val_dataloader)

    def before_test(self, runner) -> None:
        self._calibrate(runner, runner.test_dataloader)

    # -- freezing --------------------------------------------------------------------------
    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self.freeze_step_at is None or self._frozen is not None:
            return
        if runner.iter >= _resolve_iter(self.freeze_step_at, runner.max_iters):
            model = _unwrap(runner.model)
            wrapped = is_model_wrapper(runner.model)
            self._frozen = {}
            for _, q, _ in quantizers(model):
                self._frozen[q] = q.step.detach().clone()
                if not wrapped:
                    q.step.requires_grad_(False)
            print_log(f'LSQCalibHook: step sizes frozen at iteration {runner.iter}',
                      logger='current')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if self._frozen:
            with torch.no_grad():
                for q, v in self._frozen.items():
                    q.step.copy_(v)
        if self.log_interval and self.every_n_train_iters(runner, self.log_interval):
            for kind, (mean, lo, hi) in step_stats(runner.model).items():
                k = 'w' if kind == 'weight' else 'a'
                runner.message_hub.update_scalar(f'train/lsq_{k}_step_mean', mean)
                runner.message_hub.update_scalar(f'train/lsq_{k}_step_min', lo)
                runner.message_hub.update_scalar(f'train/lsq_{k}_step_max', hi)


# --------------------------------------------------------------------------------------
# BN statistics
# --------------------------------------------------------------------------------------
def reestimate_bn(model: nn.Module, dataloader, num_batches: int, mode: str | None = None,
                  logger='current') -> int:
    """:func:`repq_mm.calib.reestimate_bn` over ``num_batches`` batches of an OpenMMLab
    ``dataloader``, logged. Returns the number of batches run."""
    model = _unwrap(model)
    done, n_bn, n_blocks, stale = calib.reestimate_bn(
        model, _fresh_loader(dataloader), _forward_fn(model), num_batches, mode)
    if n_bn and num_batches > 0:
        msg = f'BN re-estimation: {n_bn} BN(s) in {n_blocks} rep block(s), {done} batch(es)'
        if stale:
            msg += f'; {stale} BN(s) saw no batch and keep their statistics'
        print_log(msg, logger=logger)
    return done


@HOOKS.register_module()
class BNEstHook(Hook):
    """``bn_mode`` schedule for rep blocks and BN re-estimation at the end of training.

    Args:
        phases: ``[(start, bn_mode), ...]``: from iteration ``start`` (int) or fraction of
            ``max_iters`` (float in [0, 1]) on, every rep block uses ``bn_mode``
            (``'est'``: RepQ-BNEst, ``'exact'``: RepQ-BN). E.g.
            ``[(0, 'est'), (0.9, 'exact')]``. ``None``: leave the modes as configured.
        reestimate_batches: after the last training iteration (before the final checkpoint
            and validation), re-estimate the running statistics of every rep block's BNs over
            this many training batches (:func:`reestimate_bn`); 0 / ``None``: no.
        reestimate_mode: statistics used for the re-estimation: ``None`` (each block's
            current ``bn_mode``, the one it was trained with), ``'exact'`` or ``'est'``.
    """

    priority = 'NORMAL'

    def __init__(self, phases=None, reestimate_batches: int | None = None,
                 reestimate_mode: str | None = None):
        if reestimate_mode not in (None,) + BN_MODES:
            raise ValueError(f'reestimate_mode must be None or one of {BN_MODES}, got '
                             f'{reestimate_mode!r}')
        self.reestimate_mode = reestimate_mode
        self.phases = []
        for p in phases or []:
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise ValueError(f'each phase must be (start, bn_mode), got {p!r}')
            start, mode = p
            _resolve_iter(start, 1)
            if mode not in BN_MODES:
                raise ValueError(f'phase {p!r}: bn_mode must be one of {BN_MODES}')
            self.phases.append((start, mode))
        if reestimate_batches is not None and (not isinstance(reestimate_batches, int)
                                               or reestimate_batches < 0):
            raise ValueError(f'reestimate_batches must be an int >= 0, got '
                             f'{reestimate_batches!r}')
        self.reestimate_batches = reestimate_batches or 0
        self._mode = None
        self._reestimated = False

    def mode_at(self, it: int, max_iters: int) -> str | None:
        mode = None
        for start, m in sorted(self.phases, key=lambda p: _resolve_iter(p[0], max_iters)):
            if it >= _resolve_iter(start, max_iters):
                mode = m
        return mode

    def before_train(self, runner) -> None:
        self._reestimated = False

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        mode = self.mode_at(runner.iter, runner.max_iters)
        if mode is not None and mode != self._mode:
            n = set_bn_mode(runner.model, mode)
            self._mode = mode
            print_log(f'BNEstHook: bn_mode={mode!r} on {n} rep block(s) from iteration '
                      f'{runner.iter}', logger='current')

    def _reestimate(self, runner) -> None:
        if self._reestimated or not self.reestimate_batches:
            return
        self._reestimated = True
        reestimate_bn(runner.model, runner.train_dataloader, self.reestimate_batches,
                      self.reestimate_mode)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if self.is_last_train_iter(runner):
            self._reestimate(runner)

    def after_train(self, runner) -> None:
        self._reestimate(runner)
