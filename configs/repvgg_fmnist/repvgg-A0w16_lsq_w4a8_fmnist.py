# Paper's LSQ baseline: merge the trained rep blocks, then LSQ QAT of the single-branch net.
_base_ = ['../_base_/repq_finetune_fmnist.py']

model = dict(repq=dict(
    method='lsq', w_bits=4, a_bits=8, per_channel=True, init='mse',
    first_bits=8, last_bits=8))   # LSQ recipe: first and last layer at 8 bits
# The merged network has no BN: at lr 0.01 its QAT diverges at once (loss 2.30 from the first
# 100 iterations, 10% top-1, measured on seed 0); 0.001 is the largest of {0.01, 0.001} that
# trains.
optim_wrapper = dict(optimizer=dict(lr=0.001))
