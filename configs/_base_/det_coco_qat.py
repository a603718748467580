# Quantization-aware fine-tuning on COCO from a full-precision checkpoint
# (model.init_checkpoint): 20 epochs, AdamW 1e-4 (total batch 256; half the FP run's final
# lr) with cosine decay, LSQ step sizes at lr_mult 0.1 (AdamW ignores LSQ's gradient scale)
# -- the rule found on the tree tiles (configs/_base_/det_trees_qat.py), not tuned on COCO.
_base_ = ['./det_coco_640.py']
qat_epochs = 20
qat_lr = 0.0001
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=qat_epochs, val_interval=5)
optim_wrapper = dict(
    optimizer=dict(lr=qat_lr),
    paramwise_cfg=dict(custom_keys={'.step': dict(decay_mult=0.0, lr_mult=0.1)}))
param_scheduler = [
    dict(type='CosineAnnealingLR', eta_min=qat_lr * 0.05, begin=0, end=qat_epochs,
         T_max=qat_epochs, by_epoch=True, convert_to_iter_based=True),
]
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=5, max_keep_ckpts=2))
