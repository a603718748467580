#!/usr/bin/env python
"""Accuracy of an exported (integer) ONNX model through onnxruntime, next to the PyTorch
merged model, on the config's whole test set.

    python tools/analysis_tools/onnx_eval.py CONFIG CHECKPOINT MODEL.onnx [--export]
        [--max-samples N] [--threads 2] [--graph-as-written] [--precise-u8s8]
        [--form fused|qdq] [--weight-dtype auto|int8|uint8] [--out RESULT.json]
        [--cfg-options k=v ...]

CONFIG + CHECKPOINT: as for ``tools/export_onnx.py`` (a QAT config and checkpoint, merged
here, or ``deploy_config.py`` + ``merged.pth``). Every test batch goes through the config's
test pipeline and the model's data preprocessor once; the tensor is run by onnxruntime
(``ORT_ENABLE_ALL``: the integer kernels the deployed model uses; ``--graph-as-written``:
``ORT_DISABLE_ALL``) and by the PyTorch merged fake-quant model. The onnxruntime outputs go
through the model's own post-processing (a classifier head's ``_get_predictions``, a
detector head's ``predict_by_feat`` + ``add_pred_to_datasample``) into the config's test
evaluator (mmpretrain ``Accuracy``, mmdet ``CocoMetric`` ...), the PyTorch predictions into a
second one; both are printed with their difference, next to the PyTorch model with its biases
rounded to the file's int32 grid (what the integer kernels add: the model the file computes). ``--export`` first writes MODEL.onnx
(``tools/export_onnx.py``'s export, checked on the first test batch). ``--max-samples``:
only the first N test samples (CocoMetric still scores every image of its annotation file,
so a subset's mAP is only comparable between the two engines). Exit status 1 on bad input.
"""
import argparse
import json
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from mmengine.config import Config, DictAction  # noqa: E402

from repq_mm.mm import cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Evaluate an ONNX model through onnxruntime '
                                'next to the PyTorch merged model')
    p.add_argument('config', help='QAT config (model type RepQModel) or a deploy_config.py')
    p.add_argument('checkpoint', help='QAT checkpoint, or merged.pth of a deploy config')
    p.add_argument('onnx', help='the ONNX model (written first with --export)')
    p.add_argument('--export', action='store_true',
                   help='export CHECKPOINT to ONNX first (the export check runs on the first '
                   'test batch)')
    p.add_argument('--form', choices=('fused', 'qdq'), default='fused',
                   help='with --export: graph form (see tools/export_onnx.py)')
    p.add_argument('--weight-dtype', choices=('auto', 'int8', 'uint8'), default='auto',
                   help='with --export: weight codes of the fused form')
    p.add_argument('--max-samples', type=int, help='only the first N test samples')
    p.add_argument('--threads', type=int, default=2, help='onnxruntime intra-op threads')
    p.add_argument('--graph-as-written', action='store_true',
                   help='run the graph without onnxruntime optimisation (ORT_DISABLE_ALL)')
    p.add_argument('--precise-u8s8', action='store_true',
                   help='session.x64quantprecision=1 (for int8-weight files on x86 CPUs '
                   'without VNNI)')
    p.add_argument('--out', help='also write the result as JSON here')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override some settings in the used config (xxx=yyy)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from repq_mm.export import ExportError
    from repq_mm.mm.export import (_test_loader, build_merged_model, evaluate_onnx,
                                   export_checkpoint)
    try:
        cfg = Config.fromfile(args.config)
        if args.cfg_options is not None:
            cfg.merge_from_dict(args.cfg_options)
        cli.prepare_cfg(cfg)
        if args.export:
            model, _ = build_merged_model(cfg, args.checkpoint)
            batch = next(iter(_test_loader(cfg, 8)))
            x = model.data_preprocessor(batch, False)['inputs'].float()
            del model
            info = export_checkpoint(cfg, args.checkpoint, args.onnx,
                                     input_shape=(1, *x.shape[1:]), check_batch=x,
                                     form=args.form, weight_dtype=args.weight_dtype,
                                     threads=1)
            print(f'wrote {info["path"]} ({info["size"]} bytes, {args.form} form); export '
                  f'check passed on {x.shape[0]} test samples')
        res = evaluate_onnx(cfg, args.checkpoint, args.onnx, args.max_samples,
                            args.threads, not args.graph_as_written, args.precise_u8s8,
                            log=print)
    except (ExportError, KeyError, ValueError, FileNotFoundError) as e:
        print(f'onnx_eval: error: {e}', file=sys.stderr)
        return 1
    engine = 'onnxruntime' + (' (graph as written)' if args.graph_as_written else '')
    print(f'{res["samples"]} test samples; {engine}, {args.threads} thread(s), '
          f'{res["seconds"]:.0f} s')
    w = max(len(k) for k in res['diff']) if res['diff'] else 10
    snap = res['torch_int32_bias']
    print(f'{"metric":{w}s}  {"onnxruntime":>12s}  {"PyTorch":>12s}  {"difference":>11s}'
          + (f'  {"PyTorch, int32 biases":>22s}' if snap else ''))
    for k, d in res['diff'].items():
        print(f'{k:{w}s}  {float(res["onnx"][k]):12.4f}  {float(res["torch"][k]):12.4f}  '
              f'{d:+11.4f}' + (f'  {float(snap[k]):22.4f}' if snap and k in snap else ''))
    if res['agreement'] is not None:
        print(f'top-1 label agreement onnxruntime / PyTorch: {res["agreement"]:.4%}')
    if res['agreement_int32_bias'] is not None:
        print(f'top-1 label agreement onnxruntime / PyTorch with the file\'s int32 biases '
              f'({res["int32_bias_layers"]} layers): {res["agreement_int32_bias"]:.4%}')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(res, f, indent=1, default=float)
    return 0


if __name__ == '__main__':
    sys.exit(main())
