_base_ = ['./det_trees.py']

# Quantization-aware fine-tuning on the tree tiles, shared by the LSQ baseline and RepQ:
# starts from the full-precision checkpoint (model.init_checkpoint), 30 epochs (270
# iterations), AdamW 1e-4 (half the FP run's final lr) with cosine decay, no warm-up
# (LSQCalibHook initialises the step sizes from 4 training batches before the first step).
# The LSQ step sizes get lr_mult 0.1: AdamW normalises the gradient, so LSQ's gradient scale
# 1/sqrt(N Q_P) has no effect and the raw lr would move a 8-bit weight step (~1e-3) by ~10%
# per iteration (at 4e-4 for weights and steps, W8A8 LSQ lost 1.8 AP against PTQ).
# Data as in the FP run's last stage (no mosaic); no EMA and no pipeline switch (quantizer
# state and BN re-estimation belong to the trained weights, not to an average).
qat_epochs = 30
qat_lr = 0.0001
train_dataloader = dict(dataset=dict(pipeline={{_base_.train_pipeline_stage2}}))
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=qat_epochs, val_interval=qat_epochs)
optim_wrapper = dict(
    optimizer=dict(lr=qat_lr),
    paramwise_cfg=dict(custom_keys={'.step': dict(decay_mult=0.0, lr_mult=0.1)}))
param_scheduler = [
    dict(type='CosineAnnealingLR', eta_min=qat_lr * 0.05, begin=0, end=qat_epochs,
         T_max=qat_epochs, by_epoch=True, convert_to_iter_based=True),
]
custom_hooks = []
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=qat_epochs, max_keep_ckpts=1))
