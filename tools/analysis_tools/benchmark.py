#!/usr/bin/env python
"""Training / inference cost of RepQ against full precision and the LSQ baseline.

Measures, in ONE process and INTERLEAVED (each repeat runs every variant once, in a
rotating order, so machine drift hits all variants alike):

* training step time (forward + backward + SGD step) of

  - ``fp_multibranch``: the full-precision net as built (multi-branch, BN, train mode);
  - ``fp_merged``: every rep block merged with ``to_deploy()`` (plain conv, no BN): the floor;
  - ``lsq``: merged net + LSQ fake quantizers on every conv/linear (the paper's baseline);
  - ``repq_bn``: RepQ with exact batch statistics (``bn_mode='exact'``);
  - ``repq_est``: RepQ-BNEst (``bn_mode='est'``);
  - optional extras ``repq_bn_noquant`` / ``repq_est_noquant`` (merged RepQ forward without
    quantizers, to isolate the fake-quant cost);

* peak memory of one training step (CUDA: ``torch.cuda.max_memory_allocated`` minus the
  allocation before the step; CPU: one fresh subprocess per variant, peak RSS (``VmHWM``,
  reset through ``/proc/self/clear_refs``) minus RSS before the step);
* inference latency / throughput (eval, ``no_grad``) of the train-form FP net, the deployed
  FP net, the RepQ net in eval mode and the deployed net with fake quantizers (``QConv2d``);
* the time to merge the model (``to_deploy`` over all blocks, ``merge_model``).

Only torch (+ optional matplotlib) and the repq_mm core are imported unconditionally;
``repq_mm.convert`` is used when present, mmpretrain only for ``--model mmpretrain:...``
or the optional mmpretrain reference variants.

Examples::

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python tools/analysis_tools/benchmark.py
    python tools/analysis_tools/benchmark.py --model block --channels 64 --input-size 32
    python tools/analysis_tools/benchmark.py --device cuda --batch-size 64 --input-size 224
    python tools/analysis_tools/benchmark.py --profile-only --profile-variant repq_bn,repq_est
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import json
import math
import os
import os.path as osp
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from repq_mm.models import REPVGG_ARCHS, RepVGGNet  # noqa: E402
from repq_mm.quant import LSQQuantizer, QConfig, QConv2d, QLinear  # noqa: E402
from repq_mm.rep import RepBlock, RepVGGBlock  # noqa: E402

try:  # written concurrently; the tool falls back to the block API when it is missing
    from repq_mm.convert import convert_to_repq, merge_model
except ImportError:  # pragma: no cover
    convert_to_repq = merge_model = None

TRAIN_VARIANTS = {
    'fp_multibranch': 'FP multi-branch',
    'fp_merged': 'FP merged conv (floor)',
    'lsq': 'LSQ baseline (merged + LSQ)',
    'repq_bn': 'RepQ-BN (exact stats)',
    'repq_est': 'RepQ-BNEst',
    'repq_estc8': 'RepQ-BNEst + exact-stats correction every 8 steps',
    'repq_bn_noquant': 'RepQ-BN merge, no quantizers',
    'repq_est_noquant': 'RepQ-BNEst merge, no quantizers',
    'mm_fp_multibranch': 'mmpretrain RepVGG FP multi-branch',
}
DEFAULT_TRAIN = ('fp_multibranch', 'fp_merged', 'lsq', 'repq_bn', 'repq_est')
INFER_VARIANTS = {
    'fp_train_form': 'FP train-form (multi-branch, eval)',
    'fp_deploy': 'FP deploy (merged conv)',
    'repq_eval': 'RepQ-BN net in eval (cached Q_w(M))',
    'q_deploy': 'Deploy + fake quant (QConv2d eval)',
    'mm_deploy': 'mmpretrain RepVGG deploy (switch_to_deploy)',
}
MERGE_OPS = {
    'to_deploy_fp': 'to_deploy() over all blocks (FP)',
    'merge_model_fp': 'merge_model(inplace=False) (FP, incl. deepcopy)',
    'to_deploy_repq': 'to_deploy() over all blocks (RepQ, quantized)',
}
MIB = 1024.0 ** 2


# ----------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------
def _floats(s: str | None) -> tuple[float, ...] | None:
    return None if s in (None, '') else tuple(float(v) for v in s.split(','))


def _ints(s: str | None) -> tuple[int, ...] | None:
    return None if s in (None, '') else tuple(int(v) for v in s.split(','))


class _MMWrapper(nn.Module):
    """An mmpretrain ``ImageClassifier`` (config) or ``RepVGG`` backbone as ``x -> logits``."""

    def __init__(self, model: nn.Module, kind: str, num_classes: int = 0, channels: int = 0):
        super().__init__()
        self.model, self.kind = model, kind
        if kind == 'backbone':
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        if self.kind in ('classifier', 'detector'):
            return self.model(x, mode='tensor')
        feats = self.model(x)
        return self.head(torch.flatten(self.gap(feats[-1]), 1))


def mmpretrain_available() -> str | None:
    """mmpretrain's version if it is installed (without importing it), else ``None``."""
    import importlib.metadata
    import importlib.util
    try:
        if importlib.util.find_spec('mmpretrain') is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return importlib.metadata.version('mmpretrain')
    except importlib.metadata.PackageNotFoundError:
        return 'unknown'


