# RepQ-BN, W4A8: the multi-branch RepVGG blocks keep training; their merged kernel
# (BN folded with exact batch statistics) is quantized.
_base_ = './yolov6-n_qat-base_trees.py'
model = dict(repq=dict(
    method='repq', bn_mode='exact', w_bits=4, a_bits=8, per_channel=True,
    init='mse',
    first_bits=8,      # the stem conv and the per-level output convs at 8 bits
    layer_bits={'bbox_head.rtm_cls': 8, 'bbox_head.rtm_reg': 8}))
