"""LSQ calibration and BN re-estimation as plain functions (torch only).

The OpenMMLab hooks (:mod:`repq_mm.mm.hooks`) are thin wrappers that feed these with the
Runner's data; any training loop can call them directly with its own batches and forward
function.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from repq_mm import convert_to_repq
    >>> from repq_mm.rep import RepVGGBlock
    >>> net = convert_to_repq(nn.Sequential(RepVGGBlock(3, 8, act=nn.ReLU())), a_bits=4)
    >>> batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    >>> calibrate_lsq(net, batches, net, num_batches=2)['act']
    1
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .quant import BN_MODES, LSQQuantizer
from .quant.layers import clear_weight_caches
from .rep import RepBlock

__all__ = ['quantizers', 'rep_blocks', 'calibrate_lsq', 'reestimate_bn', 'set_bn_mode',
           'run_batches', 'MSE_SAMPLES']

#: activation values per batch kept for the MSE step search (init='mse')
MSE_SAMPLES = 1 << 16


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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


def rep_blocks(model: nn.Module) -> list[RepBlock]:
    """Every :class:`RepBlock` of ``model`` once, in module order."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, RepBlock) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def run_batches(forward: Callable[[Any], Any], batches: Iterable, num_batches: int) -> int:
    """Call ``forward(batch)`` on up to ``num_batches`` batches; returns how many ran."""
    done = 0
    if num_batches <= 0:
        return 0
    for batch in batches:
        forward(batch)
        done += 1
        if done >= num_batches:
            break
    return done


@torch.no_grad()
def calibrate_lsq(model: nn.Module, batches: Iterable, forward: Callable[[Any], Any],
                  num_batches: int = 1) -> dict:
    """LSQ initialisation of every uninitialised quantizer of ``model``.

    Runs ``forward(batch)`` on ``num_batches`` of ``batches`` with ``model`` in ``eval()``
    and **all** quantizers disabled, so every layer sees full-precision inputs. Forward
    pre-hooks on the quantizers

    * initialise weight quantizers at once from the tensor they are called with (the weight,
      or a rep block's merged kernel with running statistics,
      :meth:`~repq_mm.quant.LSQQuantizer.initialize`);
    * let activation quantizers :meth:`~repq_mm.quant.LSQQuantizer.observe` their input;
      after the last batch each one :meth:`~repq_mm.quant.LSQQuantizer.finalize` s
      (``s0 = 2 mean_b(mean|x|) / sqrt(Q_P)``, or the MSE step on a sample; signedness for
      ``act_signed='auto'`` from any negative value).

    Statistics are combined over ranks (every rank gets the same steps). Quantizers that
    are already initialised (resumed or loaded checkpoints) are left alone; train/eval modes
    and ``enabled`` flags are restored. Returns ``{'weight': n, 'act': n, 'batches': n,
    'missed': [names of quantizers that never ran]}``.
    """
    qs = quantizers(model)
    todo = [(n, q, k) for n, q, k in qs if not q.is_initialized]
    summary = dict(weight=0, act=0, batches=0, missed=[])
    if not todo:
        return summary
    gen = torch.Generator().manual_seed(0)

    def weight_hook(q, args):
        if not q.is_initialized:
            q.initialize(args[0])

    names = {id(q): n for n, q, _ in todo}

    def act_hook(q, args):
        q.observe(args[0], generator=gen, max_samples=MSE_SAMPLES, name=names[id(q)])

    handles, enabled = [], {}
    modes = {m: m.training for m in model.modules()}
    try:
        for _, q, _ in qs:
            enabled[q] = q.enabled
            q.enabled = False
        for _, q, kind in todo:
            q.start_calibration()
            handles.append(q.register_forward_pre_hook(weight_hook if kind == 'weight'
                                                       else act_hook))
        clear_weight_caches(model)
        model.eval()
        summary['batches'] = run_batches(forward, batches, num_batches)
    finally:
        for h in handles:
            h.remove()
        for q, e in enabled.items():
            q.enabled = e
        for m, t in modes.items():
            m.training = t
    for name, q, kind in todo:
        if kind == 'act':
            done = q.finalize()
        else:
            done = q.is_initialized
        summary[kind] += int(done)
        if not done:
            summary['missed'].append(name)
    clear_weight_caches(model)
    return summary


