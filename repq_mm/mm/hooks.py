"""mmengine hooks for RepQ training: LSQ calibration and BN statistics management.

* :class:`LSQCalibHook`: LSQ step-size initialisation from ``num_batches`` training batches
  (before training; before val / test when quantizers are still uninitialised, e.g. PTQ),
  optional step-size freezing, step-size statistics in the log.
* :class:`BNEstHook`: ``bn_mode`` schedule (``'est'`` / ``'exact'``) over training and a
  BN re-estimation of every rep block at the end of training (:func:`reestimate_bn`).
"""
from __future__ import annotations

import copy
import math

import torch
from mmengine.dist import all_reduce, get_world_size
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn
from torch.utils.data import DataLoader

from ..quant import BN_MODES, LSQQuantizer, quant_range
from ..quant.lsq import mse_step
from ..rep import RepBlock

#: activation values per batch kept for the MSE step search (init='mse')
MSE_SAMPLES = 1 << 16


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def clear_weight_caches(model: nn.Module) -> None:
    """Drop the eval-mode merged / quantized weight caches (``_EvalWeightCache``)."""
    for m in model.modules():
        if '_wcache' in m.__dict__:
            m.__dict__['_wcache'] = None


def quantizers(model: nn.Module) -> list[tuple[str, LSQQuantizer, str]]:
    """``(name, quantizer, kind)`` for every LSQ quantizer, ``kind`` = ``'weight'`` (an
    attribute named ``w_quant``) or ``'act'``; each quantizer once, in module order."""
    out, seen = [], set()
    for name, m in model.named_modules():
        if isinstance(m, LSQQuantizer) and id(m) not in seen:
            seen.add(id(m))
            kind = 'weight' if name.rsplit('.', 1)[-1] == 'w_quant' else 'act'
            out.append((name, m, kind))
    return out


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


