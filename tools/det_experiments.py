#!/usr/bin/env python
"""Tree-detection experiments: FP / LSQ baseline / RepQ-BN / RepQ-BNEst at W8A8 and W4A4.

Train (or reuse) the full-precision YOLOv6-style (or YOLOv7-style) detector on the DeepForest
tree tiles (``tools/dataset_converters/deepforest_trees.py``), then for every bit width and
method fine-tune quantization-aware from it, evaluate the QAT model with ``tools/test.py``,
merge it with ``tools/merge_quant.py`` and evaluate the merged checkpoint with the stock
mmdet ``tools/test.py`` (COCO bbox mAP / mAP50 from mmdet's CocoMetric). Prints and writes a
Markdown table to ``WORK_ROOT/<model>/results.md`` and all numbers to ``results.json``.

    python tools/det_experiments.py                          # YOLOv6-n style, W8A8 + W4A4
    python tools/det_experiments.py --model yolov7 --methods repq-bn --bits 8
    python tools/det_experiments.py --quick                  # 1 iteration on 4 tiles (tests)
    python tools/det_experiments.py --timing 6               # s/iteration of every config
    python tools/det_experiments.py --fold 1                 # on validation fold 1 of 3

``--fold K`` trains and evaluates on fold ``K`` of the three disjoint 9-tile validation
folds (``annotations/instances_{train,val}_fold{K}.json``; fold 0 is the default split), the
FP model trained on that fold's training tiles, work root ``work_dirs/det_folds/fold{K}``.

Every step runs as a subprocess with its log in its work dir; finished steps (a
``result.json`` next to their log) are reused unless ``--force``.
"""
import argparse
import json
import os
import os.path as osp
import re
import statistics
import sys
import time

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from experiment_utils import (ROOT, add_lsq_impl_arg, cached, last_checkpoint,  # noqa: E402
                              lsq_impl_opts, run, save, stock_test_tool)

MODELS = {
    'yolov6': ('yolov6_trees', 'yolov6-n', ['fp-ft', 'ptq', 'lsq', 'repq-bn', 'repq-bnest']),
    'yolov7': ('yolov7_trees', 'yolov7-tiny', ['fp-ft', 'ptq', 'lsq', 'repq-bn']),
}
METHODS = ['fp-ft', 'ptq', 'lsq', 'repq-bn', 'repq-bnest']
LABELS = {'fp': 'FP (multi-branch)',
          'fp-ft': 'FP + the quantized runs\' 30-epoch fine-tune (no quantization)',
          'ptq': 'PTQ (merged, calibrated only)',
          'lsq': 'LSQ baseline', 'repq-bn': 'RepQ-BN', 'repq-bnest': 'RepQ-BNEst'}
MAP_RE = re.compile(r'coco/bbox_mAP:\s*([0-9.]+)')
MAP50_RE = re.compile(r'coco/bbox_mAP_50:\s*([0-9.]+)')
ITER_TIME_RE = re.compile(r'Epoch\(train\).*?\btime:\s*([0-9.]+)')
QUICK = ['train_dataloader.dataset.indices=4', 'val_dataloader.dataset.indices=2',
         'test_dataloader.dataset.indices=2', 'train_cfg.max_epochs=1',
         'train_cfg.val_interval=1', 'default_hooks.logger.interval=1']


def fold_opts(fold) -> list:
    """``--cfg-options`` for validation fold ``fold`` (``None``: the configs' own split)."""
    if fold is None:
        return []
    ann = {split: f'annotations/instances_{split}_fold{fold}.json' for split in ('train', 'val')}
    for a in ann.values():
        if not osp.isfile(osp.join(ROOT, 'data', 'trees', a)):
            raise SystemExit(f'no data/trees/{a}: run tools/dataset_converters/deepforest_trees.py')
    return [f'train_dataloader.dataset.ann_file={ann["train"]}',
            f'val_dataloader.dataset.ann_file={ann["val"]}',
            f'test_dataloader.dataset.ann_file={ann["val"]}',
            f'val_evaluator.ann_file=data/trees/{ann["val"]}',
            f'test_evaluator.ann_file=data/trees/{ann["val"]}']


def bbox_map(output: str, what: str) -> dict:
    m, m50 = MAP_RE.findall(output), MAP50_RE.findall(output)
    if not m or not m50:
        raise SystemExit(f'no coco/bbox_mAP in the output of {what}')
    return dict(mAP=float(m[-1]), mAP50=float(m50[-1]))


def iter_time(output: str):
    """Median logged training time per iteration (s), first logged window excluded."""
    t = [float(x) for x in ITER_TIME_RE.findall(output)]
    t = t[1:] if len(t) > 1 else t
    return statistics.median(t) if t else None


def config(args, method, bits=None):
    folder, prefix, _ = MODELS[args.model]
    if method == 'ptq':             # the LSQ baseline's model, calibrated, not trained
        method = 'lsq'
    name = (f'{prefix}_{method}_trees' if method in ('fp', 'fp-ft') else
            f'{prefix}_{method}_w{bits}a{bits}_trees')
    path = osp.join(ROOT, 'configs', folder, name + '.py')
    if not osp.isfile(path):
        raise SystemExit(f'no config {path}')
    return name, path