def build_mm_repvgg(arch: str, num_classes: int, in_channels: int) -> nn.Module | None:
    """mmpretrain's ``RepVGG`` backbone + GAP + Linear (same head as :class:`RepVGGNet`)."""
    try:
        from mmpretrain.models.backbones import RepVGG
    except Exception:  # noqa: BLE001
        return None
    backbone = RepVGG(arch, in_channels=in_channels, out_indices=(3,))
    a, b = REPVGG_ARCHS[arch.upper()][1]
    return _MMWrapper(backbone, 'backbone', num_classes, int(512 * b))


#: ``--model`` shorthands for the detectors (full-precision tree configs, 1 class)
DETECTORS = {
    'yolov6': osp.join(ROOT, 'configs', 'yolov6_trees', 'yolov6-n_fp_trees.py'),
    'yolov7': osp.join(ROOT, 'configs', 'yolov7_trees', 'yolov7-tiny_fp_trees.py'),
}


def build_model(args) -> tuple[nn.Module | None, str]:
    """The full-precision model named by ``--model`` and a one-line description
    (model ``None``: skipped, the description says why)."""
    spec = args.model
    if spec == 'block':
        c = args.channels
        return RepVGGBlock(c, c, act=nn.ReLU()), f'RepVGGBlock({c}, {c}, act=ReLU)'
    if spec.upper() in REPVGG_ARCHS:
        net = RepVGGNet(spec, in_channels=args.in_channels, num_classes=args.num_classes,
                        width_multiplier=_floats(args.width_multiplier),
                        num_blocks=_ints(args.num_blocks))
        blocks = [len(s) for s in net.stages]
        return net, (f'RepVGGNet({spec.upper()}, stages={blocks}, out_channels='
                     f'{net.out_channels}, num_classes={args.num_classes})')
    if spec.startswith('mmpretrain:'):
        what = spec.split(':', 1)[1]
        version = mmpretrain_available()
        try:
            import mmpretrain  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any failure means "not usable"
            return None, (f'{spec}: mmpretrain is not importable ({type(e).__name__}: {e}); '
                          'skipped')
        if what.upper() in REPVGG_ARCHS:
            return (build_mm_repvgg(what, args.num_classes, args.in_channels),
                    f'mmpretrain {version} RepVGG({what.upper()}) + GAP + Linear')
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from mmpretrain.registry import MODELS
        cfg = Config.fromfile(what)
        init_default_scope(cfg.get('default_scope', 'mmpretrain'))
        model = MODELS.build(cfg.model)
        return _MMWrapper(model, 'classifier'), f'mmpretrain {version} config {what}'
    if spec in DETECTORS or spec.startswith('mmdet:'):
        path = DETECTORS.get(spec) or spec.split(':', 1)[1]
        try:
            import mmdet
            from mmdet.registry import MODELS as DET_MODELS
            from mmengine.config import Config
            from mmengine.registry import init_default_scope
            import repq_mm.mm  # noqa: F401  (registers the YOLO-style backbones / necks)
        except Exception as e:  # noqa: BLE001 - any failure means "not usable"
            return None, f'{spec}: mmdet is not importable ({type(e).__name__}: {e}); skipped'
        from repq_mm.mm.config import is_repq_model
        cfg = Config.fromfile(path)
        if is_repq_model(cfg.model):
            raise SystemExit(f'--model {spec}: give the full-precision config (this one has a '
                             'RepQModel); the variants are made here')
        init_default_scope('mmdet')
        model = DET_MODELS.build(cfg.model)
        return (_MMWrapper(model, 'detector'),
                f'mmdet {mmdet.__version__} detector {osp.relpath(path, ROOT)} (training step: '
                'mean square of the head outputs as the loss; the assigner / detection loss '
                'costs the same for every variant and is left out)')
    raise SystemExit(f'unknown --model {spec!r}: use block, one of '
                     f'{sorted(REPVGG_ARCHS)}, mmpretrain:CONFIG_OR_ARCH, '
                     f'{" / ".join(DETECTORS)} or mmdet:CONFIG')


