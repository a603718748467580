"""``torch.profiler`` attribution of one training step, eager or compiled.

Eager (:func:`attribute_profile`): ``RepBlock.merge`` and the LSQ quantizers' forwards are
wrapped in ``record_function`` so every top-level op (and, through autograd sequence
numbers, its backward) is attributed to the merge, to weight / activation fake-quant, or to
the network, per phase (zero_grad / forward / backward / optimizer).

Compiled (:func:`attribute_compiled_profile`): inside a compiled graph there is no module
structure left, so the buckets are the graph's kernels (inductor's fused kernels, named by
the ops they fuse; CPU kernels are recorded with ``cpp.enable_kernel_profile``) and its
extern calls (convolutions, matmuls, ATen fallbacks), per graph kind (forward + loss, its
AOT backward, the no-grad optimizer-step graph), plus the runtime around the graphs (guard
checks, graph wrappers, eager AccumulateGrad) and what the profiler saw no op for.
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch
from torch import nn

from repq_mm.quant import LSQQuantizer
from repq_mm.rep import RepBlock

from .measure import (Trainer, _sync, compile_step, est_refresh_period, loss_fn, timed,
                      warm_up_compiled)
from .variants import TRAIN_VARIANTS, make_variant


def _annotate(model: nn.Module) -> None:
    """Wrap ``RepBlock.merge`` and every LSQ quantizer's forward in ``record_function`` so
    the profile can attribute ops (and, through autograd sequence numbers, their backward)."""
    from torch.profiler import record_function

    def wrap(fn, label):
        @functools.wraps(fn)
        def inner(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return inner
    for m in model.modules():
        if isinstance(m, RepBlock):
            m.merge = wrap(m.merge, 'repq::merge')
        for attr, label in (('w_quant', 'lsq::weight'), ('a_quant', 'lsq::act')):
            q = getattr(m, attr, None)
            if isinstance(q, LSQQuantizer):
                q.forward = wrap(q.forward, label)


_PHASES = ('phase::zero_grad', 'phase::forward', 'phase::backward', 'phase::optimizer')
_CTX = ('repq::merge', 'lsq::weight', 'lsq::act')


def _chain(e):
    while e is not None:
        yield e
        e = e.cpu_parent


def _is_op(e) -> bool:
    return not (e.name.startswith(('phase::', 'repq::', 'lsq::', 'Optimizer.'))
                or getattr(e, 'is_user_annotation', False))


def _tag(e, batch: int) -> str | None:
    """Refines an op by its input shapes (profile with ``record_shapes``): a ``pad`` of an
    activation (the exact-stats FP branch conv pads its input) vs of a kernel (``pad_to``)."""
    if 'pad' not in e.name:
        return None
    shapes = getattr(e, 'input_shapes', None) or []
    shp = shapes[0] if shapes and isinstance(shapes[0], (list, tuple)) else []
    if len(shp) == 4 and shp[0] == batch and shp[2] * shp[3] > 1:
        return 'activation'
    return 'kernel' if shp else None


def _category(phase: str, ctx: str | None, name: str, tag: str | None = None) -> str:
    """Coarse bucket of a top-level op (forward) or autograd function (backward)."""
    n = name.lower().split('::')[-1]
    if phase == 'optimizer':
        return 'optimizer step'
    if phase == 'zero_grad':
        return 'zero_grad'
    if 'accumulategrad' in n:
        return 'AccumulateGrad (grad buffers)'
    conv = 'conv' in n
    if ctx == 'lsq::act':
        return 'fake-quant activations (Q_a)'
    if ctx == 'lsq::weight':
        return 'fake-quant weights (Q_w)'
    if ctx == 'repq::merge':
        if conv:
            return 'merge: FP branch convs (exact stats)'
        if 'pad' in n and tag == 'activation':
            return 'merge: F.pad of the input before FP branch conv (exact stats)'
        if 'var_mean' in n or 'varmean' in n:
            return 'merge: var_mean (BN batch stats)'
        return 'merge: kernel/bias algebra (fold, pad_to, sum, stats est., running stats)'
    if conv:
        return 'conv (network)'
    if 'pad' in n and tag == 'activation':
        return 'F.pad of the input before branch conv (Stage.run)'
    if 'batch_norm' in n or 'batchnorm' in n:
        return 'BatchNorm layers'
    if 'relu' in n or 'threshold' in n:
        return 'ReLU'
    if n in ('add', 'add_') or n.startswith('addbackward'):
        return 'add (branch sum)'
    if 'addmm' in n or n in ('linear', 'mm') or n.startswith(('mmbackward', 't_backward')):
        return 'linear head'
    return 'other ops (pool, loss, views, casts)'


def _dev_time(e) -> float:
    v = getattr(e, 'device_time_total', None)
    return float(v if v is not None else getattr(e, 'cuda_time_total', 0.0))


def _finish(buckets: dict, counts: dict, steps: int, category, wall_s: float,
            device_time: bool) -> tuple[list, dict, float]:
    items = [dict(phase=k[0], ctx=k[1], op=k[2] + (f' [{k[3]}]' if k[3] else ''), ms=v,
                  count=counts[k] // steps, category=category(*k))
             for k, v in buckets.items()]
    items.sort(key=lambda d: -d['ms'])
    cats: dict[str, float] = {}
    for it in items:
        cats[it['category']] = cats.get(it['category'], 0.0) + it['ms']
    wall_ms = wall_s * 1e3 / steps
    untracked = ('GPU idle (Python, launches, syncs)' if device_time else
                 'untracked (Python, module calls, dispatch outside ops)')
    cats[untracked] = wall_ms - sum(it['ms'] for it in items)
    return items, dict(sorted(cats.items(), key=lambda kv: -kv[1])), wall_ms


def attribute_profile(prof, wall_s: float, steps: int, batch: int = -1,
                      device_time: bool = False) -> dict:
    """Split the profiled steps into (phase, context, op) buckets of *inclusive* time of the
    top-level op / autograd function, so nothing is counted twice. Backward functions
    inherit the context of the forward op that created them (autograd sequence number).

    CPU: host time of the ops. CUDA (``device_time``): time of the kernels each op launched
    (the host side is asynchronous); the rest of the wall time is GPU idle time."""
    events = list(prof.events())
    seq_ctx = {}
    # Every op records the autograd sequence number current when it runs; an op that creates
    # no node (a view, an in-place op at the end of a quantizer's forward) shares it with the
    # next node. That node is created by the *last* op to record the number, so later
    # events overwrite earlier ones (in start order).
    for e in sorted(events, key=lambda e: e.time_range.start):
        if e.sequence_nr is None or e.sequence_nr < 0 or e.name.startswith('autograd::'):
            continue
        if not _is_op(e):
            continue
        names = [p.name for p in _chain(e)]
        if 'phase::forward' not in names:
            continue
        ctx = next((n for n in names if n in _CTX), None)
        seq_ctx[(e.thread, e.sequence_nr)] = (ctx, _tag(e, batch))
    buckets: dict[tuple, float] = {}
    counts: dict[tuple, int] = {}
    for e in events:
        if not _is_op(e):
            continue
        parents = list(_chain(e.cpu_parent))
        if any(_is_op(p) for p in parents):
            continue                                    # nested: counted in its parent
        pnames = [p.name for p in parents]
        phase = next((p.split('::')[1] for p in pnames if p in _PHASES), None)
        if phase is None:
            continue
        if e.name.startswith('autograd::engine::evaluate_function:'):
            fn = e.name.rsplit(':', 1)[-1].strip()
            ctx, tag = seq_ctx.get((e.fwd_thread, e.sequence_nr), (None, None))
            key = ('backward', ctx, fn, tag if 'pad' in fn.lower() else None)
        else:
            ctx = next((n for n in pnames if n in _CTX), None)
            key = (phase, ctx, e.name, _tag(e, batch))
        t = _dev_time(e) if device_time else e.cpu_time_total
        buckets[key] = buckets.get(key, 0.0) + t / 1e3 / steps
        counts[key] = counts.get(key, 0) + 1
    items, cats, wall_ms = _finish(buckets, counts, steps, _category, wall_s, device_time)
    phases = {}
    for e in events:
        if e.name in _PHASES:
            phases[e.name.split('::')[1]] = phases.get(e.name.split('::')[1], 0.0) + \
                e.cpu_time_total / 1e3 / steps
    return dict(wall_ms=wall_ms, phases_ms=phases, time='device' if device_time else 'cpu',
                categories_ms=cats, items=items)


# -- compiled ------------------------------------------------------------------------------
_GRAPH_CALL = '## Call CompiledFxGraph'
#: runtime events around compiled graphs (their self time is the runtime's overhead)
_WRAPPERS = ('Torch-Compiled Region', 'TorchDynamo Cache Lookup', 'Pregraph bytecode',
             'AOTDispatcher Runtime Wrapper', 'CompiledFunction', 'CompiledFunctionBackward',
             'autograd::engine::evaluate_function: CompiledFunctionBackward', _GRAPH_CALL)


_AOT = ('CompiledFunction', 'CompiledFunctionBackward')


def _is_wrapper(e) -> bool:
    return e.name.startswith(_WRAPPERS)


def _wrapper_label(name: str) -> str:
    if name.startswith(_GRAPH_CALL):
        return _GRAPH_CALL + ' ##'
    if name.startswith('Torch-Compiled Region'):
        return 'Torch-Compiled Region'
    if name.startswith('autograd::'):
        return 'autograd engine: ' + name.rsplit(':', 1)[-1].strip()
    return name


def _graph_kind(parents) -> str:
    names = [p.name for p in parents]
    if 'CompiledFunctionBackward' in names:
        return 'backward graph'
    if 'CompiledFunction' in names:
        return 'forward graph'
    return 'no-grad graph (optimizer step)'


def _compiled_category(phase: str, ctx: str | None, name: str, tag: str | None = None) -> str:
    n = name.lower()
    if phase == 'runtime':
        return 'runtime around the graphs (guards, graph wrappers)'
    if phase == 'eager':
        if 'accumulategrad' in n:
            return 'AccumulateGrad (grad buffers, eager)'
        return 'eager ops outside the graphs (zero_grad, autograd engine)'
    kind = phase.split(' ')[0]
    if phase.startswith('no-grad'):
        return 'optimizer step (compiled)'
    if 'cpp_fused' in n or 'triton_' in n or n.startswith('graph_'):
        return f'fused kernels, {kind} (inductor)'
    if 'conv' in n:
        return f'conv, {kind} (extern)'
    if 'mm' in n.split('::')[-1]:
        return f'matmul, {kind} (extern)'
    return f'other ops in the {kind} graph (ATen / fallbacks)'


def attribute_compiled_profile(prof, wall_s: float, steps: int,
                               device_time: bool = False) -> dict:
    """Buckets of a compiled step: every top-level op inside a compiled graph (an inductor
    kernel or extern call directly under the graph call; with ``aot_eager`` the ATen ops
    under ``CompiledFunction`` / ``CompiledFunctionBackward``), inclusive time, by graph
    kind; the self time of the runtime events around the graphs (host time only); top-level
    eager ops outside the graphs (with backend ``eager`` that is every op: dynamo runs its
    graphs op by op)."""
    buckets: dict[tuple, float] = {}
    counts: dict[tuple, int] = {}
    graph_ms: dict[str, float] = {}

    def add(key, t):
        buckets[key] = buckets.get(key, 0.0) + t / 1e3 / steps
        counts[key] = counts.get(key, 0) + 1
    for e in prof.events():
        parents = list(_chain(e.cpu_parent))
        if _is_wrapper(e):
            kind = e.name if e.name in _AOT else _graph_kind(parents) if (
                e.name.startswith(_GRAPH_CALL) and not any(p.name in _AOT for p in parents)
            ) else None
            if kind is not None:
                graph_ms[kind] = graph_ms.get(kind, 0.0) + e.cpu_time_total / 1e3 / steps
            if not device_time:
                add(('runtime', None, _wrapper_label(e.name), None), e.self_cpu_time_total)
            continue
        if not _is_op(e) or any(_is_op(p) and not _is_wrapper(p) for p in parents):
            continue                                    # an annotation, or nested
        t = _dev_time(e) if device_time else e.cpu_time_total
        if any(p.name.startswith(_GRAPH_CALL) or p.name in _AOT for p in parents):
            add((_graph_kind(parents), None, e.name, None), t)
        else:
            add(('eager', None, e.name, None), t)
    items, cats, wall_ms = _finish(buckets, counts, steps, _compiled_category, wall_s,
                                   device_time)
    return dict(wall_ms=wall_ms, phases_ms=graph_ms, time='device' if device_time else 'cpu',
                categories_ms=cats, items=items, compiled=True)


@contextlib.contextmanager
def _kernel_profile(device):
    """Inductor's CPU kernels record themselves in the profiler only when compiled with
    ``cpp.enable_kernel_profile``; the compile caches are bypassed meanwhile (a graph the
    timed run compiled would come back from them without the profiling calls)."""
    if device.type != 'cpu':
        yield
        return
    import torch._functorch.config as fcfg
    import torch._inductor.config as icfg
    with icfg.patch({'cpp.enable_kernel_profile': True, 'fx_graph_cache': False}), \
            fcfg.patch(enable_autograd_cache=False):
        yield


def profile_variant(name, base, qcfg, x, target, device, args, mm_model=None,
                    compiled: bool = False):
    """Profile ``args.profile_steps`` training steps of variant ``name`` (``compiled``: the
    step compiled as in the benchmark, with ``args.compile`` / ``args.compile_backend``);
    returns the profiler's table and the attribution."""
    from torch.profiler import ProfilerActivity, profile, record_function
    model = make_variant(name, base, qcfg, mm_model=mm_model).to(device)
    tr = Trainer(model, x, target, args.lr)
    if compiled:
        # a fresh model of the same structure passes the guards of the graphs the timed run
        # compiled (parameters are graph inputs), which were compiled without the kernel
        # profile: forget them so this step is compiled again, with it
        torch._dynamo.reset()
        step = compile_step(tr, args.compile, args.compile_backend)
        with _kernel_profile(device):
            warm_up_compiled(step, device, max(args.warmup, est_refresh_period(model) + 1),
                             max(args.warmup, est_refresh_period(model) + 1) + 20)
    else:
        _annotate(model)

        def step():
            with record_function('phase::zero_grad'):
                tr.opt.zero_grad(set_to_none=True)
            with record_function('phase::forward'):
                loss = loss_fn(model(x), target, tr.target_max)
            with record_function('phase::backward'):
                loss.backward()
            with record_function('phase::optimizer'):
                tr.opt.step()
        for _ in range(max(2, args.warmup)):
            step()
    # an unprofiled reference time for the same step
    ref = [timed(step, device) for _ in range(3)]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    _sync(device)
    with profile(activities=acts, record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(args.profile_steps):
            step()
        _sync(device)
        wall = time.perf_counter() - t0
    ka = prof.key_averages(group_by_input_shape=args.profile_shapes)
    if device.type == 'cuda':
        try:
            table = ka.table(sort_by='self_device_time_total', row_limit=args.profile_rows)
        except (AttributeError, KeyError):
            table = ka.table(sort_by='self_cuda_time_total', row_limit=args.profile_rows)
    else:
        table = ka.table(sort_by='self_cpu_time_total', row_limit=args.profile_rows)
    if compiled:
        att = attribute_compiled_profile(prof, wall, args.profile_steps,
                                         device_time=device.type == 'cuda')
    else:
        att = attribute_profile(prof, wall, args.profile_steps, x.shape[0],
                                device_time=device.type == 'cuda')
    att['unprofiled_step_ms'] = sorted(ref)[1] * 1e3
    return table, att


def format_attribution(name: str, att: dict, top: int = 25) -> str:
    compiled = att.get('compiled', False)
    title = f'{name} ({TRAIN_VARIANTS.get(name, name)})' + (', compiled' if compiled else '')
    phases = ('compiled graph calls (host, inclusive): ' if compiled else 'phases (host): ')
    lines = [f'### Profile attribution: {title}', '',
             f'profiled step wall {att["wall_ms"]:.1f} ms (unprofiled '
             f'{att["unprofiled_step_ms"]:.1f} ms; the profiler adds per-op overhead); buckets: '
             f'inclusive {att["time"]} time of top-level ops / '
             + ('graph kernels and extern calls' if compiled else 'autograd functions')
             + f'; {phases}' +
             ', '.join(f'{k} {v:.1f} ms' for k, v in att['phases_ms'].items()), '',
             '| category | ms / step | % of profiled wall |', '|---|---:|---:|']
    for k, v in att['categories_ms'].items():
        lines.append(f'| {k} | {v:.2f} | {100 * v / att["wall_ms"]:.1f} |')
    lines += ['', f'Top {top} (phase, context, op or autograd function), inclusive time:', '',
              '| phase | context | op | calls | ms / step | category |',
              '|---|---|---|---:|---:|---|']
    for it in att['items'][:top]:
        lines.append(f'| {it["phase"]} | {it["ctx"] or "-"} | `{it["op"]}` | {it["count"]} | '
                     f'{it["ms"]:.2f} | {it["category"]} |')
    return '\n'.join(lines)