def run_fp(args, opts):
    wd = osp.join(args.work_root, 'fp')
    res = cached(wd, args.force)
    if res:
        print(f'  FP: reusing {wd}')
        return res
    if args.fp_checkpoint:
        ckpt = osp.abspath(args.fp_checkpoint)
        res = dict(checkpoint=ckpt)
    else:
        py = sys.executable
        _, cfg = config(args, 'fp')
        out = run([py, 'tools/train.py', cfg, '--work-dir', wd, '--cfg-options',
                   f'randomness.seed={args.seed}', *opts], osp.join(wd, 'train.log'),
                  f'train FP {args.model}', args.threads)
        ckpt = last_checkpoint(wd)
        res = dict(checkpoint=ckpt, s_per_iter=iter_time(out))
    _, cfg = config(args, 'fp')
    out = run([sys.executable, 'tools/test.py', cfg, ckpt, '--work-dir', osp.join(wd, 'test'),
               *(['--cfg-options', *opts] if opts else [])], osp.join(wd, 'test.log'),
              'test FP', args.threads)
    res.update(bbox_map(out, 'FP test'))
    os.makedirs(wd, exist_ok=True)
    return save(wd, res)


def run_ptq(args, bits, fp_ckpt, opts):
    """Post-training quantization: the merged FP model, step sizes calibrated on 4
    training batches (LSQCalibHook), evaluated with ``tools/test.py CONFIG none``."""
    name, cfg = config(args, 'ptq', bits)
    wd = osp.join(args.work_root, f'ptq_w{bits}a{bits}')
    res = cached(wd, args.force)
    if res:
        print(f'  PTQ W{bits}A{bits}: reusing {wd}')
        return res
    out = run([sys.executable, 'tools/test.py', cfg, 'none', '--work-dir', wd,
               '--cfg-options', 'model.repq.method=ptq', f'model.init_checkpoint={fp_ckpt}',
               *opts, *lsq_impl_opts(args)],
              osp.join(wd, 'test.log'), f'PTQ W{bits}A{bits}: calibrate + test', args.threads)
    os.makedirs(wd, exist_ok=True)
    return save(wd, bbox_map(out, f'PTQ W{bits}A{bits}'))


def run_quant(args, method, bits, fp_ckpt, opts):
    if method == 'ptq':
        return run_ptq(args, bits, fp_ckpt, opts)
    name, cfg = config(args, method, bits)
    wd = osp.join(args.work_root, 'fp-ft' if method == 'fp-ft' else f'{method}_w{bits}a{bits}')
    res = cached(wd, args.force)
    if res:
        print(f'  {name}: reusing {wd}')
        return res
    py = sys.executable
    common = [f'model.init_checkpoint={fp_ckpt}', f'randomness.seed={args.seed}', *opts,
              *lsq_impl_opts(args)]
    label = 'FP fine-tune' if method == 'fp-ft' else f'{LABELS[method]} W{bits}A{bits}'
    out = run([py, 'tools/train.py', cfg, '--work-dir', wd, '--cfg-options', *common],
              osp.join(wd, 'train.log'), f'{label}: QAT', args.threads)
    res = dict(s_per_iter=iter_time(out))
    ckpt = last_checkpoint(wd)
    out = run([py, 'tools/test.py', cfg, ckpt, '--work-dir', osp.join(wd, 'test'),
               '--cfg-options', *common], osp.join(wd, 'test.log'), f'{label}: test QAT',
              args.threads)
    res.update(bbox_map(out, label), checkpoint=ckpt)
    mdir = osp.join(wd, 'merged')
    out = run([py, 'tools/merge_quant.py', cfg, ckpt, mdir, '--overwrite',
               '--cfg-options', *common], osp.join(wd, 'merge.log'),
              f'{label}: merge_quant', args.threads)
    check = [ln for ln in out.splitlines() if ln.startswith('max abs diff')]
    if check:
        print('      ' + check[-1][:300])
    out = run([py, stock_test_tool('mmdet'), osp.join(mdir, 'deploy_config.py'),
               osp.join(mdir, 'merged.pth'), '--work-dir', osp.join(mdir, 'test')],
              osp.join(wd, 'test_merged.log'), f'{label}: stock mmdet test of the merged '
              'model', args.threads)
    merged = bbox_map(out, label + ' merged')
    res.update(merged_mAP=merged['mAP'], merged_mAP50=merged['mAP50'])
    return save(wd, res)


