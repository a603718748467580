"""Export a RepQ model as an integer ONNX model (QuantizeLinear / DequantizeLinear).

    python tools/export_onnx.py CONFIG CHECKPOINT OUT.onnx [--input-shape N C H W]
                                [--fp32-out FP32.onnx] [--check IMAGE ...]
                                [--merged-dir DIR [--overwrite]] [--opset 17]
                                [--form fused|qdq] [--weight-dtype auto|int8|uint8]
                                [--int32-bias] [--no-deployed-check] [--threads N]
                                [--cfg-options k=v ...]

CONFIG + CHECKPOINT: a QAT config and checkpoint (merged here), or the ``deploy_config.py``
and ``merged.pth`` written by ``tools/merge_quant.py``. The default ``--form fused`` is the
graph onnxruntime runs as integer kernels (``QLinearConv`` / ``ConvInteger`` / ``QGemm``):
uint8 activation codes (zero point 128 for signed ones) with sub-8-bit ranges clamped on the
integer codes, weight codes as int8 or, where uint8 x int8 products could saturate on x86
CPUs without VNNI, uint8 with zero point 128 (``--weight-dtype auto``), int32 biases at scale
s_a * s_w (see ``repq_mm.export``). ``--form qdq``: the plain Q -> DQ pair form (float Clip
for sub-8-bit ranges; float32 biases unless ``--int32-bias``). ``--check`` runs the images
through the config's test pipeline and compares onnxruntime with the PyTorch fake-quant model
layer by layer (must agree within one quantization step), in the graph as written and in
onnxruntime's optimised graph (the integer kernels; off with ``--no-deployed-check``).
``--merged-dir`` also writes the merge_quant folder. Exit status 1, nothing written, on bad
input or a failed check.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # a checkout

from mmengine.config import Config, DictAction  # noqa: E402

from repq_mm.mm import cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Export a RepQ model as an integer ONNX model')
    p.add_argument('config', help='QAT config (model type RepQModel) or a deploy_config.py')
    p.add_argument('checkpoint', help='QAT checkpoint, or merged.pth of a deploy config')
    p.add_argument('out', help='output .onnx file')
    p.add_argument('--input-shape', type=int, nargs=4, metavar=('N', 'C', 'H', 'W'),
                   help='example input shape (batch is dynamic); default: from the check '
                   'images, else 1 C 224 224')
    p.add_argument('--fp32-out', help='also export the merged model in float32 (quantizers '
                   'off) for reference')
    p.add_argument('--check', nargs='+', default=[], metavar='IMAGE',
                   help='images compared between onnxruntime and PyTorch')
    p.add_argument('--merged-dir', help='also write the merge_quant output folder here')
    p.add_argument('--overwrite', action='store_true',
                   help='with --merged-dir: replace a folder holding another model')
    p.add_argument('--opset', type=int, default=17)
    p.add_argument('--form', choices=('fused', 'qdq'), default='fused',
                   help='graph form: fused = what onnxruntime runs as integer kernels '
                   '(default); qdq = plain QuantizeLinear -> DequantizeLinear pairs')
    p.add_argument('--weight-dtype', choices=('auto', 'int8', 'uint8'), default='auto',
                   help='weight codes (fused form): auto = uint8 (zero point 128) where u8 x '
                   's8 products could saturate on x86 without VNNI, else int8')
    p.add_argument('--int32-bias', action='store_true',
                   help='qdq form: store biases as int32 codes at scale s_a*s_w (the fused '
                   'form always does)')
    p.add_argument('--no-deployed-check', action='store_true',
                   help='--check only the graph as written, not onnxruntime\'s optimised one')
    p.add_argument('--threads', type=int, default=1,
                   help='onnxruntime intra-op threads for the check (default 1)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override some settings in the used config (xxx=yyy)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from repq_mm.export import ExportError
    from repq_mm.mm.export import export_checkpoint
    try:
        cfg = Config.fromfile(args.config)
        if args.cfg_options is not None:
            cfg.merge_from_dict(args.cfg_options)
        cli.prepare_cfg(cfg)
        info = export_checkpoint(cfg, args.checkpoint, args.out, args.input_shape,
                                 args.fp32_out, args.check, args.merged_dir, args.overwrite,
                                 args.opset,
                                 int32_bias=True if args.int32_bias else None,
                                 form=args.form, weight_dtype=args.weight_dtype,
                                 check_deployed=not args.no_deployed_check,
                                 threads=args.threads)
    except (ExportError, KeyError, ValueError, FileNotFoundError) as e:
        print(f'export_onnx: error: {e}', file=sys.stderr)
        return 1
    kernels = {}
    for layer in info['layers']:
        k = layer['kernel'] or ('float' if args.form == 'fused' else 'QDQ')
        kernels[k] = kernels.get(k, 0) + 1
    line = (f'wrote {info["path"]} ({args.form} form): {info["size"]} bytes, '
            f'{info["weight_codes"]} integer weight initializer(s) '
            f'({info["weight_codes_bytes"]} bytes), {len(info["quantizers"])} quantizer(s); '
            'quantized layers: ' + ', '.join(f'{v} {k}' for k, v in kernels.items()))
    if info['int32']:
        line += f', {info["int32"]} int32 bias initializer(s) ({info["int32_bytes"]} bytes)'
    if 'fp32' in info:
        line += (f'; float32 reference {info["fp32"]["path"]}: {info["fp32"]["size"]} bytes '
                 f'(ratio {info["size"] / info["fp32"]["size"]:.3f})')
    print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
