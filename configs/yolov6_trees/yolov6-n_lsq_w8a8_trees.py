# The paper's LSQ baseline, W8A8: merge the trained rep blocks, then LSQ QAT of the
# single-branch detector.
_base_ = './yolov6-n_qat-base_trees.py'
repq = dict(method='lsq', w_bits=8, a_bits=8, per_channel=True, init='mse',
            first_bits=8, last_bits=8,       # first and last quantized layer at 8 bits
            init_checkpoint={{_base_.fp_checkpoint}})