def _run_batches(model: nn.Module, dataloader, num_batches: int) -> int:
    """Run up to ``num_batches`` batches through ``model`` (``mode='tensor'``, batches
    prepared by ``model.data_preprocessor`` without training-time batch augmentation)."""
    done = 0
    if num_batches <= 0:
        return 0
    for batch in _fresh_loader(dataloader):
        data = model.data_preprocessor(batch, False)
        if isinstance(data, dict):
            model(**data, mode='tensor')
        else:
            model(*data, mode='tensor')
        done += 1
        if done >= num_batches:
            break
    return done


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
@torch.no_grad()
def calibrate_lsq(model: nn.Module, dataloader, num_batches: int = 1,
                  logger='current') -> dict:
    """LSQ initialisation of every uninitialised quantizer of ``model``.

    Runs ``num_batches`` batches in ``eval()`` + ``no_grad`` with **all** quantizers
    disabled, so every layer sees full-precision inputs. Forward pre-hooks on the
    quantizers record

    * weight quantizers: the tensor they are called with (the weight, or the merged kernel
      of a rep block with running statistics), initialised from it at once
      (``s0 = 2 mean|w| / sqrt(Q_P)``, :meth:`LSQQuantizer.initialize`);
    * activation quantizers: ``mean|x|`` per batch and whether ``x`` has negative values;
      after the last batch ``s0 = 2 mean_b(mean|x|) / sqrt(Q_P)`` with the signedness
      (``act_signed='auto'``) decided by any negative value.

    Statistics are all-reduced over ranks (every rank gets the same steps). Quantizers that
    are already initialised (resumed or loaded checkpoints) are left alone. Returns a summary
    ``{'weight': n, 'act': n, 'batches': n, 'missed': [names]}``.
    """
    model = _unwrap(model)
    qs = quantizers(model)
    todo = [(n, q, k) for n, q, k in qs if not q.is_initialized]
    summary = dict(weight=0, act=0, batches=0, missed=[])
    if not todo:
        return summary
    # per quantizer: sum, count, neg, per-channel sum, then MSE samples (init='mse')
    acc = {id(q): [0.0, 0, False, None] for _, q, _ in todo}

    def weight_hook(q, args):
        if not q.is_initialized:
            q.initialize(args[0])

    gen = torch.Generator().manual_seed(0)

    names = {id(q): n for n, q, _ in todo}

    def act_hook(q, args):
        x = args[0].detach().float()
        a = acc[id(q)]
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f'LSQ calibration: non-finite values (nan/inf) in the '
                                     f'input of {names[id(q)]} (batch {a[1] + 1})')
        if q.init_method == 'mse':   # keep a fixed-size random sample for the MSE search
            flat = x.reshape(-1)
            if flat.numel() > MSE_SAMPLES:
                idx = torch.randint(flat.numel(), (MSE_SAMPLES,), generator=gen)
                flat = flat[idx.to(flat.device)]
            a.append(flat.cpu())
        if q.per_channel:
            dims = [d for d in range(x.dim()) if d != q.ch_axis % x.dim()]
            m = x.abs().mean(dim=dims)
            a[3] = m if a[3] is None else a[3] + m
        else:
            a[0] += float(x.abs().mean())
        a[1] += 1
        a[2] = a[2] or bool(x.min() < 0)

    handles, enabled = [], {}
    modes = {m: m.training for m in model.modules()}
    try:
        for _, q, _ in qs:
            enabled[q] = q.enabled
            q.enabled = False
        for _, q, kind in todo:
            handles.append(q.register_forward_pre_hook(weight_hook if kind == 'weight'
                                                       else act_hook))
        clear_weight_caches(model)
        model.eval()
        summary['batches'] = _run_batches(model, dataloader, num_batches)
    finally:
        for h in handles:
            h.remove()
        for q, e in enabled.items():
            q.enabled = e
        for m, t in modes.items():
            m.training = t
    world = get_world_size()
    acts = [(n, q) for n, q, k in todo if k == 'act']
    if acts:
        stats = torch.tensor([[acc[id(q)][0], acc[id(q)][1], float(acc[id(q)][2])]
                              for _, q in acts], dtype=torch.float64)
        dev = next((p.device for p in model.parameters()), torch.device('cpu'))
        if world > 1:
            s = stats.to(dev)
            sums = s[:, :2].clone()
            neg = s[:, 2].clone()
            all_reduce(sums, op='sum')
            all_reduce(neg, op='max')
            stats = torch.cat([sums, neg[:, None]], 1).cpu()
        for i, (name, q) in enumerate(acts):
            total, count, neg = stats[i].tolist()
            if count == 0:
                summary['missed'].append(name)
                continue
            if q.signed_mode == 'auto':
                q.signed.fill_(int(neg > 0))
                q._signed_cache = None
            _, qp = quant_range(q.bits, q.is_signed, q.symmetric)
            if q.init_method == 'mse' and not q.per_channel:
                qn, _ = quant_range(q.bits, q.is_signed, q.symmetric)
                s0 = mse_step(torch.cat(acc[id(q)][4:]), qn, qp).to(q.step)
                if world > 1:
                    all_reduce(s0, op='mean')
                s0 = s0.clamp(min=1e-6)
            else:
                if q.per_channel:
                    m = acc[id(q)][3]
                    m = m.to(q.step.device) if m is not None else None
                    if world > 1:
                        m = m if m is not None else torch.zeros_like(q.step)
                        all_reduce(m, op='sum')
                    mean_abs = m / count
                else:
                    mean_abs = torch.full((1,), total / count)
                s0 = (2 * mean_abs / math.sqrt(qp)).clamp(min=1e-6).to(q.step)
            if q.step.shape != s0.shape:
                q.step.data = s0          # keep the Parameter object the optimizer holds
            else:
                q.step.copy_(s0)
            q.initialized.fill_(1)
            q._init_cache = True
            summary['act'] += 1
    for name, q, kind in todo:
        if kind == 'weight':
            if q.is_initialized:
                summary['weight'] += 1
            else:
                summary['missed'].append(name)
    clear_weight_caches(model)
    msg = (f'LSQ calibration on {summary["batches"]} batch(es): initialised '
           f'{summary["weight"]} weight and {summary["act"]} activation quantizer(s)')
    if summary['missed']:
        msg += (f'; {len(summary["missed"])} never ran and stay uninitialised (they '
                f'initialise at their first call): {summary["missed"][:8]}')
    print_log(msg, logger=logger)
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
def rep_blocks(model: nn.Module) -> list[RepBlock]:
    seen, out = set(), []
    for m in _unwrap(model).modules():
        if isinstance(m, RepBlock) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def set_bn_mode(model: nn.Module, mode: str) -> int:
    """Set ``bn_mode`` (``'exact'`` / ``'est'``) on every rep block; returns their count."""
    if mode not in BN_MODES:
        raise ValueError(f'bn_mode must be one of {BN_MODES}, got {mode!r}')
    blocks = rep_blocks(model)
    for blk in blocks:
        blk.bn_mode = mode
    return len(blocks)


