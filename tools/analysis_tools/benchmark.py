#!/usr/bin/env python
"""Training / inference cost of RepQ against full precision and the LSQ baseline.

Measures, in ONE process and INTERLEAVED (each repeat runs every variant once, in a
rotating order, so machine drift hits all variants alike):

* training step time (forward + backward + SGD step) of

  - ``fp_multibranch``: the full-precision net as built (multi-branch, BN, train mode);
  - ``fp_merged``: every rep block merged (``merge_model``: plain conv, no BN): the floor;
  - ``lsq``: merged net + LSQ fake quantizers on every conv/linear (the paper's baseline);
  - ``repq_bn``: RepQ with exact batch statistics (``bn_mode='exact'``);
  - ``repq_est``: RepQ-BNEst (``bn_mode='est'``);
  - optional extras ``repq_estc8`` (BNEst + exact statistics every 8 steps),
    ``repq_bn_noquant`` / ``repq_est_noquant`` (merged RepQ forward without quantizers, to
    isolate the fake-quant cost);

  every variant made with ``repq_mm.convert_to_repq`` / ``merge_model``;
* with ``--compile [MODE]``: every selected training variant also compiled
  (``torch.compile`` of the whole training step, as mmengine's ``compile=True`` compiles
  ``model.train_step``; backend ``--compile-backend``, default inductor), timed in the same
  interleaved rounds as the eager steps, with its compile time (first call, and the warm-up
  calls until the times settle), the speed-up and the ratios of the compiled targets;
  ``--profile --compile`` profiles the compiled step too;
* peak memory of one training step (CUDA: ``torch.cuda.max_memory_allocated`` minus the
  allocation before the step, eager and compiled; CPU: one fresh subprocess per eager
  variant, peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) minus RSS before
  the step);
* inference latency / throughput (eval, ``no_grad``) of the train-form FP net, the deployed
  FP net, the RepQ net in eval mode and the deployed net with fake quantizers (``QConv2d``);
* the time to merge the model (``to_deploy`` over all blocks, ``merge_model``).

Only torch (+ optional matplotlib) and the repq_mm core are imported unconditionally;
mmpretrain only for ``--model mmpretrain:...`` or the optional mmpretrain reference
variants, mmdet for the detectors. The code lives in ``tools/analysis_tools/bench/``
(variants, measure, profile, report, sections); this script is its command line.

Examples::

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python tools/analysis_tools/benchmark.py
    python tools/analysis_tools/benchmark.py --model block --channels 64 --input-size 32
    python tools/analysis_tools/benchmark.py --device cuda --batch-size 64 --input-size 224
    python tools/analysis_tools/benchmark.py --profile-only --profile-variant repq_bn,repq_est
    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python tools/analysis_tools/benchmark.py \\
        --compile --variants fp_multibranch,fp_merged,lsq,repq_bn,repq_est
    python tools/analysis_tools/benchmark.py --device cuda --compile --batch-size 64
    python tools/analysis_tools/benchmark.py --model yolov6 --input-size 416 --batch-size 4 \\
        --warmup 2 --repeats 5 --compile --profile --profile-variant repq_est
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, Path(__file__).resolve().parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from bench import sections  # noqa: E402
from bench.measure import (COMPILE_MODES, MIB, Trainer, cpu_step_memory,  # noqa: E402,F401
                           interleaved, loss_fn, machine_info, recompile_limit, summarize,
                           timed)
from bench.report import plot, render_markdown, write  # noqa: E402,F401
from bench.variants import (DEFAULT_TRAIN, DETECTORS, INFER_VARIANTS,  # noqa: E402,F401
                            MERGE_OPS, TRAIN_VARIANTS, build_mm_repvgg, build_model,
                            make_inputs, make_variant, mmpretrain_available)
from repq_mm.models import REPVGG_ARCHS  # noqa: E402
from repq_mm.quant import QConfig  # noqa: E402


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
    p.add_argument('--compile', nargs='?', const='default', default=None,
                   choices=COMPILE_MODES, metavar='MODE',
                   help='also measure every training variant with its whole step compiled '
                        '(torch.compile mode MODE, default "default"), side by side with '
                        f'eager; modes: {", ".join(COMPILE_MODES)}')
    p.add_argument('--compile-backend', default=None,
                   help='torch.compile backend for --compile (default inductor; "eager" / '
                        '"aot_eager" check graph capture without code generation)')
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
                   help='after the benchmark, torch.profiler on one training step '
                        '(with --compile: of the compiled step too)')
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
    if args.compile_backend is not None and args.compile is None:
        p.error('--compile-backend needs --compile')
    if args.compile is not None:
        args.compile_backend = args.compile_backend or 'inductor'
        known = torch.compiler.list_backends(exclude_tags=())
        if args.compile_backend not in known:
            p.error(f'unknown --compile-backend {args.compile_backend!r}; torch has {known}')
    if args.profile_only:
        args.profile = True
    return args


def _mem_child(args, device) -> int:
    """Subprocess entry: build one variant, print its step memory as JSON, exit."""
    torch.manual_seed(args.seed)
    base, _ = build_model(args)
    mm = (build_mm_repvgg(args.model, args.num_classes, args.in_channels)
          if args.mem_child.startswith('mm_') else None)
    qcfg = QConfig(w_bits=args.w_bits, a_bits=args.a_bits, per_channel=args.per_channel)
    model = make_variant(args.mem_child, base.to(device), qcfg, mm_model=mm).to(device)
    del base
    x, target = make_inputs(args, device)
    tr = Trainer(model, x, target, args.lr)
    tr.step()                                      # optimizer state, allocator warm
    print('MEMCHILD ' + json.dumps(cpu_step_memory(tr)), flush=True)
    return 0


def _config(args, desc, device) -> dict:
    cfg = dict(model=args.model, model_desc=desc, batch_size=args.batch_size,
               in_channels=args.in_channels if args.model != 'block' else args.channels,
               input_size=args.input_size, device=str(device), warmup=args.warmup,
               repeats=args.repeats, inner=args.inner, w_bits=args.w_bits,
               a_bits=args.a_bits, per_channel=args.per_channel, lr=args.lr,
               variants=args.variants)
    if args.compile:
        cfg['compile'] = dict(mode=args.compile, backend=args.compile_backend)
    return cfg


def _context(args, base, device, res, log) -> sections.Context:
    """The batch, the quantizer settings and the mmpretrain reference model (which adds
    the ``mm_fp_multibranch`` variant) for a built model."""
    qcfg = QConfig(w_bits=args.w_bits, a_bits=args.a_bits, per_channel=args.per_channel)
    x, target = make_inputs(args, device)
    log(f'model: {res["config"]["model_desc"]}\ninput: {tuple(x.shape)} on {device}, threads '
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
    if mm_model is None:
        args.variants = [v for v in args.variants if v != 'mm_fp_multibranch']
    return sections.Context(base.to(device), qcfg, x, target, device, mm_model)


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

    res = dict(meta=machine_info(device, argv, __file__), notes=[])
    torch.manual_seed(args.seed)
    base, desc = build_model(args)
    res['config'] = _config(args, desc, device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if base is None:
        log(desc)
        res['notes'].append(desc)
        res['skipped'] = True
        write(res, out_dir, log)
        return res
    ctx = _context(args, base, device, res, log)
    with (recompile_limit(4 * len(args.variants) + 8) if args.compile
          else contextlib.nullcontext()):
        if not args.profile_only and not args.skip_train:
            sections.train(args, argv, str(Path(__file__).resolve()), ctx, res, log)
        if not args.profile_only and not args.skip_infer:
            sections.infer(args, ctx, res, log)
        if not args.profile_only and not args.skip_merge:
            sections.merge(args, ctx, res, log)
        if args.profile:
            sections.profile(args, ctx, res, out_dir, log)
    try:
        res['meta']['loadavg_end'] = os.getloadavg()
    except OSError:
        pass
    write(res, out_dir, log)
    return res


if __name__ == '__main__':
    main()
