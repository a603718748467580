#!/usr/bin/env python
"""Fashion-MNIST experiments: FP / PTQ / LSQ baseline / RepQ-BN / RepQ-BNEst at W8A8 and W4A4.

For every seed: train (or reuse) the full-precision RepVGG, then for every bit width and
method fine-tune quantization-aware from it (PTQ: calibrate only), evaluate the QAT model
with ``tools/test.py``, merge it with ``tools/merge_quant.py`` and evaluate the merged
checkpoint with the stock mmpretrain ``tools/test.py``. Prints and writes a Markdown table
(mean ± std over seeds) to ``WORK_ROOT/results.md`` and all numbers to ``results.json``.

    python tools/fmnist_experiments.py --seeds 0 1 2            # the README results
    python tools/fmnist_experiments.py --seeds 0                # the main job (one seed)
    python tools/fmnist_experiments.py --quick                  # a few iterations (tests)

Every step runs as a subprocess with its log in its work dir; finished steps (a
``result.json`` next to their log) are reused unless ``--force``.
"""
import argparse
import json
import os
import os.path as osp
import re
import sys
import time

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from experiment_utils import (ROOT, add_lsq_impl_arg, bits_name, bits_spec,  # noqa: E402
                              cached, cfg_opts, lsq_impl_opts, mean_std, run, save,
                              stock_test_tool, train)

CFG_DIR = osp.join(ROOT, 'configs', 'repvgg_fmnist')
METHODS = ['ptq', 'lsq', 'repq-bn', 'repq-bnest', 'repq-bnestc', 'repq-bnestk']
DEFAULT_METHODS = METHODS[:5]
LABELS = {'fp': 'FP (multi-branch)', 'ptq': 'PTQ (merged)', 'lsq': 'LSQ baseline',
          'repq-bn': 'RepQ-BN', 'repq-bnest': 'RepQ-BNEst',
          'repq-bnestc': 'RepQ-BNEst + correction every 8 steps (ours)',
          'repq-bnestk': 'RepQ-BNEst, Kronecker statistics (ours)'}
ACC_RE = re.compile(r'accuracy/top1:\s*([0-9.]+)')
QUICK = ['train_dataloader.dataset.indices=512', 'val_dataloader.dataset.indices=500',
         'test_dataloader.dataset.indices=500', 'train_cfg.max_epochs=1',
         'default_hooks.logger.interval=1']


def accuracy(output: str, what: str) -> float:
    found = ACC_RE.findall(output)
    if not found:
        raise SystemExit(f'no accuracy/top1 in the output of {what}')
    return float(found[-1])


def run_fp(args, seed, opts):
    wd = osp.join(args.work_root, f'seed{seed}', 'fp')
    res = cached(wd, args.force)
    if res:
        print(f'  FP seed {seed}: reusing {wd}')
        return res
    py = sys.executable
    cfg = osp.join(CFG_DIR, 'repvgg-A0w16_fp_fmnist.py')
    ckpt = train([py, 'tools/train.py', cfg, '--work-dir', wd, '--cfg-options',
                  f'randomness.seed={seed}', *opts], wd, f'train FP RepVGG (seed {seed})',
                 args.threads)
    out = run([py, 'tools/test.py', cfg, ckpt, '--work-dir', osp.join(wd, 'test'),
               *cfg_opts(opts)], osp.join(wd, 'test.log'), 'test FP', args.threads)
    return save(wd, dict(acc=accuracy(out, 'FP test'), checkpoint=ckpt))


def run_quant(args, seed, method, bits, fp_ckpt, opts):
    name = f'repvgg-A0w16_{method}_{bits_name(bits)}_fmnist'
    wd = osp.join(args.work_root, f'seed{seed}', f'{method}_{bits_name(bits)}')
    res = cached(wd, args.force)
    if res:
        print(f'  {name} seed {seed}: reusing {wd}')
        return res
    py = sys.executable
    cfg = osp.join(CFG_DIR, name + '.py')
    common = [f'model.init_checkpoint={fp_ckpt}', f'randomness.seed={seed}', *opts,
              *lsq_impl_opts(args)]
    label = f'{LABELS[method]} {bits_name(bits).upper()} (seed {seed})'
    if method == 'ptq':  # calibrate + evaluate, no training
        out = run([py, 'tools/test.py', cfg, 'none', '--work-dir', wd,
                   '--cfg-options', *common], osp.join(wd, 'test.log'), f'{label}: calibrate '
                  '+ test', args.threads)
        return save(wd, dict(acc=accuracy(out, label)))
    ckpt = train([py, 'tools/train.py', cfg, '--work-dir', wd, '--cfg-options', *common], wd,
                 f'{label}: QAT', args.threads)
    out = run([py, 'tools/test.py', cfg, ckpt, '--work-dir', osp.join(wd, 'test'),
               '--cfg-options', *common], osp.join(wd, 'test.log'), f'{label}: test QAT',
              args.threads)
    res = dict(acc=accuracy(out, label), checkpoint=ckpt)
    if method != 'lsq' or args.merge_all:
        mdir = osp.join(wd, 'merged')
        out = run([py, 'tools/merge_quant.py', cfg, ckpt, mdir, '--overwrite',
                   '--cfg-options', *common], osp.join(wd, 'merge.log'),
                  f'{label}: merge_quant', args.threads)
        print('      ' + '\n      '.join(l for l in out.splitlines() if 'max' in l.lower())[-400:])
        out = run([py, stock_test_tool('mmpretrain'), osp.join(mdir, 'deploy_config.py'),
                   osp.join(mdir, 'merged.pth'), '--work-dir', osp.join(mdir, 'test'),
                   *cfg_opts(opts)],
                  osp.join(wd, 'test_merged.log'), f'{label}: stock mmpretrain test of the '
                  'merged model', args.threads)
        res['merged_acc'] = accuracy(out, label + ' merged')
    return save(wd, res)


