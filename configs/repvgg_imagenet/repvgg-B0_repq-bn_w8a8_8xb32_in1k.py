# RepQ-BN (exact batch statistics) W8A8, RepVGG-B0, ImageNet-1k.
_base_ = './repvgg-B0_qat-base_8xb32_in1k.py'
model = dict(repq=dict(
    method='repq', bn_mode='exact', w_bits=8, a_bits=8, per_channel=True, init='mse',
    first_bits=8, last_bits=8))
