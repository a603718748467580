# Quantization-aware fine-tuning on COCO from a full-precision checkpoint
# (repq.init_checkpoint): 20 epochs, AdamW 4e-4 (total batch 256) with cosine decay.
_base_ = ['./det_coco_640.py']
qat_epochs = 20
qat_lr = 0.0004
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=qat_epochs, val_interval=5)
optim_wrapper = dict(optimizer=dict(lr=qat_lr))
param_scheduler = [
    dict(type='CosineAnnealingLR', eta_min=qat_lr * 0.05, begin=0, end=qat_epochs,
         T_max=qat_epochs, by_epoch=True, convert_to_iter_based=True),
]
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=5, max_keep_ckpts=2))
