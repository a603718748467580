# Quantization-aware fine-tuning of the YOLOv7-tiny-style tree detector from its FP checkpoint
# (configs/yolov7_trees/yolov7-tiny_fp_trees.py): the same detector wrapped in RepQModel;
# leaf configs set `model.repq`.
_base_ = ['../_base_/det_yolov7.py', '../_base_/det_trees_qat.py']
fp_checkpoint = 'work_dirs/yolov7-tiny_fp_trees/epoch_100.pth'
model = dict(
    _delete_=True,                 # replace the base model, do not merge into it
    type='RepQModel',
    # the FP tree detector: det_yolov7.py's model with one class
    architecture=dict(_base_.model, bbox_head=dict(_base_.model.bbox_head, num_classes=1)),
    repq=dict(),                   # method / bits: the leaf configs
    init_checkpoint=fp_checkpoint,
)
custom_hooks = [dict(type='LSQCalibHook')]   # LSQ step sizes from 4 training batches