def table(results, seeds, bits_list):
    heads = [bits_name(b).upper() for b in bits_list]
    lines = ['| method | ' + ' | '.join(f'{h} top-1 (%)' for h in heads) +
             ' | ' + ' | '.join(f'{h} merged, stock test (%)' for h in heads) + ' |',
             '|---' * (1 + 2 * len(bits_list)) + '|']
    fp = [results[s]['fp']['acc'] for s in seeds]
    lines.append(f'| {LABELS["fp"]} | ' + ' | '.join(mean_std(fp) for _ in bits_list) + ' | ' +
                 ' | '.join('–' for _ in bits_list) + ' |')
    for m in METHODS:
        if not any((m, b) in results[s] for s in seeds for b in bits_list):
            continue
        accs = [mean_std([results[s][(m, b)]['acc'] for s in seeds if (m, b) in results[s]])
                for b in bits_list]
        merged = [mean_std([results[s][(m, b)]['merged_acc'] for s in seeds
                       if 'merged_acc' in results[s].get((m, b), {})]) for b in bits_list]
        lines.append(f'| {LABELS[m]} | ' + ' | '.join(accs) + ' | ' + ' | '.join(merged) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--seeds', type=int, nargs='+', default=[0])
    ap.add_argument('--bits', type=bits_spec, nargs='+', default=[(8, 8), (4, 4)],
                    help='bit widths: 8, 4 (weights = activations) or 4a8 (4-bit weights, '
                    '8-bit activations)')
    ap.add_argument('--methods', nargs='*', default=DEFAULT_METHODS, choices=METHODS)
    ap.add_argument('--work-root', default=osp.join(ROOT, 'work_dirs', 'fmnist'))
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--quick', action='store_true',
                    help='512 training images, 1 epoch, 500 test images (smoke test)')
    ap.add_argument('--merge-all', action='store_true', help='also merge the LSQ baseline')
    ap.add_argument('--force', action='store_true', help='recompute finished steps')
    add_lsq_impl_arg(ap)
    args = ap.parse_args(argv)
    opts = QUICK if args.quick else []
    t0 = time.time()
    results = {}
    for seed in args.seeds:
        print(f'== seed {seed}', flush=True)
        r = results[seed] = {'fp': run_fp(args, seed, opts)}
        print(f'  FP top-1 {r["fp"]["acc"]:.2f}', flush=True)
        for bits in args.bits:
            for m in args.methods:
                r[(m, bits)] = run_quant(args, seed, m, bits, r['fp']['checkpoint'], opts)
                msg = (f'  {LABELS[m]} {bits_name(bits).upper()}: '
                       f'top-1 {r[(m, bits)]["acc"]:.2f}')
                if 'merged_acc' in r[(m, bits)]:
                    msg += f' (merged, stock test: {r[(m, bits)]["merged_acc"]:.2f})'
                print(msg, flush=True)
    md = table(results, args.seeds, args.bits)
    head = (f'Fashion-MNIST test top-1, seeds {args.seeds}'
            f'{" (QUICK smoke run)" if args.quick else ""}, {time.time() - t0:.0f} s\n\n')
    print('\n' + head + md)
    os.makedirs(args.work_root, exist_ok=True)
    with open(osp.join(args.work_root, 'results.md'), 'w') as f:
        f.write(head + md + '\n')
    with open(osp.join(args.work_root, 'results.json'), 'w') as f:
        json.dump({str(s): {('fp' if k == 'fp' else f'{k[0]}_{bits_name(k[1])}'): v
                            for k, v in r.items()} for s, r in results.items()}, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
