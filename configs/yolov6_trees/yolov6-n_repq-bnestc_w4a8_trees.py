# RepQ-BNEst with periodic correction (ours, not in the paper), W4A8: statistics
# estimated from the input moments, and every 8th step the exact batch statistics are
# computed too, used, and turned into a per-channel correction (variance ratio, mean shift)
# for the steps between; running statistics re-estimated over one epoch at the end.
_base_ = './yolov6-n_qat-base_trees.py'
model = dict(repq=dict(
    method='repq', bn_mode='est', est_refresh=8, w_bits=4, a_bits=8, per_channel=True,
    init='mse',
    first_bits=8,      # the stem conv and the per-level output convs at 8 bits
    layer_bits={'bbox_head.rtm_cls': 8, 'bbox_head.rtm_reg': 8}))
custom_hooks = [dict(type='LSQCalibHook'), dict(type='BNEstHook', reestimate_batches=9)]
