# RepQ-BNEst (statistics estimated from the input, no second conv) W8A8, RepVGG-B0,
# ImageNet-1k. Running statistics re-estimated over 200 batches at the end of training.
_base_ = './repvgg-B0_qat-base_8xb32_in1k.py'
model = dict(repq=dict(
    method='repq', bn_mode='est', w_bits=8, a_bits=8, per_channel=True, init='mse',
    first_bits=8, last_bits=8))
custom_hooks = [dict(type='LSQCalibHook'), dict(type='BNEstHook', reestimate_batches=200)]
