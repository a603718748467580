# CI-sized variant: RepQ-BN W4A4 on 4 training tiles / 2 val tiles at 128 px, a narrow
# YOLOv6-style net, 1 epoch (1 iteration of batch 4), random init (no FP checkpoint).
# Runs in seconds on a CPU; for tests and smoke runs only.
_base_ = './yolov6-n_repq-bn_w4a4_trees.py'
img_scale = (128, 128)
model = dict(
    architecture=dict(
        backbone=dict(widen_factor=0.125),
        neck=dict(in_channels=[32, 64, 128], widen_factor=0.125, out_channels=32),
        bbox_head=dict(in_channels=32, feat_channels=32, stacked_convs=1)),
    init_checkpoint=None)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Pad', size=img_scale, pad_val=dict(img=(114, 114, 114))),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='Pad', size=img_scale, pad_val=dict(img=(114, 114, 114))),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(dataset=dict(indices=4, pipeline=train_pipeline))
val_dataloader = dict(batch_size=2, dataset=dict(indices=2, pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_epochs=1, val_interval=1)
param_scheduler = []
custom_hooks = [dict(type='LSQCalibHook', num_batches=1)]
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=1))
