"""Timing (interleaved), ``torch.compile`` of the training step, step memory, the machine.

:class:`Trainer` is one model, its SGD optimizer and a fixed batch; ``Trainer.step`` is one
training step (zero_grad, forward, loss, backward, SGD step). :func:`compile_step` compiles
that whole step with ``torch.compile``, which is what mmengine's ``Runner`` does for
``compile=True``: it compiles ``model.train_step`` (data preprocessor, forward, loss and
``optim_wrapper.update_params``: backward, optimizer step, zero_grad). Dynamo splits the step
where torch itself does: ``zero_grad`` runs eagerly, forward + loss is one graph whose
backward AOTAutograd compiles ahead of time (run by the autograd engine at
``loss.backward()``), and ``Optimizer.step`` is its own graph (torch puts a graph break
around it so the update is in place).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    >>> tr = Trainer(net, torch.randn(2, 3, 8, 8), torch.tensor([1, 3]), lr=0.01)
    >>> times = interleaved({'a': tr.step}, torch.device('cpu'), warmup=1, repeats=3)
    >>> len(times['a'])
    3
    >>> summarize(times['a'])['n']
    3
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from repq_mm.rep import RepBlock

from .variants import ROOT, mmpretrain_available

MIB = 1024.0 ** 2
#: ``--compile`` modes (``torch.compile(mode=...)``)
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


# ----------------------------------------------------------------------------------------
# the training step
# ----------------------------------------------------------------------------------------
def loss_fn(out, target, target_max: int | None = None):
    """Cross entropy for class logits (a 2-D output wide enough for ``target``), else the
    smooth-L1 (Huber) distance of the output to zero, whose gradient is bounded (the mean
    square of raw detector outputs made the repeated steps on one batch diverge); summed
    over a tuple / list of outputs (detector heads). ``target_max``: ``int(target.max())``
    computed once (``None``: here, a host sync)."""
    if isinstance(out, (tuple, list)):
        return sum(loss_fn(o, target, target_max) for o in out)
    if out.dim() == 2 and target is not None:
        if target_max is None:
            target_max = int(target.max())
        if out.shape[1] > target_max:
            return F.cross_entropy(out, target)
    out = out.float()
    return F.smooth_l1_loss(out, torch.zeros_like(out))


class Trainer:
    """One model, its SGD optimizer and a fixed batch; ``step()`` = one training step."""

    def __init__(self, model, x, target, lr):
        self.model, self.x, self.target = model, x, target
        self.target_max = None if target is None else int(target.max())
        with torch.no_grad():           # initialises the LSQ step sizes (first batch)
            model(x)
        # after the init forward: per-channel step sizes are created lazily
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        self.loss = float('nan')

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(self.x), self.target, self.target_max)
        loss.backward()
        self.opt.step()
        self.loss = loss.detach()


def compile_step(trainer: Trainer, mode: str = 'default', backend: str = 'inductor'):
    """``torch.compile`` of ``trainer.step`` (the whole step, as mmengine compiles
    ``model.train_step``); compiles at the first call."""
    return torch.compile(trainer.step, mode=mode, backend=backend)


@contextlib.contextmanager
def recompile_limit(n: int):
    """Dynamo caches compiled code per code object: every variant's ``Trainer.step`` is
    one more entry on the same code, so allow ``n`` (torch's default is 8, past which
    dynamo silently falls back to eager)."""
    import torch._dynamo.config as dcfg
    name = 'recompile_limit' if hasattr(dcfg, 'recompile_limit') else 'cache_size_limit'
    with dcfg.patch(**{name: max(n, getattr(dcfg, name))}):
        yield


def dynamo_counts() -> tuple[int, int]:
    """Dynamo's running totals: graphs compiled, graph breaks met."""
    from torch._dynamo.utils import counters
    return (int(counters['stats']['unique_graphs']),
            int(sum(counters['graph_break'].values())))


def est_refresh_period(model) -> int:
    """The longest ``est_refresh`` period of the model's rep blocks (0: none)."""
    return max((m.est_refresh for m in model.modules()
                if isinstance(m, RepBlock) and m.repq and m.bn_mode == 'est'), default=0)


def warm_up_compiled(fn, device, min_calls: int, max_calls: int, tol: float = 1.5) -> dict:
    """Call the compiled step until its times settle: at least ``min_calls`` calls, then
    until the last two calls compiled nothing (no new dynamo graph) and each took at most
    ``tol`` x the fastest call so far (or ``max_calls`` calls in all).

    Returns the call times, which calls compiled, ``first_call_s`` (trace + compile + run),
    ``compile_s`` (the time of the compiling calls above the median of the others),
    ``graphs`` / ``graph_breaks`` (dynamo's counters over these calls) and ``settled``."""
    g0, b0 = dynamo_counts()
    calls, compiled = [], []
    settled = False
    while len(calls) < max_calls:
        before = dynamo_counts()[0]
        calls.append(timed(fn, device))
        compiled.append(dynamo_counts()[0] > before)
        if (len(calls) >= max(min_calls, 3) and not any(compiled[-2:])
                and max(calls[-2:]) <= tol * min(calls)):
            settled = True
            break
    g1, b1 = dynamo_counts()
    plain = sorted(t for t, c in zip(calls, compiled) if not c)
    steady = plain[len(plain) // 2] if plain else 0.0
    return dict(first_call_s=calls[0], calls_s=calls, compiling_calls=[
        i for i, c in enumerate(compiled) if c],
        compile_s=sum(t - steady for t, c in zip(calls, compiled) if c),
        warmup_wall_s=sum(calls), settled=settled, graphs=g1 - g0, graph_breaks=b1 - b0)


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------
def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device, inner: int = 1) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / inner


