# The paper's LSQ baseline, W4A8: merge the trained rep blocks, then LSQ QAT of the
# single-branch detector.
_base_ = './yolov6-n_qat-base_trees.py'
model = dict(repq=dict(
    method='lsq', w_bits=4, a_bits=8, per_channel=True,
    init='mse',
    first_bits=8,      # the stem conv and the per-level output convs at 8 bits
    layer_bits={'bbox_head.rtm_cls': 8, 'bbox_head.rtm_reg': 8}))
