# The paper's LSQ baseline, W4A4: merge the RepConvs, then LSQ QAT.
_base_ = './yolov7-tiny_qat-base_trees.py'
model = dict(repq=dict(
    method='lsq', w_bits=4, a_bits=4, per_channel=True, init='mse',
    first_bits=8, layer_bits={'bbox_head.rtm_cls': 8, 'bbox_head.rtm_reg': 8}))