@torch.no_grad()
def reestimate_bn(model: nn.Module, dataloader, num_batches: int, mode: str | None = None,
                  logger='current') -> int:
    """Re-estimate the running statistics of every BN inside a rep block.

    ``mode``: the statistics to average: ``None`` (default) keeps every block's own
    ``bn_mode``, i.e. the statistics the network was trained to be normalised with (a model
    trained with BNEst keeps estimated statistics: exact ones would change the deployed
    normalisation by up to the estimation error); ``'exact'`` / ``'est'`` force one.

    Resets them, sets ``momentum=None`` (cumulative average), runs ``num_batches`` batches
    with the rep blocks in train mode and that ``bn_mode`` (batch statistics;
    everything else in eval mode, quantizers as they are) under ``torch.no_grad()``, then
    averages the statistics over ranks and restores momentum, ``bn_mode`` and train/eval
    modes. Parameters (weights, LSQ step sizes) do not change. A BN that saw no batch keeps
    its old statistics. Returns the number of batches run.
    """
    model = _unwrap(model)
    blocks = rep_blocks(model)
    bns, seen = [], set()
    for blk in blocks:
        for bn in blk.bns():
            if id(bn) not in seen and bn.track_running_stats and bn.running_mean is not None:
                seen.add(id(bn))
                bns.append(bn)
    if not bns or num_batches <= 0:
        return 0
    modes = {m: m.training for m in model.modules()}
    saved = [(bn.momentum, bn.running_mean.clone(), bn.running_var.clone(),
              bn.num_batches_tracked.clone()) for bn in bns]
    bn_modes = [blk.bn_mode for blk in blocks]
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.eval()
        for blk in blocks:
            blk.train()
            if mode is not None:
                blk.bn_mode = mode
        clear_weight_caches(model)
        done = _run_batches(model, dataloader, num_batches)
    except BaseException:
        for bn, (mom, rm, rv, nb) in zip(bns, saved):
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
            bn.num_batches_tracked.copy_(nb)
        raise
    finally:
        for bn, state in zip(bns, saved):
            bn.momentum = state[0]
        for blk, mode in zip(blocks, bn_modes):
            blk.bn_mode = mode
        for m, t in modes.items():
            m.training = t
        clear_weight_caches(model)
    stale = 0
    seen_local = torch.tensor([float(bn.num_batches_tracked > 0) for bn in bns])
    if get_world_size() > 1:
        dev = bns[0].running_mean.device
        seen_all = seen_local.to(dev)
        all_reduce(seen_all, op='min')
        seen_local = seen_all.cpu()
        for bn in bns:
            all_reduce(bn.running_mean, op='mean')
            all_reduce(bn.running_var, op='mean')
    for bn, (mom, rm, rv, nb), ok in zip(bns, saved, seen_local.tolist()):
        if not ok:
            stale += 1
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
            bn.num_batches_tracked.copy_(nb)
    msg = f'BN re-estimation: {len(bns)} BN(s) in {len(blocks)} rep block(s), {done} batch(es)'
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
