"""Merge a RepQ QAT checkpoint into a deploy checkpoint (one conv per rep block).

    python tools/merge_quant.py CONFIG CHECKPOINT OUT_DIR [--overwrite] [--check-batches 1]
                                [--cfg-options k=v ...]

Writes OUT_DIR/deploy_config.py, OUT_DIR/merged.pth and OUT_DIR/int_weights.pth after checking
on real batches of the config's val (else test) dataloader that the merged model computes what
the QAT model computes in eval mode. The stock mmpretrain ``tools/test.py`` evaluates
``OUT_DIR/deploy_config.py OUT_DIR/merged.pth``. Exit status 1 (nothing written) when the
check fails or OUT_DIR holds another model (without --overwrite).
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # a checkout

from mmengine.config import Config, DictAction  # noqa: E402

from repq_mm.mm import cli  # noqa: E402
from repq_mm.mm.deploy import MergeError, merge_checkpoint  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Merge a RepQ QAT checkpoint for deployment')
    parser.add_argument('config', help='the QAT config (model type RepQModel)')
    parser.add_argument('checkpoint', help='the QAT checkpoint')
    parser.add_argument('out_dir', help='output folder')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace OUT_DIR even when it holds another model')
    parser.add_argument('--check-batches', type=int, default=1,
                        help='val/test batches on which merged and QAT outputs are compared')
    parser.add_argument('--tol', type=float, default=1e-4,
                        help='largest allowed max abs difference relative to the largest '
                        'QAT output')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override some settings in the used config (xxx=yyy)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = Config.fromfile(args.config)
        if args.cfg_options is not None:
            cfg.merge_from_dict(args.cfg_options)
        cli.prepare_cfg(cfg)       # a bad config: KeyError / ValueError naming the problem
        res = merge_checkpoint(cfg, args.checkpoint, args.out_dir, overwrite=args.overwrite,
                               check_batches=args.check_batches, tol=args.tol)
    except (MergeError, KeyError, ValueError) as e:
        print(f'merge_quant: error: {e}', file=sys.stderr)
        return 1
    agree = 'n/a' if res['argmax_agree'] is None else f'{100 * res["argmax_agree"]:.2f}%'
    print(f'max abs diff {res["max_abs"]:.6g} (relative {res["rel"]:.3g}), argmax agreement '
          f'{agree} on {res["batches"]} batch(es); wrote {args.out_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
