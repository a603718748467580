# RepQ-BNEst with periodic correction (ours, not in the paper): statistics estimated from the
# input moments, and every 8th step the exact batch statistics are computed too, used, and
# turned into a per-channel correction (variance ratio, mean shift) for the steps between.
_base_ = ['../_base_/repq_finetune_fmnist.py']

model = dict(repq=dict(
    method='repq', w_bits=4, a_bits=8, bn_mode='est', est_refresh=8, per_channel=True, init='mse',
    first_bits=8, last_bits=8))   # LSQ recipe: first and last layer at 8 bits
custom_hooks = [dict(type='LSQCalibHook'), dict(type='BNEstHook', reestimate_batches=50)]
