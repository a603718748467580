# Control for the quantized runs: the FP checkpoint fine-tuned with exactly their recipe
# (configs/_base_/det_trees_qat.py: 30 epochs, no mosaic, AdamW 1e-4, no EMA), without
# quantization (`method='fp'`: the multi-branch detector as it is). What the quantized
# models are compared with, beside the FP checkpoint itself.
_base_ = './yolov7-tiny_qat-base_trees.py'
model = dict(repq=dict(method='fp'))
custom_hooks = []                # nothing to calibrate