def calibration_message(summary: dict) -> str:
    """One log line for a :func:`calibrate_lsq` summary."""
    msg = (f'LSQ calibration on {summary["batches"]} batch(es): initialised '
           f'{summary["weight"]} weight and {summary["act"]} activation quantizer(s)')
    if summary['missed']:
        msg += (f'; {len(summary["missed"])} never ran and stay uninitialised (they '
                f'initialise at their first call): {summary["missed"][:8]}')
    return msg


def set_bn_mode(model: nn.Module, mode: str) -> int:
    """Set ``bn_mode`` (``'exact'`` / ``'est'``) on every rep block; returns their count."""
    if mode not in BN_MODES:
        raise ValueError(f'bn_mode must be one of {BN_MODES}, got {mode!r}')
    blocks = rep_blocks(model)
    for blk in blocks:
        blk.bn_mode = mode
    return len(blocks)


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable, forward: Callable[[Any], Any],
                  num_batches: int, mode: str | None = None) -> tuple[int, int, int, int]:
    """Re-estimate the running statistics of every BN inside a rep block.

    ``mode``: the statistics to average: ``None`` (default) keeps every block's own
    ``bn_mode``, i.e. the statistics the network was trained to be normalised with (a model
    trained with BNEst keeps estimated statistics: exact ones would change the deployed
    normalisation by up to the estimation error); ``'exact'`` / ``'est'`` force one.

    Resets them, sets ``momentum=None`` (cumulative average), runs ``forward`` on
    ``num_batches`` batches with the rep blocks in train mode and that ``bn_mode`` (batch
    statistics; everything else in eval mode, quantizers as they are) under
    ``torch.no_grad()``, then averages the statistics over ranks and restores momentum,
    ``bn_mode`` and train/eval modes. Parameters (weights, LSQ step sizes) do not change. A
    BN that saw no batch (on some rank) keeps its old statistics. Returns ``(batches run,
    BNs, rep blocks, BNs that kept their statistics)``.
    """
    if mode is not None and mode not in BN_MODES:
        raise ValueError(f'mode must be None or one of {BN_MODES}, got {mode!r}')
    blocks = rep_blocks(model)
    bns, seen = [], set()
    for blk in blocks:
        for bn in blk.bns():
            if id(bn) not in seen and bn.track_running_stats and bn.running_mean is not None:
                seen.add(id(bn))
                bns.append(bn)
    if not bns or num_batches <= 0:
        return 0, len(bns), len(blocks), 0
    modes = {m: m.training for m in model.modules()}
    saved = [(bn.momentum, bn.running_mean.clone(), bn.running_var.clone(),
              bn.num_batches_tracked.clone()) for bn in bns]
    bn_modes = [blk.bn_mode for blk in blocks]

    def restore(bn, state):
        bn.running_mean.copy_(state[1])
        bn.running_var.copy_(state[2])
        bn.num_batches_tracked.copy_(state[3])

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
        done = run_batches(forward, batches, num_batches)
    except BaseException:
        for bn, state in zip(bns, saved):
            restore(bn, state)
        raise
    finally:
        for bn, state in zip(bns, saved):
            bn.momentum = state[0]
        for blk, m in zip(blocks, bn_modes):
            blk.bn_mode = m
        for m, t in modes.items():
            m.training = t
        clear_weight_caches(model)
    seen_local = torch.tensor([float(bn.num_batches_tracked > 0) for bn in bns])
    world = _world()
    if world > 1:
        dev = bns[0].running_mean.device
        seen_all = seen_local.to(dev)
        dist.all_reduce(seen_all, op=dist.ReduceOp.MIN)
        seen_local = seen_all.cpu()
        for bn in bns:
            for buf in (bn.running_mean, bn.running_var):
                dist.all_reduce(buf)
                buf.div_(world)
    stale = 0
    for bn, state, ok in zip(bns, saved, seen_local.tolist()):
        if not ok:
            stale += 1
            restore(bn, state)
    return done, len(bns), len(blocks), stale
