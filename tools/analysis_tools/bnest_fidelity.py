#!/usr/bin/env python
"""RepQ-BNEst fidelity: per rep block and BN, how far the estimated batch statistics are
from the exact ones on real feature maps.

    python tools/analysis_tools/bnest_fidelity.py CONFIG CHECKPOINT [--batches 4]
        [--split val|train] [--out work_dirs/bnest_fidelity.md] [--cfg-options k=v ...]

CONFIG/CHECKPOINT: a full-precision config (the model is converted with
``convert_to_repq(quantize=False)``) or a RepQ config (model type ``RepQModel``) with its QAT
checkpoint.
For every BN: ``mean_err`` = mean over channels of |mu_est - mu| / sigma and ``var_err`` =
mean over channels of |V_est - V| / V, averaged over the batches (input of each block as it
occurs in the network in eval mode).
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
from repq_mm.mm.checkpoint import safe_load, state_dict_of  # noqa: E402
from repq_mm.mm.config import is_repq_model  # noqa: E402
from repq_mm.mm.pipeline import load_qat_model  # noqa: E402
from repq_mm.rep import RepBlock  # noqa: E402
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('config')
    ap.add_argument('checkpoint')
    ap.add_argument('--batches', type=int, default=4)
    ap.add_argument('--split', choices=['val', 'train'], default='val')
    ap.add_argument('--out', default=None, help='write the Markdown table here')
    ap.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = ap.parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    model = build(cfg, args.checkpoint)
    loader = Runner.build_dataloader(cfg.get(f'{args.split}_dataloader'))
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, RepBlock)]
    rows = {}

    def hook(name):
        def fn(mod, inputs):
            x = inputs[0]
            if mod.a_quant is not None and mod.repq:
                x = mod.a_quant(x)
            for r in bnest_errors(mod, x):
                rows.setdefault((name, r['bn']), []).append((r['mean_err'], r['var_err']))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in blocks]
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == args.batches:
                break
            model.test_step(batch)
    for h in handles:
        h.remove()
    lines = ['| block | BN | mean error (σ units) | variance rel. error |', '|---|---|---:|---:|']
    means, vars_ = [], []
    for (blk, bn), vals in rows.items():
        me = statistics.mean(v[0] for v in vals)
        ve = statistics.mean(v[1] for v in vals)
        means.append(me)
        vars_.append(ve)
        lines.append(f'| {blk} | {bn} | {me:.3f} | {ve:.3f} |')
    summary = (f'{len(rows)} BNs in {len(blocks)} rep blocks, {args.batches} {args.split} '
               f'batches: mean error median {statistics.median(means):.3f} / max '
               f'{max(means):.3f} σ; variance rel. error median {statistics.median(vars_):.3f}'
               f' / max {max(vars_):.3f}')
    text = summary + '\n\n' + '\n'.join(lines)
    print(text)
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            f.write(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
