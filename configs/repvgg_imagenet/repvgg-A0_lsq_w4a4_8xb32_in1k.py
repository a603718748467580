# The paper's LSQ baseline W4A4: merge RepVGG-A0, then LSQ QAT of the plain network.
_base_ = './repvgg-A0_qat-base_8xb32_in1k.py'
model = dict(repq=dict(
    method='lsq', w_bits=4, a_bits=4, per_channel=True, init='mse',
    first_bits=8, last_bits=8))
# The merged network has no BN; on Fashion-MNIST its QAT diverged at lr 0.01 and trained at
# 0.001 (see README), so the baseline uses 0.001 here too.
optim_wrapper = dict(optimizer=dict(lr=0.001))
