# The paper's LSQ baseline W8A8: merge RepVGG-B0, then LSQ QAT of the plain network.
_base_ = './repvgg-B0_qat-base_8xb32_in1k.py'
repq = dict(method='lsq', w_bits=8, a_bits=8, per_channel=True, init='mse',
            first_bits=8, last_bits=8, init_checkpoint={{_base_.fp_checkpoint}})
