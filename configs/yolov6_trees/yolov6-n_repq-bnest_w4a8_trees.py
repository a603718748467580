# RepQ-BNEst, W4A8: BN statistics of the branches estimated from the input moments
# (no second conv); running statistics re-estimated with exact batch statistics over one
# epoch (9 batches) at the end of training.
_base_ = './yolov6-n_qat-base_trees.py'
model = dict(repq=dict(
    method='repq', bn_mode='est', w_bits=4, a_bits=8, per_channel=True,
    init='mse',
    first_bits=8,      # the stem conv and the per-level output convs at 8 bits
    layer_bits={'bbox_head.rtm_cls': 8, 'bbox_head.rtm_reg': 8}))
custom_hooks = [dict(type='LSQCalibHook'), dict(type='BNEstHook', reestimate_batches=9)]
