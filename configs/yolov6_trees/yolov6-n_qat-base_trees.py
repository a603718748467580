# Quantization-aware fine-tuning of the YOLOv6-n-style tree detector from its FP checkpoint
# (configs/yolov6_trees/yolov6-n_fp_trees.py): the same detector wrapped in RepQModel; leaf
# configs set `model.repq`.
_base_ = ['../_base_/det_yolov6.py', '../_base_/det_trees_qat.py']
# where `python tools/train.py configs/yolov6_trees/yolov6-n_fp_trees.py` puts it
fp_checkpoint = 'work_dirs/yolov6-n_fp_trees/epoch_100.pth'
model = dict(
    _delete_=True,                 # replace the base model, do not merge into it
    type='RepQModel',
    # the FP tree detector: det_yolov6.py's model with one class
    architecture=dict(_base_.model, bbox_head=dict(_base_.model.bbox_head, num_classes=1)),
    repq=dict(),                   # method / bits: the leaf configs
    init_checkpoint=fp_checkpoint,
)
custom_hooks = [dict(type='LSQCalibHook')]   # LSQ step sizes from 4 training batches
