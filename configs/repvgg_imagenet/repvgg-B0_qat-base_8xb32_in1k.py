# Quantization-aware fine-tuning of mmpretrain's RepVGG-B0 from its released FP checkpoint
# (ImageNet-1k, 8 GPUs x 32 images): mmpretrain's classifier wrapped in RepQModel; leaf
# configs set `model.repq`.
_base_ = 'mmpretrain::repvgg/repvgg-B0_8xb32_in1k.py'
custom_imports = dict(imports=['repq_mm'], allow_failed_imports=False)

fp_checkpoint = 'https://download.openmmlab.com/mmclassification/v0/repvgg/repvgg-B0_8xb32_in1k_20221213-5091ecc7.pth'
model = dict(
    _delete_=True,                 # replace mmpretrain's model, do not merge into it
    type='RepQModel',
    architecture=_base_.model,     # mmpretrain's RepVGG classifier
    repq=dict(),                   # method / bits: the leaf configs
    init_checkpoint=fp_checkpoint,
)
custom_hooks = [dict(type='LSQCalibHook')]   # LSQ step sizes from 4 training batches

qat_epochs = 20
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4),
    # parameter names change after conversion (branches.N.M.bn): no decay on BN, biases and
    # LSQ step sizes
    paramwise_cfg=dict(_delete_=True, bias_decay_mult=0.0, norm_decay_mult=0.0,
                       custom_keys={'.step': dict(decay_mult=0.0)}))
param_scheduler = dict(type='CosineAnnealingLR', T_max=qat_epochs, by_epoch=True, begin=0,
                       end=qat_epochs, convert_to_iter_based=True)
train_cfg = dict(by_epoch=True, max_epochs=qat_epochs, val_interval=1)