# ----------------------------------------------------------------------------------------
# conversions (repq_mm.convert when present, the block API otherwise)
# ----------------------------------------------------------------------------------------
def _top_rep_blocks(model: nn.Module) -> list[tuple[str, RepBlock]]:
    out, inside = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + '.') for p in inside):
            continue
        if isinstance(m, RepBlock):
            out.append((name, m))
            inside.append(name)
    return out


def _set(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent, _, attr = name.rpartition('.')
    setattr(root.get_submodule(parent) if parent else root, attr, new)
    return root


def do_merge(model: nn.Module, use_convert: bool) -> nn.Module:
    if use_convert:
        return merge_model(model, inplace=True)
    for name, blk in _top_rep_blocks(model):
        dep = blk.to_deploy()
        dep.train(blk.training)
        model = _set(model, name, dep)
    return model


def _quantize_plain(model: nn.Module, qcfg: QConfig) -> nn.Module:
    skip = [n for n, _ in _top_rep_blocks(model)]
    for name, m in list(model.named_modules()):
        if any(name == p or name.startswith(p + '.') for p in skip):
            continue
        if isinstance(m, nn.Conv2d) and not isinstance(m, QConv2d):
            model = _set(model, name, QConv2d.from_float(m, qcfg).train(m.training))
        elif isinstance(m, nn.Linear) and not isinstance(m, QLinear):
            model = _set(model, name, QLinear.from_float(m, qcfg).train(m.training))
    return model


def do_repq(model: nn.Module, qcfg: QConfig, quantize: bool, use_convert: bool) -> nn.Module:
    if use_convert:
        return convert_to_repq(model, qcfg=qcfg, quantize=quantize, inplace=True)
    for _, blk in _top_rep_blocks(model):
        blk.enable_repq(qcfg, quantize)
    return _quantize_plain(model, qcfg) if quantize else model


def make_variant(name: str, base: nn.Module, qcfg: QConfig, use_convert: bool,
                 mm_model: nn.Module | None = None) -> nn.Module:
    """A training-mode copy of ``base`` converted as ``name`` says."""
    if name == 'mm_fp_multibranch':
        return copy.deepcopy(mm_model).train()
    m = copy.deepcopy(base).train()
    if name == 'fp_multibranch':
        return m
    if name == 'fp_merged':
        return do_merge(m, use_convert)
    if name == 'lsq':
        m = do_merge(m, use_convert)
        return do_repq(m, qcfg, True, use_convert) if use_convert else _quantize_plain(m, qcfg)
    mode = 'exact' if name.startswith('repq_bn') else 'est'
    if name == 'repq_estc8':
        return do_repq(m, qcfg.replace(bn_mode='est', est_refresh=8), True, use_convert)
    if name in ('repq_bn', 'repq_est', 'repq_bn_noquant', 'repq_est_noquant'):
        return do_repq(m, qcfg.replace(bn_mode=mode), not name.endswith('noquant'),
                       use_convert)
    raise ValueError(f'unknown variant {name!r}')


# ----------------------------------------------------------------------------------------
# measurement helpers
# ----------------------------------------------------------------------------------------
def _flat_tensors(out) -> list:
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_tensors(o)]
    return [out]


def loss_fn(out, target):
    if isinstance(out, (tuple, list)):
        return sum(loss_fn(o, target) for o in out)
    if out.dim() == 2 and target is not None and out.shape[1] > int(target.max()):
        return F.cross_entropy(out, target)
    return out.float().pow(2).mean()


class Trainer:
    """One model, its SGD optimizer and a fixed batch; ``step()`` = one training step."""

    def __init__(self, model, x, target, lr):
        self.model, self.x, self.target = model, x, target
        with torch.no_grad():           # initialises the LSQ step sizes (first batch)
            model(x)
        # after the init forward: per-channel step sizes are created lazily
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        self.loss = float('nan')

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(self.x), self.target)
        loss.backward()
        self.opt.step()
        self.loss = loss.detach()


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


# -- memory ------------------------------------------------------------------------------
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


def cuda_step_memory(trainer: Trainer, device) -> dict:
    trainer.opt.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    trainer.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return dict(delta_bytes=peak - before, peak_bytes=peak, before_bytes=before,
                method='torch.cuda.max_memory_allocated')


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


