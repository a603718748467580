# Quantization-aware fine-tuning shared by the LSQ baseline, PTQ and RepQ: the FP RepVGG
# classifier wrapped in RepQModel (the leaf configs set `model.repq`), started from the
# full-precision checkpoint (--cfg-options model.init_checkpoint=...), LSQ step sizes
# initialised from 4 training batches (LSQCalibHook).
_base_ = ['../repvgg_fmnist/repvgg-A0w16_fp_fmnist.py']

model = dict(
    _delete_=True,                 # replace the FP model, do not merge into it
    type='RepQModel',
    architecture=_base_.model,     # the FP RepVGG classifier
    repq=dict(),                   # method / bits: the leaf configs
    init_checkpoint=None,          # the FP checkpoint: --cfg-options model.init_checkpoint=...
)
custom_hooks = [dict(type='LSQCalibHook')]

qat_epochs = 1
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-5, nesterov=True),
    # no weight decay on BN, biases and LSQ step sizes
    paramwise_cfg=dict(bias_decay_mult=0.0, norm_decay_mult=0.0,
                       custom_keys={'.step': dict(decay_mult=0.0)}),
)
param_scheduler = [
    dict(type='CosineAnnealingLR', T_max=qat_epochs, by_epoch=True, begin=0, end=qat_epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=qat_epochs, val_interval=qat_epochs)
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=qat_epochs, max_keep_ckpts=1))
