#!/usr/bin/env python
"""Deployment benchmark: integer ONNX models against float32 in onnxruntime (CPU).

For each model and quantization mode the tool builds the RepQ model of the project's config
(random weights; the LSQ step sizes initialised on random images with the project's
``calibrate_lsq``: speed and kernel selection do not depend on trained values), merges it,
exports

* the float32 ONNX model (the merged network, quantizers off: the reference),
* the integer ONNX model (:func:`repq_mm.export.export_onnx`, ``--forms``: by default the
  ``fused`` form onnxruntime runs as integer kernels),

and then, in ONE process,

* counts, in onnxruntime's optimised graph (``ORT_ENABLE_ALL``, the graph it writes to
  ``optimized_model_filepath``), the integer conv / linear kernels (``QLinearConv``,
  ``ConvInteger``, ``QGemm``, ``MatMulInteger`` ...) against the number of quantized layers,
  and the float conv / linear kernels left;
* runs the layer-by-layer export check (:func:`repq_mm.export.compare_onnx`) in the graph as
  written and in onnxruntime's optimised graph (``--no-check`` skips it);
* after all exports, measures latency at each ``--batch-sizes`` with ``--threads``
  intra-op threads (inter-op 1, sequential): every repeat runs every session of a model
  once, the start rotating per repeat (interleaved, so machine drift hits all alike);
  medians and quartiles; ratios int8 / FP32 of the medians. ``--wait-load`` waits for a
  quiet machine first; the load averages are recorded.

Models (``--models``):

* ``repvgg-a0``: mmpretrain RepVGG-A0, 1000 classes, 3x224x224
  (``configs/repvgg_imagenet/repvgg-A0_repq-bn_w4a4_8xb32_in1k.py``);
* ``fmnist``: the Fashion-MNIST RepVGG (A0 layout, base width 16), 1x32x32
  (``configs/repvgg_fmnist/repvgg-A0w16_repq-bn_w4a4_fmnist.py``);
* ``yolov6-trees``: the YOLOv6-n-style tree detector, 3x416x416, backbone + neck + head
  tensors (``configs/yolov6_trees/yolov6-n_repq-bn_w4a4_trees.py``).

Each config's ``repq`` settings are used (per-channel weights, first / last or head output
layers at 8 bits) with ``w_bits`` / ``a_bits`` set per mode (``w8a8``, ``w4a8``, ``w4a4``).

Writes ``results.json`` and ``results.md`` (tables + machine: CPU model and flags,
onnxruntime version, threads, load average before / after) into ``--out-dir``.

Examples::

    OMP_NUM_THREADS=2 python tools/analysis_tools/deploy_bench.py --out-dir work_dirs/deploy_bench \
        --wait-load 0.5
    python tools/analysis_tools/deploy_bench.py --models fmnist --modes w4a4 --forms fused,qdq
    python tools/analysis_tools/deploy_bench.py --quick --out-dir /tmp/db    # a smoke test
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import os.path as osp
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CONFIGS = {
    'repvgg-a0': ('configs/repvgg_imagenet/repvgg-A0_repq-bn_w4a4_8xb32_in1k.py',
                  (3, 224, 224), 'RepVGG-A0 (mmpretrain), 1000 classes'),
    'fmnist': ('configs/repvgg_fmnist/repvgg-A0w16_repq-bn_w4a4_fmnist.py',
               (1, 32, 32), 'Fashion-MNIST RepVGG (A0 layout, base width 16), 10 classes'),
    'yolov6-trees': ('configs/yolov6_trees/yolov6-n_repq-bn_w4a4_trees.py',
                     (3, 416, 416), 'YOLOv6-n-style tree detector (backbone + neck + head)'),
}
#: input sizes of ``--quick`` (small, for a smoke test)
QUICK_SIZES = {'repvgg-a0': (3, 32, 32), 'fmnist': (1, 32, 32), 'yolov6-trees': (3, 64, 64)}
MODES = {'w8a8': (8, 8), 'w4a8': (4, 8), 'w4a4': (4, 4)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='int8 ONNX vs float32 ONNX in onnxruntime: integer kernels and latency',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--models', default=','.join(CONFIGS),
                   help=f'comma-separated, from {list(CONFIGS)}')
    p.add_argument('--modes', default=','.join(MODES), help=f'from {list(MODES)}')
    p.add_argument('--forms', default='fused',
                   help='integer graph forms (repq_mm.export.FORMS): fused, qdq')
    p.add_argument('--weight-dtypes', default='auto',
                   help='weight codes of the fused form: auto, int8, uint8 (comma-separated '
                   'to compare)')
    p.add_argument('--batch-sizes', default='1,16')
    p.add_argument('--threads', type=int, default=2, help='onnxruntime intra-op threads')
    p.add_argument('--repeats', type=int, default=None,
                   help='timed runs per session (default 30 at batch 1, 10 above; 3 with '
                   '--quick)')
    p.add_argument('--warmup', type=int, default=3, help='untimed runs per session first')
    p.add_argument('--precise-u8s8', action='store_true',
                   help='sessions with session.x64quantprecision=1 (u8u8 instead of '
                   'saturating u8s8 products on x86 without VNNI)')
    p.add_argument('--no-check', action='store_true', help='skip the export check')
    p.add_argument('--wait-load', type=float,
                   help='before timing each model, wait until the 1-minute load average is '
                   'below this (other jobs sharing the CPU distort latency)')
    p.add_argument('--wait-max', type=float, default=1800,
                   help='with --wait-load: give up waiting after this many seconds')
    p.add_argument('--quick', action='store_true',
                   help='small inputs, batch sizes 1 and 2, 3 repeats: a smoke test')
    p.add_argument('--out-dir', default='work_dirs/deploy_bench')
    p.add_argument('--keep-onnx', action='store_true',
                   help='keep the ONNX files in OUT_DIR/onnx (default: a temporary folder)')
    args = p.parse_args(argv)
    args.models = _split(args.models, CONFIGS, '--models')
    args.modes = _split(args.modes, MODES, '--modes')
    args.forms = _split(args.forms, ('fused', 'qdq'), '--forms')
    args.weight_dtypes = _split(args.weight_dtypes, ('auto', 'int8', 'uint8'),
                                '--weight-dtypes')
    try:
        args.batch_sizes = [int(v) for v in args.batch_sizes.split(',') if v]
    except ValueError:
        p.error(f'--batch-sizes: comma-separated integers, got {args.batch_sizes!r}')
    if args.quick:
        args.batch_sizes = [1, 2]
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error('--batch-sizes must be positive')
    if args.threads < 1 or args.warmup < 0 or (args.repeats is not None and args.repeats < 1):
        p.error('--threads and --repeats must be >= 1, --warmup >= 0')
    return args


def _split(s: str, valid, flag: str) -> list[str]:
    vals = [v.strip() for v in s.split(',') if v.strip()]
    bad = [v for v in vals if v not in valid]
    if bad or not vals:
        raise SystemExit(f'{flag}: unknown {bad or s!r}; choose from {list(valid)}')
    return vals


# ----------------------------------------------------------------------------------------
# machine
# ----------------------------------------------------------------------------------------
def cpu_info() -> dict:
    """CPU model name and the SIMD flags that decide onnxruntime's int8 kernels."""
    model, flags = platform.processor() or 'unknown', set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key = line.split(':', 1)[0].strip().lower()
                if key == 'model name':
                    model = line.split(':', 1)[1].strip()
                elif key == 'flags' and not flags:
                    flags = set(line.split(':', 1)[1].split())
    except OSError:
        pass
    keep = ('avx2', 'fma', 'avx512f', 'avx512bw', 'avx512_vnni', 'avx_vnni', 'amx_int8')
    return dict(model=model, flags=[f for f in keep if f in flags],
                vnni='avx512_vnni' in flags or 'avx_vnni' in flags,
                logical_cpus=os.cpu_count())


