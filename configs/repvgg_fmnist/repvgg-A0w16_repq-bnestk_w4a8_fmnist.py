# RepQ-BNEst with Kronecker-factored statistics (ours, not in the paper): the branch output
# variances are estimated from the input's channel covariance (exact for 1x1 branches) times
# its KxK spatial autocorrelation (docs/method.md), no exact passes during training; running
# statistics re-estimated with exact batch statistics over 50 batches at the end.
_base_ = ['../_base_/repq_finetune_fmnist.py']

model = dict(repq=dict(
    method='repq', w_bits=4, a_bits=8, bn_mode='est', est_stats='kron', per_channel=True,
    init='mse', first_bits=8, last_bits=8))   # LSQ recipe: first and last layer at 8 bits
custom_hooks = [dict(type='LSQCalibHook'), dict(type='BNEstHook', reestimate_batches=50)]
