# Quantization-aware fine-tuning schedule shared by the LSQ baseline and RepQ
# (starts from the full-precision checkpoint given as repq.init_checkpoint).
_base_ = ['../repvgg_fmnist/repvgg-A0w16_fp_fmnist.py']

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
