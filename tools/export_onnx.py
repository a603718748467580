"""Export a RepQ model as an integer ONNX model (QuantizeLinear / DequantizeLinear).

    python tools/export_onnx.py CONFIG CHECKPOINT OUT.onnx [--input-shape N C H W]
                                [--fp32-out FP32.onnx] [--check IMAGE ...]
                                [--merged-dir DIR [--overwrite]] [--opset 17] [--int32-bias]
                                [--cfg-options k=v ...]

CONFIG + CHECKPOINT: a QAT config and checkpoint (merged here), or the ``deploy_config.py``
and ``merged.pth`` written by ``tools/merge_quant.py``. Weights are int8 initializers (LSQ
codes) + DequantizeLinear (per output channel when trained per channel), activations
QuantizeLinear / DequantizeLinear with the learned step sizes (uint8 after ReLU, else int8;
a Clip keeps sub-8-bit codes in the LSQ range); biases float32, or int32 codes at scale
s_a * s_w with ``--int32-bias`` (integer engines' convention). ``--check`` runs the images through the
config's test pipeline and compares onnxruntime with the PyTorch fake-quant model (must agree
within one quantization step). ``--merged-dir`` also writes the merge_quant folder. Exit
status 1, nothing written, on bad input or a failed check.
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
    p.add_argument('--int32-bias', action='store_true',
                   help='store biases as int32 codes at scale s_a*s_w (+ DequantizeLinear)')
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
                                 args.opset, int32_bias=args.int32_bias)
    except (ExportError, KeyError, ValueError, FileNotFoundError) as e:
        print(f'export_onnx: error: {e}', file=sys.stderr)
        return 1
    line = (f'wrote {info["path"]}: {info["size"]} bytes, {info["int8"]} int8 weight '
            f'initializer(s) ({info["int8_bytes"]} bytes), {len(info["quantizers"])} '
            'quantizer(s)')
    if info['int32']:
        line += f', {info["int32"]} int32 bias initializer(s) ({info["int32_bytes"]} bytes)'
    if 'fp32' in info:
        line += (f'; float32 reference {info["fp32"]["path"]}: {info["fp32"]["size"]} bytes '
                 f'(ratio {info["size"] / info["fp32"]["size"]:.3f})')
    print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