def machine_info(device, argv) -> dict:
    info = dict(
        timestamp=datetime.datetime.now().isoformat(timespec='seconds'),
        command=shlex.join([sys.executable, str(Path(__file__).resolve().relative_to(ROOT))
                            if Path(__file__).resolve().is_relative_to(ROOT) else __file__,
                            *argv]),
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
        repq_convert=convert_to_repq is not None,
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


# ----------------------------------------------------------------------------------------
# profiling
# ----------------------------------------------------------------------------------------
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


def attribute_profile(prof, wall_s: float, steps: int, batch: int = -1,
                      device_time: bool = False) -> dict:
    """Split the profiled steps into (phase, context, op) buckets of *inclusive* time of the
    top-level op / autograd function, so nothing is counted twice. Backward functions
    inherit the context of the forward op that created them (autograd sequence number).

    CPU: host time of the ops. CUDA (``device_time``): time of the kernels each op launched
    (the host side is asynchronous); the rest of the wall time is GPU idle time."""
    events = list(prof.events())
    seq_ctx = {}
    for e in events:
        if e.sequence_nr is None or e.sequence_nr < 0 or e.name.startswith('autograd::'):
            continue
        if not _is_op(e):
            continue
        names = [p.name for p in _chain(e)]
        if 'phase::forward' not in names:
            continue
        ctx = next((n for n in names if n in _CTX), None)
        seq_ctx.setdefault((e.thread, e.sequence_nr), (ctx, _tag(e, batch)))
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
    items = [dict(phase=k[0], ctx=k[1], op=k[2] + (f' [{k[3]}]' if k[3] else ''), ms=v,
                  count=counts[k] // steps, category=_category(*k))
             for k, v in buckets.items()]
    items.sort(key=lambda d: -d['ms'])
    cats: dict[str, float] = {}
    for it in items:
        cats[it['category']] = cats.get(it['category'], 0.0) + it['ms']
    wall_ms = wall_s * 1e3 / steps
    untracked = ('GPU idle (Python, launches, syncs)' if device_time else
                 'untracked (Python, module calls, dispatch outside ops)')
    cats[untracked] = wall_ms - sum(it['ms'] for it in items)
    phases = {}
    for e in events:
        if e.name in _PHASES:
            phases[e.name.split('::')[1]] = phases.get(e.name.split('::')[1], 0.0) + \
                e.cpu_time_total / 1e3 / steps
    return dict(wall_ms=wall_ms, phases_ms=phases, time='device' if device_time else 'cpu',
                categories_ms=dict(sorted(cats.items(), key=lambda kv: -kv[1])), items=items)


def profile_variant(name, base, qcfg, use_convert, x, target, device, args, mm_model=None):
    from torch.profiler import ProfilerActivity, profile, record_function
    model = make_variant(name, base, qcfg, use_convert, mm_model).to(device)
    tr = Trainer(model, x, target, args.lr)
    _annotate(model)

    def step():
        with record_function('phase::zero_grad'):
            tr.opt.zero_grad(set_to_none=True)
        with record_function('phase::forward'):
            loss = loss_fn(model(x), target)
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
    att = attribute_profile(prof, wall, args.profile_steps, x.shape[0],
                            device_time=device.type == 'cuda')
    att['unprofiled_step_ms'] = sorted(ref)[1] * 1e3
    return table, att


def format_attribution(name: str, att: dict, top: int = 25) -> str:
    lines = [f'### Profile attribution: {name} ({TRAIN_VARIANTS.get(name, name)})', '',
             f'profiled step wall {att["wall_ms"]:.1f} ms (unprofiled '
             f'{att["unprofiled_step_ms"]:.1f} ms; the profiler adds per-op overhead); buckets: inclusive {att["time"]} time of'
             ' top-level ops / autograd functions; phases (host): ' +
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


# ----------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------
def _fmt_ms(v):
    return f'{v * 1e3:.2f}' if v is not None else '-'


def render_markdown(res: dict) -> str:
    m, c = res['meta'], res['config']
    out = ['# RepQ benchmark', '',
           f'- command: `{m["command"]}`',
           f'- model: {c["model_desc"]}; input {c["batch_size"]}x{c["in_channels"]}x'
           f'{c["input_size"]}x{c["input_size"]}; device {c["device"]}; '
           f'W{c["w_bits"]}A{c["a_bits"]} per_channel={c["per_channel"]}',
           f'- machine: {m["platform"]}; CPU {m["cpu_model"]} ({m["logical_cpus"]} logical, '
           f'affinity {m["cpu_affinity"]}); GPU {m["gpu"]}',
           f'- torch {m["torch"]} (threads {m["torch_threads"]}, interop '
           f'{m["torch_interop_threads"]}); env ' +
           ', '.join(f'{k}={v}' for k, v in m['env'].items() if v is not None),
           f'- conversions via repq_mm.convert: {m["repq_convert"]}; mmpretrain: '
           f'{m["mmpretrain"]}',
           f'- timing: {c["warmup"]} warm-up + {c["repeats"]} interleaved repeats (rotating '
           f'order), {c["inner"]} step(s) per sample; load average start/end '
           f'{m.get("loadavg_start")} / {m.get("loadavg_end")}', '']
    tr = res.get('train', {})
    if tr:
        ref = tr.get('fp_multibranch', {}).get('median')
        lsq = tr.get('lsq', {}).get('median')
        mref = tr.get('fp_multibranch', {}).get('mem', {}).get('delta_bytes')
        out += ['## Training step (forward + backward + SGD step)', '',
                '| variant | median ms | IQR ms | min-max ms | x FP multi-branch | x LSQ | '
                'peak mem delta MiB | x FP mem |',
                '|---|---:|---:|---:|---:|---:|---:|---:|']
        for k, r in tr.items():
            mem = r.get('mem', {}).get('delta_bytes')
            cells = [f'{TRAIN_VARIANTS[k]} (`{k}`)', _fmt_ms(r['median']),
                     f'{_fmt_ms(r["q1"])}-{_fmt_ms(r["q3"])}',
                     f'{_fmt_ms(r["min"])}-{_fmt_ms(r["max"])}',
                     f'{r["median"] / ref:.2f}' if ref else '-',
                     f'{r["median"] / lsq:.2f}' if lsq else '-',
                     f'{mem / MIB:.1f}' if mem is not None else '-',
                     f'{mem / mref:.2f}' if mem is not None and mref and mref >= MIB else '-']
            out.append('| ' + ' | '.join(cells) + ' |')
        methods = {r['mem']['method'] for r in tr.values() if 'mem' in r}
        if methods:
            out += ['', f'Memory: {"; ".join(sorted(methods))} (peak during one step minus the '
                    'allocation before it: activations, gradients, temporaries).']
        out.append('')
    inf = res.get('infer', {})
    if inf:
        ref = inf.get('fp_train_form', {}).get('median')
        dep = inf.get('fp_deploy', {}).get('median')
        out += ['## Inference (eval, no_grad)', '',
                '| variant | median ms / batch | IQR ms | throughput img/s | '
                'x train-form throughput | x FP deploy throughput |',
                '|---|---:|---:|---:|---:|---:|']
        for k, r in inf.items():
            out.append(f'| {INFER_VARIANTS[k]} (`{k}`) | {_fmt_ms(r["median"])} | '
                       f'{_fmt_ms(r["q1"])}-{_fmt_ms(r["q3"])} | {r["throughput"]:.1f} | '
                       f'{(ref / r["median"]) if ref else float("nan"):.2f} | '
                       f'{(dep / r["median"]) if dep else float("nan"):.2f} |')
        out.append('')
    if res.get('targets'):
        out += ['## Targets (medians)', '']
        for t in res['targets']:
            out.append(f'- {t["name"]}: {t["value"]:.2f} (target <= {t["limit"]}) -> '
                       f'{"met" if t["met"] else "NOT met"}')
        out.append('')
    mg = res.get('merge', {})
    if mg:
        out += ['## Merge time', '', '| operation | median ms | IQR ms |', '|---|---:|---:|']
        for k, r in mg.items():
            out.append(f'| {MERGE_OPS[k]} (`{k}`) | {_fmt_ms(r["median"])} | '
                       f'{_fmt_ms(r["q1"])}-{_fmt_ms(r["q3"])} |')
        out.append('')
    for note in res.get('notes', []):
        out.append(f'> {note}')
    if res.get('notes'):
        out.append('')
    for name, att in res.get('profile', {}).items():
        out += [format_attribution(name, att), '']
    return '\n'.join(out)


def plot(res: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f'matplotlib unavailable ({type(e).__name__}: {e}); PNG skipped'
    panels = []
    tr, inf = res.get('train', {}), res.get('infer', {})
    if tr:
        panels.append(('training step (ms, median, IQR bars)', tr, 'median', 1e3))
        if any('mem' in r for r in tr.values()):
            panels.append(('training step peak memory delta (MiB)', tr, 'mem', 1 / MIB))
    if inf:
        panels.append(('inference throughput (img/s)', inf, 'throughput', 1.0))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (title, data, key, scale) in zip(axes, panels):
        names = list(data)
        if key == 'median':
            vals = [data[n]['median'] * scale for n in names]
            err = [[(data[n]['median'] - data[n]['q1']) * scale for n in names],
                   [(data[n]['q3'] - data[n]['median']) * scale for n in names]]
        elif key == 'mem':
            vals = [data[n].get('mem', {}).get('delta_bytes', 0) * scale for n in names]
            err = None
        else:
            vals = [data[n]['throughput'] for n in names]
            err = None
        ax.bar(range(len(names)), vals, yerr=err, capsize=3,
               color=['#888888', '#bbbbbb', '#4c72b0', '#dd8452', '#55a868', '#c44e52',
                      '#8172b3', '#937860'][:len(names)])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha='right', fontsize=8)
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(vals):
            ax.text(i, v, f'{v:.0f}' if v >= 10 else f'{v:.2f}', ha='center', va='bottom',
                    fontsize=7)
    c, m = res['config'], res['meta']
    fig.suptitle(f'{c["model_desc"][:110]} | {c["batch_size"]}x{c["input_size"]}^2 | '
                 f'{c["device"]} | threads {m["torch_threads"]} | torch {m["torch"]}',
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='A0',
                   help="A0/A1/A2/B0 (RepVGGNet), 'block' (one RepVGGBlock), "
                        "'mmpretrain:CONFIG.py' or 'mmpretrain:A0' (needs mmpretrain), "
                        "'yolov6' / 'yolov7' (the YOLO-style tree detectors) or "
                        "'mmdet:CONFIG.py' (needs mmdet)")
    p.add_argument('--channels', type=int, default=64, help='channels for --model block')
    p.add_argument('--width-multiplier', default=None, help='RepVGGNet (a,b), e.g. 0.25,0.5')
    p.add_argument('--num-blocks', default=None, help='RepVGGNet blocks per stage, e.g. 1,1,1,1')
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--in-channels', type=int, default=3)
    p.add_argument('--input-size', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads (CPU)')
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--inner', type=int, default=1, help='steps per timing sample')
    p.add_argument('--w-bits', type=int, default=8)
    p.add_argument('--a-bits', type=int, default=8)
    p.add_argument('--per-channel', action='store_true')
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--variants', default=','.join(DEFAULT_TRAIN),
                   help=f'training variants, comma separated, from {list(TRAIN_VARIANTS)}')
    p.add_argument('--no-convert', action='store_true',
                   help='use the block API instead of repq_mm.convert')
    p.add_argument('--mm-reference', choices=('auto', 'off'), default='auto',
                   help='add mmpretrain RepVGG train/deploy reference variants when '
                        'mmpretrain is importable and --model is a RepVGG arch')
    p.add_argument('--memory', choices=('auto', 'off'), default='auto',
                   help='peak memory of a training step (CPU: one subprocess per variant)')
    p.add_argument('--skip-train', action='store_true')
    p.add_argument('--skip-infer', action='store_true')
    p.add_argument('--skip-merge', action='store_true')
    p.add_argument('--out-dir', default='work_dirs/benchmark')
    p.add_argument('--profile', action='store_true',
                   help='after the benchmark, torch.profiler on one training step')
    p.add_argument('--profile-only', action='store_true', help='only the profile')
    p.add_argument('--profile-variant', default='repq_est',
                   help='variant(s) to profile, comma separated')
    p.add_argument('--profile-steps', type=int, default=1)
    p.add_argument('--profile-rows', type=int, default=25)
    p.add_argument('--profile-shapes', action='store_true', help='group ops by input shape')
    p.add_argument('--quiet', action='store_true')
    p.add_argument('--_mem-child', dest='mem_child', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(',') if v]
    for v in args.variants:
        if v not in TRAIN_VARIANTS:
            p.error(f'unknown variant {v!r}; choose from {list(TRAIN_VARIANTS)}')
    args.profile_variants = [v for v in args.profile_variant.split(',') if v]
    for v in args.profile_variants:
        if v not in TRAIN_VARIANTS:
            p.error(f'unknown --profile-variant {v!r}; choose from {list(TRAIN_VARIANTS)}')
    if args.profile_only:
        args.profile = True
    return args


def _inputs(args, device, model):
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch_size, args.in_channels if args.model != 'block' else
                    args.channels, args.input_size, args.input_size, generator=g)
    target = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    return x.to(device), target.to(device)


def _mem_child(args, device) -> int:
    """Subprocess entry: build one variant, print its step memory as JSON, exit."""
    torch.manual_seed(args.seed)
    base, _ = build_model(args)
    mm = (build_mm_repvgg(args.model, args.num_classes, args.in_channels)
          if args.mem_child.startswith('mm_') else None)
    qcfg = QConfig(w_bits=args.w_bits, a_bits=args.a_bits, per_channel=args.per_channel)
    use_convert = convert_to_repq is not None and not args.no_convert
    model = make_variant(args.mem_child, base.to(device), qcfg, use_convert, mm).to(device)
    del base
    x, target = _inputs(args, device, model)
    tr = Trainer(model, x, target, args.lr)
    tr.step()                                      # optimizer state, allocator warm
    print('MEMCHILD ' + json.dumps(cpu_step_memory(tr)), flush=True)
    return 0


def run_memory_children(args, argv, variants, log) -> dict:
    out = {}
    script = str(Path(__file__).resolve())
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


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    log = (lambda *a: None) if args.quiet and not args.mem_child else \
        functools.partial(print, flush=True)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda requested but torch.cuda.is_available() is False')
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    if args.mem_child:
        return _mem_child(args, device)

    res = dict(meta=machine_info(device, argv), notes=[])
    torch.manual_seed(args.seed)
    base, desc = build_model(args)
    res['config'] = dict(model=args.model, model_desc=desc, batch_size=args.batch_size,
                         in_channels=args.in_channels if args.model != 'block' else args.channels,
                         input_size=args.input_size, device=str(device), warmup=args.warmup,
                         repeats=args.repeats, inner=args.inner, w_bits=args.w_bits,
                         a_bits=args.a_bits, per_channel=args.per_channel, lr=args.lr,
                         variants=args.variants)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if base is None:
        log(desc)
        res['notes'].append(desc)
        res['skipped'] = True
        _write(res, out_dir, log)
        return res
    base = base.to(device)
    use_convert = convert_to_repq is not None and not args.no_convert
    if not use_convert:
        res['notes'].append('conversions use the block API (repq_mm.convert not used)')
    qcfg = QConfig(w_bits=args.w_bits, a_bits=args.a_bits, per_channel=args.per_channel)
    x, target = _inputs(args, device, base)
    log(f'model: {desc}\ninput: {tuple(x.shape)} on {device}, threads '
        f'{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS")})')

    mm_model = None
    if (args.mm_reference == 'auto' and args.model.upper() in REPVGG_ARCHS
            and mmpretrain_available()):
        if args.width_multiplier or args.num_blocks:
            res['notes'].append('mmpretrain reference skipped: custom width/num_blocks')
        else:
            torch.manual_seed(args.seed)
            mm_model = build_mm_repvgg(args.model, args.num_classes, args.in_channels)
            if mm_model is not None:
                mm_model = mm_model.to(device)
                if 'mm_fp_multibranch' not in args.variants:
                    args.variants.append('mm_fp_multibranch')
    else:
        args.variants = [v for v in args.variants if v != 'mm_fp_multibranch']
    if not isinstance(base, (RepVGGNet, RepBlock)) and not use_convert and any(
            v != 'fp_multibranch' for v in args.variants):
        res['notes'].append('foreign model without repq_mm.convert: only fp_multibranch')
        args.variants = ['fp_multibranch']

    if not args.profile_only:
        # -- training ---------------------------------------------------------------------
        if not args.skip_train:
            log('building training variants: ' + ', '.join(args.variants))
            trainers = {v: Trainer(make_variant(v, base, qcfg, use_convert, mm_model)
                                   .to(device), x, target, args.lr) for v in args.variants}
            log('timing training steps (interleaved)')
            times = interleaved({v: t.step for v, t in trainers.items()}, device,
                                args.warmup, args.repeats, args.inner, log)
            res['train'] = {v: summarize(ts) for v, ts in times.items()}
            for v, t in trainers.items():
                res['train'][v]['final_loss'] = float(t.loss)
                if not math.isfinite(float(t.loss)):
                    res['notes'].append(f'{v}: non-finite loss after the timed steps')
            if args.memory == 'auto':
                log('measuring step memory')
                if device.type == 'cuda':
                    mem = {v: cuda_step_memory(t, device) for v, t in trainers.items()}
                else:
                    mem = run_memory_children(args, argv, list(trainers), log)
                for v, rec in mem.items():
                    res['train'][v]['mem'] = rec
            del trainers
            gc.collect()
            ref = res['train'].get('fp_multibranch', {}).get('median')
            lsq = res['train'].get('lsq', {}).get('median')
            tg = []
            for v, other, limit, label in (
                    ('repq_est', ref, 0.5, 'RepQ-BNEst / FP multi-branch'),
                    ('repq_est', lsq, 1.3, 'RepQ-BNEst / LSQ baseline'),
                    ('repq_bn', ref, 1.5, 'RepQ-BN / FP multi-branch')):
                if v in res['train'] and other:
                    val = res['train'][v]['median'] / other
                    tg.append(dict(name=label, value=val, limit=limit, met=val <= limit))
            res['targets'] = tg
        # -- inference --------------------------------------------------------------------
        if not args.skip_infer:
            log('building inference variants')
            fp = copy.deepcopy(base).eval()
            models = {'fp_train_form': fp,
                      'fp_deploy': do_merge(copy.deepcopy(base), use_convert).eval()}
            if isinstance(base, (RepVGGNet, RepBlock)) or use_convert:
                rq = make_variant('repq_bn', base, qcfg, use_convert)
                with torch.no_grad():
                    rq(x)                                   # initialise the quantizers
                rq.eval()
                models['repq_eval'] = rq
                models['q_deploy'] = do_merge(copy.deepcopy(rq), use_convert).eval()
            if mm_model is not None:
                mmd = copy.deepcopy(mm_model).eval()
                mmd.model.switch_to_deploy()
                models['mm_deploy'] = mmd.eval()

            def infer(m):
                with torch.no_grad():
                    m(x)
            log('timing inference (interleaved)')
            times = interleaved({k: functools.partial(infer, m) for k, m in models.items()},
                                device, args.warmup, args.repeats, args.inner, log)
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
                a = _flat_tensors(models['fp_train_form'](x))
                b = _flat_tensors(models['fp_deploy'](x))
                res['infer']['fp_deploy']['max_rel_err_vs_train_form'] = max(
                    float((u - v).abs().max() / u.abs().max().clamp(min=1e-12))
                    for u, v in zip(a, b))
            del models
        # -- merge ------------------------------------------------------------------------
        if not args.skip_merge:
            fp = copy.deepcopy(base).eval()
            rq = make_variant('repq_bn', base, qcfg, use_convert) if (
                isinstance(base, (RepVGGNet, RepBlock)) or use_convert) else None
            if rq is not None:
                with torch.no_grad():
                    rq(x)
                rq.eval()

            def deploy_all(m):
                with torch.no_grad():
                    for _, blk in _top_rep_blocks(m):
                        blk.to_deploy()
            ops = {'to_deploy_fp': functools.partial(deploy_all, fp),
                   'merge_model_fp': lambda: do_merge(copy.deepcopy(fp), use_convert)}
            if rq is not None:
                ops['to_deploy_repq'] = functools.partial(deploy_all, rq)
            if not _top_rep_blocks(fp):
                ops = {}
            log('timing merge')
            times = interleaved(ops, device, args.warmup, args.repeats, 1, None)
            res['merge'] = {k: summarize(ts) for k, ts in times.items()}
    # -- profile ----------------------------------------------------------------------------
    if args.profile:
        res['profile'] = {}
        for v in args.profile_variants:
            if v.startswith('mm_') and mm_model is None:
                log(f'profile {v}: mmpretrain reference unavailable; skipped')
                continue
            log(f'profiling one training step of {v}')
            table, att = profile_variant(v, base, qcfg, use_convert, x, target, device, args,
                                         mm_model)
            res['profile'][v] = att
            text = f'## torch.profiler: {v}\n\n{table}\n\n{format_attribution(v, att)}\n'
            log(text)
            (out_dir / f'profile_{v}.txt').write_text(text)
    try:
        res['meta']['loadavg_end'] = os.getloadavg()
    except OSError:
        pass
    _write(res, out_dir, log)
    return res


def _write(res, out_dir: Path, log):
    md = render_markdown(res)
    (out_dir / 'results.md').write_text(md + '\n')
    (out_dir / 'results.json').write_text(json.dumps(res, indent=1, default=str) + '\n')
    note = plot(res, out_dir / 'results.png')
    if note:
        log(note)
    log(md)
    log(f'written: {out_dir / "results.md"}, {out_dir / "results.json"}'
        + ('' if note else f', {out_dir / "results.png"}'))


if __name__ == '__main__':
    main()
