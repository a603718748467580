#!/usr/bin/env python
"""RepQ-BNEst fidelity: per rep block and BN, how far the estimated batch statistics are
from the exact ones on real feature maps.

    python tools/analysis_tools/bnest_fidelity.py CONFIG CHECKPOINT [--batches 4]
        [--split val|train] [--est-stats diag kron] [--out work_dirs/bnest_fidelity.md]
        [--cfg-options k=v ...]

CONFIG/CHECKPOINT: a full-precision config (the model is converted with
``convert_to_repq(quantize=False)``) or a RepQ config (model type ``RepQModel``) with its QAT
checkpoint.
For every BN: ``mean_err`` = mean over channels of |mu_est - mu| / sigma and ``var_err`` =
mean over channels of |V_est - V| / V, averaged over the batches (input of each block as it
occurs in the network in eval mode), for every estimator of ``--est-stats`` (``diag``: the
paper's, ``kron``: docs/method.md); the summary gives median and max over all BNs and over
the BNs of KxK (K > 1) and of 1x1 / identity branches.
"""
import argparse
import os
import os.path as osp
import statistics
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import repq_mm  # noqa: E402
from repq_mm.io import atomic_path  # noqa: E402
from repq_mm.mm.checkpoint import safe_load, state_dict_of  # noqa: E402
from repq_mm.mm.config import is_repq_model  # noqa: E402
from repq_mm.mm.pipeline import load_qat_model  # noqa: E402
from repq_mm.rep import RepBlock  # noqa: E402
from repq_mm.quant.config import EST_STATS  # noqa: E402
from repq_mm.rep.fidelity import bnest_errors  # noqa: E402


def build(cfg, checkpoint):
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    if is_repq_model(cfg.model):              # the weights come from the QAT checkpoint
        return load_qat_model(cfg, checkpoint)[0]
    else:
        model = MODELS.build(cfg.model)
        model.load_state_dict(state_dict_of(safe_load(checkpoint)), strict=True)
        model = repq_mm.convert_to_repq(model, quantize=False)
    return model.eval()


def fidelity_report(rows: dict, estimators, n_blocks: int, batches: int, split: str) -> str:
    """The summary lines and the per-BN Markdown table of the errors in ``rows``."""
    heads = ''.join(f' {e}: mean error (σ) | {e}: variance rel. error |' for e in estimators)
    lines = ['| block | BN | kernel |' + heads, '|---|---|---|' + '---:|' * 2 * len(estimators)]
    per_est = {e: [] for e in estimators}       # (kernel, mean_err, var_err) per BN
    for (blk, bn), (kernel, per) in rows.items():
        cells = ''
        for e in estimators:
            me = statistics.mean(v[0] for v in per[e])
            ve = statistics.mean(v[1] for v in per[e])
            per_est[e].append((kernel, me, ve))
            cells += f' {me:.3f} | {ve:.3f} |'
        lines.append(f'| {blk} | {bn} | {kernel[0]}x{kernel[1]} |' + cells)
    out = [f'{len(rows)} BNs in {n_blocks} rep blocks, {batches} {split} batches']
    for e, vals in per_est.items():
        groups = [('all', vals), ('KxK', [v for v in vals if max(v[0]) > 1]),
                  ('1x1', [v for v in vals if max(v[0]) == 1])]
        parts = [f'{g} ({len(v)}): variance rel. error median '
                 f'{statistics.median(x[2] for x in v):.3f} / max {max(x[2] for x in v):.3f}, '
                 f'mean error median {statistics.median(x[1] for x in v):.3f} / max '
                 f'{max(x[1] for x in v):.3f} σ' for g, v in groups if v]
        out.append(f'- {e}: ' + '; '.join(parts))
    return '\n'.join(out) + '\n\n' + '\n'.join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('config')
    ap.add_argument('checkpoint')
    ap.add_argument('--batches', type=int, default=4)
    ap.add_argument('--split', choices=['val', 'train'], default='val')
    ap.add_argument('--est-stats', nargs='+', default=list(EST_STATS), choices=EST_STATS,
                    help='the estimators to compare with the exact statistics')
    ap.add_argument('--out', default=None, help='write the Markdown table here')
    ap.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = ap.parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    model = build(cfg, args.checkpoint)
    loader = Runner.build_dataloader(cfg.get(f'{args.split}_dataloader'))
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, RepBlock)]
    rows = {}     # (block, bn) -> kernel, {estimator: [(mean_err, var_err) per batch]}

    def hook(name):
        def fn(mod, inputs):
            x = inputs[0]
            if mod.a_quant is not None and mod.repq:
                x = mod.a_quant(x)
            for est in args.est_stats:
                for r in bnest_errors(mod, x, est):
                    kernel, per = rows.setdefault((name, r['bn']), (r['kernel'], {}))
                    per.setdefault(est, []).append((r['mean_err'], r['var_err']))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in blocks]
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == args.batches:
                break
            model.test_step(batch)
    for h in handles:
        h.remove()
    if not rows:
        raise SystemExit(f'{args.config}: no BN inside a rep block was reached')
    text = fidelity_report(rows, args.est_stats, len(blocks), args.batches, args.split)
    print(text)
    if args.out:
        with atomic_path(args.out) as tmp, open(tmp, 'w') as f:
            f.write(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