def summarize(xs: list[float]) -> dict:
    s = sorted(xs)
    n = len(s)

    def q(p):
        if n == 1:
            return s[0]
        k = (n - 1) * p
        lo = int(math.floor(k))
        hi = min(lo + 1, n - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)
    return dict(median=q(0.5), q1=q(0.25), q3=q(0.75), min=s[0], max=s[-1], n=n,
                samples=list(xs))


def interleaved(fns: dict, device, warmup: int, repeats: int, inner: int = 1,
                log=None) -> dict[str, list[float]]:
    """Round-robin timing: every round runs each fn once, the start rotating per round."""
    names = list(fns)
    for r in range(warmup):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fns[name]()
    _sync(device)
    times = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(fns[name], device, inner))
        if log:
            log(f'  repeat {r + 1}/{repeats}: ' + ', '.join(
                f'{n}={times[n][-1] * 1e3:.1f}ms' for n in names))
    return times


# ----------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------
def _proc_status() -> dict[str, int]:
    out = {}
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(('VmRSS:', 'VmHWM:')):
                    out[line.split(':')[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _reset_hwm() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == 'darwin' else r * 1024


def cpu_step_memory(trainer: Trainer, steps: int = 2) -> dict:
    """Peak RSS during a training step minus RSS before it (max over ``steps`` steps)."""
    best = None
    method = 'VmHWM reset via /proc/self/clear_refs'
    for _ in range(steps):
        trainer.opt.zero_grad(set_to_none=True)
        gc.collect()
        before = _proc_status().get('VmRSS')
        reset = before is not None and _reset_hwm()
        if not reset:
            method = 'ru_maxrss (not resettable: includes model build and init)'
            before = before or 0
        trainer.step()
        peak = _proc_status().get('VmHWM') if reset else _maxrss_bytes()
        rec = dict(delta_bytes=peak - before, peak_bytes=peak, before_bytes=before)
        if best is None or rec['delta_bytes'] > best['delta_bytes']:
            best = rec
    best['method'] = method
    return best


def cuda_step_memory(trainer: Trainer, device, step=None) -> dict:
    """Peak CUDA allocation during one step (``step``: e.g. the compiled step; default
    ``trainer.step``) minus the allocation before it."""
    trainer.opt.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    (step or trainer.step)()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return dict(delta_bytes=peak - before, peak_bytes=peak, before_bytes=before,
                method='torch.cuda.max_memory_allocated')


def run_memory_children(script: str, argv: list[str], variants, log) -> dict:
    """CPU step memory, one fresh ``script argv --_mem-child VARIANT`` process per variant
    (the child prints ``MEMCHILD {json}``)."""
    out = {}
    # a fixed mmap threshold disables glibc's dynamic one, so freed tensors go back to the
    # OS and the RSS before a step is live memory only (not the previous step's heap)
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536', 'MALLOC_TRIM_THRESHOLD_': '131072'}
    for v in variants:
        cmd = [sys.executable, script, *argv, '--_mem-child', v]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        except subprocess.TimeoutExpired:
            log(f'  memory {v}: subprocess timed out')
            continue
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith('MEMCHILD ')), None)
        if p.returncode or line is None:
            log(f'  memory {v}: subprocess failed (rc {p.returncode}): '
                f'{p.stderr.strip().splitlines()[-1:] if p.stderr else ""}')
            continue
        out[v] = json.loads(line[len('MEMCHILD '):])
        log(f'  memory {v}: +{out[v]["delta_bytes"] / MIB:.1f} MiB '
            f'(peak RSS {out[v]["peak_bytes"] / MIB:.0f} MiB)')
    return out


# ----------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.lower().startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def machine_info(device, argv, script: str) -> dict:
    """Where and how the benchmark ran (command, CPU, GPU, torch, threads, load)."""
    path = Path(script).resolve()
    info = dict(
        timestamp=datetime.datetime.now().isoformat(timespec='seconds'),
        command=shlex.join([sys.executable, str(path.relative_to(ROOT))
                            if path.is_relative_to(ROOT) else script, *argv]),
        cwd=os.getcwd(),
        platform=platform.platform(), python=platform.python_version(),
        cpu_model=_cpu_model(), logical_cpus=os.cpu_count(),
        cpu_affinity=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
        torch=torch.__version__, torch_cuda=torch.version.cuda,
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        env={k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY',
                                             'MKL_NUM_THREADS', 'CUDA_VISIBLE_DEVICES')},
        mkldnn=torch.backends.mkldnn.is_available(),
        mmpretrain=mmpretrain_available(),
    )
    try:
        info['loadavg_start'] = os.getloadavg()
    except OSError:
        pass
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
        info['cudnn'] = torch.backends.cudnn.version()
        info['cudnn_benchmark'] = torch.backends.cudnn.benchmark
    else:
        info['gpu'] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                       else None)
    return info
