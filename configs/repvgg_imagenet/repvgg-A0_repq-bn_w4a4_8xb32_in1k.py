# RepQ-BN (exact batch statistics) W4A4, RepVGG-A0, ImageNet-1k.
_base_ = './repvgg-A0_qat-base_8xb32_in1k.py'
model = dict(repq=dict(
    method='repq', bn_mode='exact', w_bits=4, a_bits=4, per_channel=True, init='mse',
    first_bits=8, last_bits=8))