def machine_info(argv) -> dict:
    import onnxruntime as ort
    return dict(timestamp=datetime.datetime.now().isoformat(timespec='seconds'),
                command=shlex.join([sys.executable, osp.relpath(__file__, ROOT), *argv]),
                cpu=cpu_info(), platform=platform.platform(),
                python=platform.python_version(), torch=torch.__version__,
                onnxruntime=ort.__version__,
                env={k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY')},
                loadavg_start=list(os.getloadavg()))


# ----------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------
def build_model(name: str, w_bits: int, a_bits: int, shape, seed: int = 0):
    """The model of ``CONFIGS[name]`` at ``w_bits`` / ``a_bits``, random weights (PyTorch's
    default initialisation), LSQ step
    sizes initialised (``calibrate_lsq``) on 2 batches of random images of ``shape``."""
    from mmengine.config import Config

    from repq_mm.mm import calibrate_lsq, cli
    from repq_mm.mm.pipeline import build_repq_model
    cfg = Config.fromfile(str(ROOT / CONFIGS[name][0]))
    cli.prepare_cfg(cfg)
    torch.manual_seed(seed)
    model = build_repq_model(cfg, dict(w_bits=w_bits, a_bits=a_bits))
    g = torch.Generator().manual_seed(seed)
    batches = [dict(inputs=[torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
                            for _ in range(2)]) for _ in range(2)]
    calibrate_lsq(model, batches, 2, logger=None)
    return model.eval()


def _inputs(model, shape, batch: int, seed: int) -> torch.Tensor:
    """A preprocessed batch (what the exported graph takes) of random images."""
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=g) for _ in range(batch)]
    with torch.no_grad():
        return model.data_preprocessor(dict(inputs=imgs), False)['inputs'].float()


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------
def summarize(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1e3
    return dict(median_ms=float(np.median(a)), q1_ms=float(np.percentile(a, 25)),
                q3_ms=float(np.percentile(a, 75)), min_ms=float(a.min()), n=len(xs))


def interleaved(sessions: dict, feed: dict, warmup: int, repeats: int) -> dict:
    """Round-robin timing: every repeat runs each session once, the start rotating."""
    names = list(sessions)
    for r in range(warmup):
        for n in names:
            sessions[n].run(None, feed)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            sessions[n].run(None, feed)
            times[n].append(time.perf_counter() - t0)
    return {n: summarize(v) for n, v in times.items()}


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------
def variants(args) -> list[tuple[str, str, str]]:
    out = []
    for mode in args.modes:
        for form in args.forms:
            for wd in (args.weight_dtypes if form == 'fused' else ['int8']):
                out.append((mode, form, wd))
    return out


def _vname(mode: str, form: str, wd: str, args) -> str:
    name = mode
    if len(args.forms) > 1:
        name += f' {form}'
    if form == 'fused' and len(args.weight_dtypes) > 1:
        name += f' w:{wd}'
    return name


def bench_model(name: str, args, onnx_dir: str, log) -> tuple[dict, dict]:
    """Export and check every variant of one model; returns its results and the
    onnxruntime sessions to time."""
    from repq_mm.export import (compare_onnx, count_kernels, export_fp32_onnx, export_onnx,
                                ort_session)
    from repq_mm.mm.export import check_failures
    shape = QUICK_SIZES[name] if args.quick else CONFIGS[name][1]
    res = dict(model=name, config=CONFIGS[name][0], description=CONFIGS[name][2],
               input=list(shape), variants={})
    sessions, fp32_path, built = {}, None, {}
    for mode, form, wd in variants(args):
        vname = _vname(mode, form, wd, args)
        t0 = time.perf_counter()
        if mode not in built:               # one model per mode, shared by its forms
            built = {mode: build_model(name, *MODES[mode], shape)}
        model = built[mode]
        example = _inputs(model, shape, 1, 1)
        if fp32_path is None:      # the float reference: the same merged network
            fp32_path = osp.join(onnx_dir, f'{name}_fp32.onnx')
            fp = export_fp32_onnx(model, example, fp32_path)
            k = count_kernels(fp32_path, args.threads)
            res['fp32'] = dict(size=fp['size'], kernels=k)
            sessions['fp32'] = ort_session(fp32_path, True, args.threads,
                                           precise_u8s8=args.precise_u8s8)
        path = osp.join(onnx_dir, f'{name}_{mode}_{form}_{wd}.onnx')
        info = export_onnx(model, example, path, form=form,
                           weight_dtype=wd if form == 'fused' else 'auto')
        k = count_kernels(path, args.threads, args.precise_u8s8)
        v = dict(mode=mode, form=form, weight_dtype=wd if form == 'fused' else 'int8',
                 size=info['size'], quantized_layers=len(info['layers']),
                 uint8_weight_layers=sum(l['weights'] == 'uint8' for l in info['layers']),
                 integer_kernels=k['integer'], float_kernels=k['float'], ops=k['ops'],
                 expected=[l['kernel'] for l in info['layers']])
        if not args.no_check:
            x = _inputs(model, shape, 2, 2)
            c = compare_onnx(model, path, x, optimized=True, threads=args.threads)
            dep = c['deployed']
            v['check'] = dict(
                passed=not check_failures(c), failures=check_failures(c),
                max_abs=c['max_abs'], one_step=c['one_step'],
                codes_max_diff=max((s['max_diff'] for s in c['act_codes'].values()),
                                   default=0),
                deployed_max_abs=dep['max_abs'],
                deployed_codes_max_diff=max((s['max_diff'] for s in
                                             dep['act_codes'].values()), default=0),
                deployed_kernels=dep['kernels']['integer'])
        sessions[vname] = ort_session(path, True, args.threads, precise_u8s8=args.precise_u8s8)
        res['variants'][vname] = v
        log(f'{name} {vname}: {v["integer_kernels"]} integer kernels / '
            f'{v["quantized_layers"]} quantized layers, {v["float_kernels"]} float conv/'
            f'linear kernels left; check '
            f'{v["check"]["passed"] if "check" in v else "skipped"} '
            f'({time.perf_counter() - t0:.1f} s)')
    return res, sessions


def wait_for_quiet(args, log) -> list[float]:
    """With ``--wait-load``: poll until the 1-minute load average is below it (at most
    ``--wait-max`` seconds); returns the load averages when timing starts."""
    if args.wait_load is not None:
        t0 = time.time()
        while os.getloadavg()[0] >= args.wait_load and time.time() - t0 < args.wait_max:
            time.sleep(10)
        if os.getloadavg()[0] >= args.wait_load:
            log(f'load average still {_load(os.getloadavg())} after {args.wait_max} s; '
                'timing anyway')
    return list(os.getloadavg())


def time_model(res: dict, sessions: dict, args, log) -> None:
    """Latency of every session of one model at each batch size (interleaved)."""
    shape = res['input']
    res['latency'], res['load'] = {}, {'start': wait_for_quiet(args, log)}
    for bs in args.batch_sizes:
        reps = args.repeats or (3 if args.quick else (30 if bs == 1 else 10))
        g = torch.Generator().manual_seed(bs)
        feed = {sessions['fp32'].get_inputs()[0].name:
                torch.randn((bs, *shape), generator=g).numpy()}
        t = interleaved(sessions, feed, 1 if args.quick else args.warmup, reps)
        fp = t['fp32']['median_ms']
        for vname, tv in t.items():
            tv['ratio'] = tv['median_ms'] / fp
        res['latency'][str(bs)] = t
        log(f'{res["model"]} batch {bs}: ' + ', '.join(
            f'{n} {tv["median_ms"]:.2f} ms ({tv["ratio"]:.2f}x)' for n, tv in t.items()))
    res['load']['end'] = list(os.getloadavg())


def render_markdown(out: dict) -> str:
    m = out['machine']
    cpu = m['cpu']
    lines = [
        '# Deployment benchmark: integer ONNX vs float32 ONNX in onnxruntime', '',
        f'- command: `{m["command"]}`',
        f'- CPU: **{cpu["model"]}** ({cpu["logical_cpus"]} logical CPUs; flags: '
        f'{", ".join(cpu["flags"]) or "-"}; VNNI: {"yes" if cpu["vnni"] else "no"})',
        f'- onnxruntime {m["onnxruntime"]} (CPU execution provider, ORT_ENABLE_ALL, '
        f'{out["threads"]} intra-op threads, 1 inter-op, sequential'
        f'{", session.x64quantprecision=1" if out["precise_u8s8"] else ""}), torch '
        f'{m["torch"]}, Python {m["python"]}; OMP_NUM_THREADS={m["env"]["OMP_NUM_THREADS"]}',
        f'- load average (1/5/15 min) at start {_load(m["loadavg_start"])}, at end '
        f'{_load(m.get("loadavg_end"))}',
        f'- {m["timestamp"]}; random weights, LSQ step sizes initialised on random images '
        '(speed and kernel choice do not depend on trained values); latency = median of '
        'interleaved repeats (every repeat runs each session once, rotating start)', '']
    for r in out['results']:
        lines += [f'## {r["model"]}: {r["description"]}, input {"x".join(map(str, r["input"]))}',
                  '', f'config: `{r["config"]}`; FP32 model {r["fp32"]["size"] / 1e6:.2f} MB, '
                  f'{r["fp32"]["kernels"]["float"]} float conv/linear kernels; load average '
                  f'while timing: {_load(r["load"]["start"])} at start, '
                  f'{_load(r["load"]["end"])} at end', '']
        bss = list(r['latency'])
        head = ('| variant | weights | integer kernels / quantized layers | float conv/linear '
                'left | size MB | check (codes off, written / optimised graph) | ' +
                ' | '.join(f'batch {b}: FP32 ms | int8 ms | int8/FP32' for b in bss) + ' |')
        lines += [head, '|' + '---|' * (6 + 3 * len(bss))]
        for vname, v in r['variants'].items():
            c = v.get('check')
            chk = '-' if c is None else (
                f'{"pass" if c["passed"] else "FAIL"} ({c["codes_max_diff"]} / '
                f'{c["deployed_codes_max_diff"]})')
            wts = v['form'] if v['form'] == 'qdq' else \
                f'{v["weight_dtype"]} ({v["uint8_weight_layers"]} uint8)'
            cells = [vname, wts, f'{v["integer_kernels"]} / {v["quantized_layers"]}',
                     str(v['float_kernels']), f'{v["size"] / 1e6:.2f}', chk]
            for b in bss:
                t = r['latency'][b]
                cells += [f'{t["fp32"]["median_ms"]:.2f}', f'{t[vname]["median_ms"]:.2f}',
                          f'**{t[vname]["ratio"]:.2f}**']
            lines.append('| ' + ' | '.join(cells) + ' |')
        lines += ['', 'optimised-graph node counts (int8 variants): ' + '; '.join(
            f'{n}: ' + ', '.join(f'{k} {c}' for k, c in sorted(v['ops'].items()))
            for n, v in r['variants'].items()), '']
    return '\n'.join(lines) + '\n'


def _load(v) -> str:
    return '-' if not v else ' / '.join(f'{x:.2f}' for x in v)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault('OMP_NUM_THREADS', str(args.threads))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)
    out = dict(machine=machine_info(argv), threads=args.threads,
               precise_u8s8=args.precise_u8s8, quick=args.quick, results=[])
    log(f'CPU: {out["machine"]["cpu"]["model"]} (VNNI: {out["machine"]["cpu"]["vnni"]}); '
        f'load {_load(out["machine"]["loadavg_start"])}')
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = str(out_dir / 'onnx') if args.keep_onnx else tmp
        os.makedirs(onnx_dir, exist_ok=True)
        prepared = [bench_model(name, args, onnx_dir, log) for name in args.models]
        for res, sessions in prepared:      # all exports and checks first, then timing
            time_model(res, sessions, args, log)
            out['results'].append(res)
    out['machine']['loadavg_end'] = list(os.getloadavg())
    with open(out_dir / 'results.json', 'w') as f:
        json.dump(out, f, indent=1)
    md = render_markdown(out)
    with open(out_dir / 'results.md', 'w') as f:
        f.write(md)
    log(md)
    log(f'wrote {out_dir / "results.md"} and {out_dir / "results.json"}')
    return out


if __name__ == '__main__':
    main()
