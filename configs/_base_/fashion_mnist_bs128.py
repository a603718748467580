# Fashion-MNIST (Debian package dataset-fashion-mnist, fetched by
# tools/dataset_converters/fetch_fashion_mnist.py) at 32x32, one grey channel.
dataset_type = 'FashionMNIST'
data_root = 'data/fashion_mnist'

data_preprocessor = dict(
    num_classes=10,
    mean=[72.94],   # 0.2860 * 255
    std=[90.02],    # 0.3530 * 255
    to_rgb=False,
)

train_pipeline = [
    dict(type='RandomCrop', crop_size=32, padding=4),   # 28 -> 36 -> random 32 crop
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='RandomCrop', crop_size=32, padding=2),   # deterministic: pad 28 -> 32
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=128,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(type=dataset_type, data_prefix=data_root, split='train',
                 test_mode=False, download=False, pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
)
# mmpretrain 1.2.0: split='test' needs test_mode=True, else the training set is loaded
val_dataloader = dict(
    batch_size=500,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(type=dataset_type, data_prefix=data_root, split='test',
                 test_mode=True, download=False, pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator
