# Full-precision RepVGG (A0 layout: blocks [2, 4, 14, 1], width factors 0.75/0.75/0.75/2.5,
# base width 16 instead of 64) on Fashion-MNIST at 32x32, trained from scratch.
_base_ = [
    'mmpretrain::_base_/models/repvgg-A0_in1k.py',
    'mmpretrain::_base_/default_runtime.py',
    '../_base_/fashion_mnist_bs128.py',
]
custom_imports = dict(imports=['repq_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(in_channels=1, base_channels=16),
    head=dict(num_classes=10, in_channels=320, topk=(1, )),
)

optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.2, momentum=0.9, weight_decay=5e-5, nesterov=True),
    paramwise_cfg=dict(bias_decay_mult=0.0, norm_decay_mult=0.0),
)
max_epochs = 6
param_scheduler = [
    dict(type='LinearLR', start_factor=0.05, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=max_epochs - 1, by_epoch=True, begin=1,
         end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict()
test_cfg = dict()

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=100),
    checkpoint=dict(type='CheckpointHook', interval=max_epochs, max_keep_ckpts=1),
)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0, deterministic=False)
