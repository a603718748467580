"""The benchmark's sections, each filling its part of the results dict ``res``: training
(eager, and with ``args.compile`` compiled side by side), inference, merge time, profiles.

``args`` is the namespace of ``benchmark.py``'s command line; ``ctx`` a :class:`Context`
(the model, the batch, the quantizer settings).
"""
from __future__ import annotations

import copy
import functools
import gc
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from repq_mm import merge_model
from repq_mm.io import flatten_tensors
from repq_mm.quant import QConfig

from .measure import (Trainer, compile_step, cuda_step_memory,
                      dynamo_counts, est_refresh_period, interleaved, run_memory_children,
                      summarize, warm_up_compiled)
from .profile import format_attribution, profile_variant
from .report import train_targets
from .variants import make_variant, rep_blocks

#: key suffix of a compiled step in the interleaved timing
COMPILED = '@compiled'


@dataclass
class Context:
    base: nn.Module
    qcfg: QConfig
    x: torch.Tensor
    target: torch.Tensor
    device: torch.device
    mm_model: nn.Module | None = None


def _trainer(ctx: Context, v: str, lr: float) -> Trainer:
    model = make_variant(v, ctx.base, ctx.qcfg, mm_model=ctx.mm_model).to(ctx.device)
    return Trainer(model, ctx.x, ctx.target, lr)


def _compile_trainer(ctx: Context, v: str, args, log):
    """A fresh trainer of ``v`` with its step compiled and warmed up until the times
    settle (covering one ``est_refresh`` period, where the refresh step is a second graph)."""
    tr = _trainer(ctx, v, args.lr)
    log(f'compiling {v} (mode {args.compile}, backend {args.compile_backend})')
    fn = compile_step(tr, args.compile, args.compile_backend)
    min_calls = max(args.warmup, est_refresh_period(tr.model) + 1)
    info = warm_up_compiled(fn, ctx.device, min_calls, min_calls + 20)
    log(f'  {v}: first call {info["first_call_s"]:.1f} s, compile {info["compile_s"]:.1f} s, '
        f'{len(info["calls_s"])} warm-up calls, {info["graphs"]} graph(s), '
        f'{info["graph_breaks"]} graph break(s)' + ('' if info['settled'] else
                                                    ', times did not settle'))
    return tr, fn, info


def train(args, argv: list[str], script: str, ctx: Context, res: dict, log) -> None:
    """``res['train']`` (eager), ``res['train_compiled']`` (with ``args.compile``),
    ``res['targets']``; every step timed in the same interleaved rounds."""
    log('building training variants: ' + ', '.join(args.variants))
    trainers = {v: _trainer(ctx, v, args.lr) for v in args.variants}
    fns = {v: t.step for v, t in trainers.items()}
    compiled = {}
    if args.compile:
        for v in args.variants:
            compiled[v] = _compile_trainer(ctx, v, args, log)
            fns[v + COMPILED] = compiled[v][1]
    graphs_before = dynamo_counts()[0] if compiled else 0
    log('timing training steps (interleaved)')
    times = interleaved(fns, ctx.device, args.warmup, args.repeats, args.inner, log)
    res['train'] = {v: summarize(times[v]) for v in trainers}
    for v, t in trainers.items():
        res['train'][v]['final_loss'] = float(t.loss)
    if compiled:
        res['train_compiled'] = {}
        for v, (tr, _, info) in compiled.items():
            res['train_compiled'][v] = dict(summarize(times[v + COMPILED]),
                                            final_loss=float(tr.loss), compile=info)
        if dynamo_counts()[0] != graphs_before:
            res['notes'].append('a compiled step recompiled during the timed rounds '
                                f'({dynamo_counts()[0] - graphs_before} new graph(s))')
    for key in ('train', 'train_compiled'):
        for v, r in res.get(key, {}).items():
            if not math.isfinite(r['final_loss']):
                res['notes'].append(f'{v}{"" if key == "train" else " (compiled)"}: '
                                    'non-finite loss after the timed steps')
    if args.memory == 'auto':
        log('measuring step memory')
        if ctx.device.type == 'cuda':
            mem = {v: cuda_step_memory(t, ctx.device) for v, t in trainers.items()}
            for v, (tr, fn, _) in compiled.items():
                res['train_compiled'][v]['mem'] = cuda_step_memory(tr, ctx.device, fn)
        else:
            mem = run_memory_children(script, argv, list(trainers), log)
            if compiled:
                res['notes'].append('step memory of the compiled steps: CUDA only (on the '
                                    'CPU each variant would compile again in its own process)')
        for v, rec in mem.items():
            res['train'][v]['mem'] = rec
    del trainers, compiled, fns
    gc.collect()
    res['targets'] = train_targets(res)


