# COCO 2017 (the standard layout of mmdet's coco_detection base: data/coco/annotations/
# instances_{train,val}2017.json, data/coco/{train,val}2017/) at 640x640 with RTMDet's
# training recipe: mosaic + random resize / crop + HSV + flip + mixup, AdamW 0.004 for a
# total batch of 256 (8 GPUs x 32), 300 epochs, warm-up then cosine decay from epoch 150.
# The model comes from a det_yolov*.py base.
_base_ = ['mmdet::_base_/datasets/coco_detection.py', 'mmdet::_base_/default_runtime.py']

img_scale = (640, 640)
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='CachedMosaic', img_scale=img_scale, pad_val=114.0),
    dict(type='RandomResize', scale=(1280, 1280), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=img_scale),
    dict(type='YOLOXHSVRandomAug'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Pad', size=img_scale, pad_val=dict(img=(114, 114, 114))),
    dict(type='CachedMixUp', img_scale=img_scale, ratio_range=(1.0, 1.0),
         max_cached_images=20, pad_val=(114, 114, 114)),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='Pad', size=img_scale, pad_val=dict(img=(114, 114, 114))),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(batch_size=32, num_workers=8, batch_sampler=None, pin_memory=True,
                        dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=8, num_workers=4, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

max_epochs = 300
base_lr = 0.004
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=10)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=base_lr, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0, bias_decay_mult=0, bypass_duplicate=True,
                       custom_keys={'.step': dict(decay_mult=0.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1.0e-5, by_epoch=False, begin=0, end=1000),
    dict(type='CosineAnnealingLR', eta_min=base_lr * 0.05, begin=max_epochs // 2,
         end=max_epochs, T_max=max_epochs // 2, by_epoch=True, convert_to_iter_based=True),
]
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=10, max_keep_ckpts=3))
auto_scale_lr = dict(enable=False, base_batch_size=256)
