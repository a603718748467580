# RepQ-BN: merged kernel with exact batch statistics, LSQ on top, multi-branch training.
_base_ = ['../_base_/repq_finetune_fmnist.py']

model = dict(repq=dict(
    method='repq', w_bits=4, a_bits=8, bn_mode='exact', per_channel=True, init='mse',
    first_bits=8, last_bits=8))   # LSQ recipe: first and last layer at 8 bits