def timing(args):
    """Train every config for ``args.timing`` iterations at its real size (no validation,
    no checkpoint use) and report the median s/iteration."""
    n = args.timing
    opts = [f'train_dataloader.dataset.indices={4 * (n + 1)}', 'train_cfg.max_epochs=1',
            'train_cfg.val_interval=100', 'default_hooks.logger.interval=1',
            'default_hooks.checkpoint.interval=100', 'log_processor.window_size=1']
    rows = []
    jobs = [('fp', None)] + [(m, b) for b in args.bits for m in args.methods if m != 'ptq']
    for method, bits in jobs:
        name, cfg = config(args, method, bits)
        wd = osp.join(args.work_root, 'timing', name)
        extra = [] if method == 'fp' else ['model.init_checkpoint=None']
        out = run([sys.executable, 'tools/train.py', cfg, '--work-dir', wd, '--no-validate',
                   '--cfg-options', *opts, *extra], osp.join(wd, 'train.log'),
                  f'timing {name}', args.threads)
        t = iter_time(out)
        rows.append((name, t))
        print(f'      {name}: {t:.2f} s/iteration (batch 4, 416 px, {args.threads} threads)',
              flush=True)
    md = '| config | s / iteration |\n|---|---|\n' + '\n'.join(
        f'| {n} | {t:.2f} |' for n, t in rows)
    print('\n' + md)
    os.makedirs(args.work_root, exist_ok=True)
    with open(osp.join(args.work_root, 'timing.md'), 'w') as f:
        f.write(md + '\n')
    return 0


def fmt(res, key):
    v = res.get(key) if res else None
    return '–' if v is None else f'{v:.3f}'


def table(results, bits_list, methods):
    head = ['method']
    for b in bits_list:
        head += [f'W{b}A{b} mAP', f'W{b}A{b} mAP50', f'W{b}A{b} merged mAP (stock test)',
                 f'W{b}A{b} merged mAP50']
    lines = ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
    fp = results['fp']
    lines.append(f'| {LABELS["fp"]} | ' + ' | '.join(
        f'{fmt(fp, "mAP")} | {fmt(fp, "mAP50")} | – | –' for _ in bits_list) + ' |')
    for m in methods:
        cells = []
        for b in bits_list:
            r = results.get((m, b))
            cells.append(' | '.join(fmt(r, k) for k in ('mAP', 'mAP50', 'merged_mAP',
                                                          'merged_mAP50')))
        lines.append(f'| {LABELS[m]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='yolov6', choices=sorted(MODELS))
    ap.add_argument('--bits', type=int, nargs='+', default=[8, 4])
    ap.add_argument('--methods', nargs='*', default=None, choices=METHODS,
                    help='default: every method with a config for --model')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--fp-checkpoint', help='use this FP checkpoint instead of training one')
    ap.add_argument('--work-root', help='default: work_dirs/det_trees[_quick]/<model>')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--quick', action='store_true',
                    help='1 iteration on 4 training tiles, 2 val tiles (smoke test)')
    ap.add_argument('--timing', type=int, metavar='N',
                    help='only measure s/iteration of every config over N iterations')
    ap.add_argument('--fold', type=int, choices=(0, 1, 2), default=None,
                    help='validation fold (default: the configs\' split, = fold 0)')
    ap.add_argument('--force', action='store_true', help='recompute finished steps')
    add_lsq_impl_arg(ap)
    args = ap.parse_args(argv)
    if args.methods is None:
        args.methods = MODELS[args.model][2]
    if args.work_root is None:
        root = 'det_trees_quick' if args.quick else 'det_trees'
        if args.fold is not None:
            root = osp.join('det_folds' + ('_quick' if args.quick else ''), f'fold{args.fold}')
        args.work_root = osp.join(ROOT, 'work_dirs', root, args.model)
    args.work_root = osp.abspath(args.work_root)
    if args.timing:
        return timing(args)
    opts = (QUICK if args.quick else []) + fold_opts(args.fold)
    t0 = time.time()
    print(f'== {args.model} on the DeepForest tree tiles', flush=True)
    results = {'fp': run_fp(args, opts)}
    print(f'  FP: bbox mAP {results["fp"]["mAP"]:.3f}, mAP50 {results["fp"]["mAP50"]:.3f}',
          flush=True)
    for bits in args.bits:
        for m in args.methods:
            r = results[(m, bits)] = run_quant(args, m, bits, results['fp']['checkpoint'], opts)
            merged = (f' (merged, stock mmdet test: {r["merged_mAP"]:.3f} / '
                      f'{r["merged_mAP50"]:.3f})' if 'merged_mAP' in r else '')
            what = LABELS[m] + ('' if m == 'fp-ft' else f' W{bits}A{bits}')
            print(f'  {what}: mAP {r["mAP"]:.3f} / mAP50 {r["mAP50"]:.3f}' + merged, flush=True)
    md = table(results, args.bits, args.methods)
    split = 'val' if args.fold is None else f'val fold {args.fold}'
    head = (f'DeepForest tree tiles ({split}: 9 tiles), {args.model}, COCO bbox mAP'
            f'{" (QUICK smoke run)" if args.quick else ""}, {time.time() - t0:.0f} s\n\n')
    print('\n' + head + md)
    os.makedirs(args.work_root, exist_ok=True)
    with open(osp.join(args.work_root, 'results.md'), 'w') as f:
        f.write(head + md + '\n')
    with open(osp.join(args.work_root, 'results.json'), 'w') as f:
        json.dump({('fp' if k == 'fp' else f'{k[0]}_w{k[1]}a{k[1]}'): v
                   for k, v in results.items()}, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
