# RepQ-BNEst with Kronecker-factored statistics (ours, not in the paper), W8A8: the
# branch output variances from the input's channel covariance (exact for 1x1 branches)
# times its KxK spatial autocorrelation (docs/method.md), no exact passes during training;
# running statistics re-estimated over one epoch (9 batches) at the end.
_base_ = './yolov6-n_qat-base_trees.py'
model = dict(repq=dict(
    method='repq', bn_mode='est', est_stats='kron', w_bits=8, a_bits=8, per_channel=True,
    init='mse',
    first_bits=8,      # the stem conv and the per-level output convs at 8 bits
    layer_bits={'bbox_head.rtm_cls': 8, 'bbox_head.rtm_reg': 8}))
custom_hooks = [dict(type='LSQCalibHook'), dict(type='BNEstHook', reestimate_batches=9)]
