# Post-training quantization of the merged model (calibration only, no training).
_base_ = ['../_base_/repq_finetune_fmnist.py']

model = dict(repq=dict(
    method='ptq', w_bits=4, a_bits=8, per_channel=True, init='mse',
    first_bits=8, last_bits=8))   # LSQ recipe: first and last layer at 8 bits