def infer(args, ctx: Context, res: dict, log) -> None:
    """``res['infer']``: eval latency / throughput of the train form, the deployed net, the
    RepQ net in eval and the deployed net with fake quantizers (+ mmpretrain's deploy)."""
    log('building inference variants')
    base, x = ctx.base, ctx.x
    fp = copy.deepcopy(base).eval()
    models = {'fp_train_form': fp,
              'fp_deploy': merge_model(copy.deepcopy(base), inplace=True).eval()}
    rq = make_variant('repq_bn', base, ctx.qcfg)
    with torch.no_grad():
        rq(x)                                   # initialise the quantizers
    rq.eval()
    models['repq_eval'] = rq
    models['q_deploy'] = merge_model(copy.deepcopy(rq), inplace=True).eval()
    if ctx.mm_model is not None:
        mmd = copy.deepcopy(ctx.mm_model).eval()
        mmd.model.switch_to_deploy()
        models['mm_deploy'] = mmd.eval()

    def run(m):
        with torch.no_grad():
            m(x)
    log('timing inference (interleaved)')
    times = interleaved({k: functools.partial(run, m) for k, m in models.items()},
                        ctx.device, args.warmup, args.repeats, args.inner, log)
    res['infer'] = {}
    for k, ts in times.items():
        s = summarize(ts)
        s['throughput'] = args.batch_size / s['median']
        res['infer'][k] = s
    if 'mm_deploy' in res['infer']:
        val = res['infer']['fp_deploy']['median'] / res['infer']['mm_deploy']['median']
        res.setdefault('targets', []).append(dict(
            name='FP deploy latency / mmpretrain deploy latency', value=val,
            limit=1.05, met=val <= 1.05))
    with torch.no_grad():
        a = flatten_tensors(models['fp_train_form'](x))
        b = flatten_tensors(models['fp_deploy'](x))
        res['infer']['fp_deploy']['max_rel_err_vs_train_form'] = max(
            float((u - v).abs().max() / u.abs().max().clamp(min=1e-12))
            for u, v in zip(a, b))


def merge(args, ctx: Context, res: dict, log) -> None:
    """``res['merge']``: ``to_deploy()`` over all blocks (FP and quantized), and
    ``merge_model`` with its deep copy."""
    fp = copy.deepcopy(ctx.base).eval()
    rq = make_variant('repq_bn', ctx.base, ctx.qcfg)
    with torch.no_grad():
        rq(ctx.x)
    rq.eval()

    def deploy_all(m):
        with torch.no_grad():
            for blk in rep_blocks(m):
                blk.to_deploy()
    ops = {'to_deploy_fp': functools.partial(deploy_all, fp),
           'merge_model_fp': lambda: merge_model(copy.deepcopy(fp), inplace=True),
           'to_deploy_repq': functools.partial(deploy_all, rq)}
    if not rep_blocks(fp):
        ops = {}
    log('timing merge')
    times = interleaved(ops, ctx.device, args.warmup, args.repeats, 1, None)
    res['merge'] = {k: summarize(ts) for k, ts in times.items()}


def profile(args, ctx: Context, res: dict, out_dir: Path, log) -> None:
    """``res['profile']`` (and ``res['profile_compiled']`` with ``args.compile``) for every
    ``args.profile_variants``; each attribution also written to ``profile_<v>[_compiled].txt``."""
    res['profile'] = {}
    if args.compile:
        res['profile_compiled'] = {}
    for v in args.profile_variants:
        if v.startswith('mm_') and ctx.mm_model is None:
            log(f'profile {v}: mmpretrain reference unavailable; skipped')
            continue
        for compiled in (False, True) if args.compile else (False,):
            log(f'profiling one training step of {v}' + (' (compiled)' if compiled else ''))
            table, att = profile_variant(v, ctx.base, ctx.qcfg, ctx.x, ctx.target, ctx.device,
                                         args, ctx.mm_model, compiled=compiled)
            res['profile_compiled' if compiled else 'profile'][v] = att
            tag = ' (compiled)' if compiled else ''
            text = f'## torch.profiler: {v}{tag}\n\n{table}\n\n{format_attribution(v, att)}\n'
            log(text)
            (out_dir / f'profile_{v}{"_compiled" if compiled else ""}.txt').write_text(text)
