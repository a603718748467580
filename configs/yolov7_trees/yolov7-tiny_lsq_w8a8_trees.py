# The paper's LSQ baseline, W8A8: merge the RepConvs, then LSQ QAT.
_base_ = './yolov7-tiny_qat-base_trees.py'
repq = dict(method='lsq', w_bits=8, a_bits=8, per_channel=True, init='mse',
            first_bits=8, last_bits=8, init_checkpoint={{_base_.fp_checkpoint}})
