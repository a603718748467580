#!/usr/bin/env python
"""Tree-detection experiments: FP / LSQ baseline / RepQ-BN / RepQ-BNEst at W8A8, W4A8, W4A4.

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
    python tools/det_experiments.py --fold 0 1 2 --bits 4 4a8   # all folds, then their summary
    python tools/det_experiments.py --fold 0 1 2 --summary-only # the summary of what finished

``--fold K`` trains and evaluates on fold ``K`` of the three disjoint 9-tile validation
folds (``annotations/instances_{train,val}_fold{K}.json``; fold 0 is the default split), the
FP model trained on that fold's training tiles, work root ``work_dirs/det_folds/fold{K}``.
With several folds they run one after the other and ``work_dirs/det_folds/<model>/summary.md``
(and ``summary.json``) gets every fold's numbers, mean ± std over the folds, and for every
method its paired difference to the LSQ baseline and to RepQ-BN with the fold-to-fold spread
of that difference (a difference "resolves" when it has the same sign on every fold and its
mean exceeds the standard deviation of the per-fold differences). ``--summary-only`` writes
the summary from the finished steps without running anything; steps not run are named.

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
from experiment_utils import (ROOT, add_lsq_impl_arg, bits_name, bits_spec,  # noqa: E402
                              cached, last_checkpoint, lsq_impl_opts, mean_std, run, save,
                              stock_test_tool)

MODELS = {   # config folder, config prefix, default methods
    'yolov6': ('yolov6_trees', 'yolov6-n',
               ['fp-ft', 'ptq', 'lsq', 'repq-bn', 'repq-bnest', 'repq-bnestc']),
    'yolov7': ('yolov7_trees', 'yolov7-tiny', ['fp-ft', 'ptq', 'lsq', 'repq-bn']),
}
METHODS = ['fp-ft', 'ptq', 'lsq', 'repq-bn', 'repq-bnest', 'repq-bnestc', 'repq-bnestk']
LABELS = {'fp': 'FP (multi-branch)',
          'fp-ft': 'FP + the quantized runs\' 30-epoch fine-tune (no quantization)',
          'ptq': 'PTQ (merged, calibrated only)',
          'lsq': 'LSQ baseline', 'repq-bn': 'RepQ-BN', 'repq-bnest': 'RepQ-BNEst',
          'repq-bnestc': 'RepQ-BNEst + correction every 8 steps',
          'repq-bnestk': 'RepQ-BNEst, Kronecker statistics'}
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


def config_path(args, method, bits=None) -> str:
    folder, prefix, _ = MODELS[args.model]
    if method == 'ptq':             # the LSQ baseline's model, calibrated, not trained
        method = 'lsq'
    name = (f'{prefix}_{method}_trees' if method in ('fp', 'fp-ft') else
            f'{prefix}_{method}_{bits_name(bits)}_trees')
    return osp.join(ROOT, 'configs', folder, name + '.py')


def config(args, method, bits=None):
    path = config_path(args, method, bits)
    if not osp.isfile(path):
        raise SystemExit(f'no config {path}')
    return osp.basename(path)[:-3], path


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
    tag = bits_name(bits).upper()
    wd = osp.join(args.work_root, f'ptq_{bits_name(bits)}')
    res = cached(wd, args.force)
    if res:
        print(f'  PTQ {tag}: reusing {wd}')
        return res
    out = run([sys.executable, 'tools/test.py', cfg, 'none', '--work-dir', wd,
               '--cfg-options', 'model.repq.method=ptq', f'model.init_checkpoint={fp_ckpt}',
               *opts, *lsq_impl_opts(args)],
              osp.join(wd, 'test.log'), f'PTQ {tag}: calibrate + test', args.threads)
    os.makedirs(wd, exist_ok=True)
    return save(wd, bbox_map(out, f'PTQ {tag}'))


def run_quant(args, method, bits, fp_ckpt, opts):
    if method == 'ptq':
        return run_ptq(args, bits, fp_ckpt, opts)
    name, cfg = config(args, method, bits)
    wd = osp.join(args.work_root, 'fp-ft' if method == 'fp-ft' else f'{method}_{bits_name(bits)}')
    res = cached(wd, args.force)
    if res:
        print(f'  {name}: reusing {wd}')
        return res
    py = sys.executable
    common = [f'model.init_checkpoint={fp_ckpt}', f'randomness.seed={args.seed}', *opts,
              *lsq_impl_opts(args)]
    label = 'FP fine-tune' if method == 'fp-ft' else f'{LABELS[method]} {bits_name(bits).upper()}'
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
        t = bits_name(b).upper()
        head += [f'{t} mAP', f'{t} mAP50', f'{t} merged mAP (stock test)', f'{t} merged mAP50']
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


def fold_root(args, fold) -> str:
    """Work root of one run: ``--work-root``, or the default of the split."""
    if fold is None:
        return args.work_root or osp.join(ROOT, 'work_dirs',
                                          'det_trees_quick' if args.quick else 'det_trees',
                                          args.model)
    return osp.join(args.folds_root, f'fold{fold}', args.model)


def run_split(args, fold) -> dict:
    """FP and every (method, bits) on one split; writes its results.md / results.json."""
    work_root = args.work_root = fold_root(args, fold)
    opts = (QUICK if args.quick else []) + fold_opts(fold)
    t0 = time.time()
    split = 'val' if fold is None else f'val fold {fold}'
    print(f'== {args.model} on the DeepForest tree tiles ({split})', flush=True)
    results = {'fp': run_fp(args, opts)}
    print(f'  FP: bbox mAP {results["fp"]["mAP"]:.3f}, mAP50 {results["fp"]["mAP50"]:.3f}',
          flush=True)
    for bits in args.bits:
        for m in args.methods:
            r = results[(m, bits)] = run_quant(args, m, bits, results['fp']['checkpoint'], opts)
            merged = (f' (merged, stock mmdet test: {r["merged_mAP"]:.3f} / '
                      f'{r["merged_mAP50"]:.3f})' if 'merged_mAP' in r else '')
            what = LABELS[m] + ('' if m == 'fp-ft' else f' {bits_name(bits).upper()}')
            print(f'  {what}: mAP {r["mAP"]:.3f} / mAP50 {r["mAP50"]:.3f}' + merged, flush=True)
    md = table(results, args.bits, args.methods)
    head = (f'DeepForest tree tiles ({split}: 9 tiles), {args.model}, COCO bbox mAP'
            f'{" (QUICK smoke run)" if args.quick else ""}, {time.time() - t0:.0f} s\n\n')
    print('\n' + head + md)
    os.makedirs(work_root, exist_ok=True)
    with open(osp.join(work_root, 'results.md'), 'w') as f:
        f.write(head + md + '\n')
    with open(osp.join(work_root, 'results.json'), 'w') as f:
        json.dump({('fp' if k == 'fp' else f'{k[0]}_{bits_name(k[1])}'): v
                   for k, v in results.items()}, f, indent=1)
    return results


def step_dir(method, bits) -> str:
    return method if method in ('fp', 'fp-ft') else f'{method}_{bits_name(bits)}'


def paired(a: dict, b: dict):
    """Per-fold differences ``a - b`` over the folds both have, their mean and standard
    deviation, and whether the difference resolves: at least two folds, the same sign on
    every fold, and a mean larger than the fold-to-fold standard deviation."""
    folds = sorted(set(a) & set(b))
    d = [a[k] - b[k] for k in folds]
    if len(d) < 2:
        return dict(folds=folds, diffs=d, mean=None, std=None, resolves=None)
    mean, std = statistics.mean(d), statistics.stdev(d)
    same_sign = all(x > 0 for x in d) or all(x < 0 for x in d)
    return dict(folds=folds, diffs=d, mean=mean, std=std,
                resolves=bool(same_sign and abs(mean) > std))


def fold_summary(folds_root, model, folds, bits_list, methods) -> tuple:
    """Markdown and JSON summary of the finished runs of ``folds`` (``result.json`` of every
    step under ``folds_root/fold{K}/model``): per-fold mAP, mean ± std, paired differences
    to the LSQ baseline and RepQ-BN. Returns (markdown, data, missing steps)."""
    rows, missing = [('fp', None)], []
    for b in bits_list:
        rows += [(m, b) for m in methods]
    rows = list(dict.fromkeys((m, None if m == 'fp-ft' else b) for m, b in rows))
    vals = {}                      # (method, bits) -> {metric: {fold: value}}
    for m, b in rows:
        per = vals[(m, b)] = {'mAP': {}, 'mAP50': {}, 'merged_equal': {}}
        for k in folds:
            path = osp.join(folds_root, f'fold{k}', model, step_dir(m, b), 'result.json')
            if not osp.isfile(path):
                missing.append(f'fold {k}: {step_dir(m, b)}')
                continue
            with open(path) as f:
                r = json.load(f)
            per['mAP'][k], per['mAP50'][k] = r['mAP'], r['mAP50']
            if 'merged_mAP' in r:
                per['merged_equal'][k] = (r['merged_mAP'] == r['mAP']
                                          and r['merged_mAP50'] == r['mAP50'])

    def label(m, b):
        return LABELS[m] + ('' if b is None else f' {bits_name(b).upper()}')

    head = ['method'] + [f'fold {k} mAP' for k in folds] + ['mean ± std mAP',
                                                             'mean ± std mAP50', 'merged = QAT']
    lines = ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
    for m, b in rows:
        v = vals[(m, b)]
        eq = v['merged_equal']
        merged = ('–' if not eq else
                  f'{"yes" if all(eq.values()) else "NO"} ({len(eq)} folds)')
        lines.append(f'| {label(m, b)} | ' + ' | '.join(
            f'{v["mAP"][k]:.3f}' if k in v['mAP'] else '–' for k in folds)
            + f' | {mean_std(list(v["mAP"].values()), 3)} | '
            f'{mean_std(list(v["mAP50"].values()), 3)} | {merged} |')
    diffs, dlines = {}, []
    for ref in ('lsq', 'repq-bn'):
        for m, b in rows:
            if b is None or m == ref or (ref, b) not in vals:
                continue
            p = paired(vals[(m, b)]['mAP'], vals[(ref, b)]['mAP'])
            diffs[f'{m}_{bits_name(b)} - {ref}_{bits_name(b)}'] = p
            if p['mean'] is None:
                continue
            res = 'yes' if p['resolves'] else 'no'
            dlines.append(f'| {label(m, b)} − {LABELS[ref]} | '
                          + ', '.join(f'{x:+.3f}' for x in p['diffs'])
                          + f' | {p["mean"]:+.3f} ± {p["std"]:.3f} | {res} |')
    md = '\n'.join(lines)
    if dlines:
        md += ('\n\nPaired differences in mAP (same fold, same FP model), per fold, mean ± std '
               'over the folds; "resolves": the same sign on every fold and |mean| > std.\n\n'
               '| difference | per fold | mean ± std | resolves |\n|---|---|---|---|\n'
               + '\n'.join(dlines))
    if missing:
        md += '\n\nNot run yet: ' + '; '.join(missing) + '.'
    data = dict(folds=list(folds), missing=missing, diffs=diffs,
                values={f'{m}' + ('' if b is None else f'_{bits_name(b)}'): v
                        for (m, b), v in vals.items()})
    return md, data, missing


def write_summary(args, folds):
    md, data, missing = fold_summary(args.folds_root, args.model, folds, args.bits,
                                     args.methods)
    out = osp.join(args.folds_root, args.model)
    os.makedirs(out, exist_ok=True)
    head = (f'DeepForest tree tiles, {args.model}, validation folds '
            f'{", ".join(map(str, folds))} (9 tiles each), COCO bbox mAP\n\n')
    with open(osp.join(out, 'summary.md'), 'w') as f:
        f.write(head + md + '\n')
    with open(osp.join(out, 'summary.json'), 'w') as f:
        json.dump(data, f, indent=1)
    print('\n' + head + md)
    print(f'\nsummary: {osp.join(out, "summary.md")}' +
          (f' ({len(missing)} steps not run yet)' if missing else ''))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='yolov6', choices=sorted(MODELS))
    ap.add_argument('--bits', type=bits_spec, nargs='+', default=[(8, 8), (4, 4)],
                    help='bit widths: 8, 4 (= W8A8, W4A4) or weight/activation widths '
                         '(4a8 = W4A8); default 8 4')
    ap.add_argument('--methods', nargs='*', default=None, choices=METHODS,
                    help='default: every method with a config for --model')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--fp-checkpoint', help='use this FP checkpoint instead of training one')
    ap.add_argument('--work-root', help='default: work_dirs/det_trees[_quick]/<model> '
                                        '(not with --fold: see --folds-root)')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--quick', action='store_true',
                    help='1 iteration on 4 training tiles, 2 val tiles (smoke test)')
    ap.add_argument('--timing', type=int, metavar='N',
                    help='only measure s/iteration of every config over N iterations')
    ap.add_argument('--fold', type=int, nargs='+', choices=(0, 1, 2), default=None,
                    help='validation fold(s) (default: the configs\' split, = fold 0); '
                         'several: run them in turn, then write the summary over them')
    ap.add_argument('--folds-root', help='work root of the fold runs: FOLDS_ROOT/foldK/<model>,'
                                         ' summary in FOLDS_ROOT/<model> (default: '
                                         'work_dirs/det_folds[_quick])')
    ap.add_argument('--summary-only', action='store_true',
                    help='with --fold: only write the summary of the finished steps')
    ap.add_argument('--force', action='store_true', help='recompute finished steps')
    add_lsq_impl_arg(ap)
    args = ap.parse_args(argv)
    if args.methods is None:
        args.methods = MODELS[args.model][2]
    missing_cfg = sorted({config_path(args, m, b) for b in args.bits for m in args.methods
                          if not osp.isfile(config_path(args, m, b))})
    if missing_cfg:
        ap.error('no config for ' + ', '.join(osp.relpath(p, ROOT) for p in missing_cfg))
    if args.fold is not None and args.work_root:
        ap.error('--work-root is for runs without --fold; fold runs go to '
                 '--folds-root/foldK/<model>')
    if args.summary_only and args.fold is None:
        ap.error('--summary-only needs --fold')
    if args.fold is not None and args.fp_checkpoint and len(args.fold) > 1:
        ap.error('--fp-checkpoint with several folds: every fold trains its own FP model')
    args.folds_root = osp.abspath(args.folds_root or osp.join(
        ROOT, 'work_dirs', 'det_folds_quick' if args.quick else 'det_folds'))
    if args.work_root:
        args.work_root = osp.abspath(args.work_root)
    if args.timing:
        args.work_root = fold_root(args, None)
        return timing(args)
    folds = args.fold or [None]
    if not args.summary_only:
        for k in folds:
            run_split(args, k)
    if args.fold is not None and (len(folds) > 1 or args.summary_only):
        write_summary(args, folds)
    return 0


if __name__ == '__main__':
    sys.exit(main())
