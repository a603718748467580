# RepQ fine-tuning of the YOLOv7-tiny-style COCO detector from its FP checkpoint: the
# detector of det_yolov7.py wrapped in RepQModel; leaf configs set `model.repq`.
_base_ = ['../_base_/det_yolov7.py', '../_base_/det_coco_qat.py']
fp_checkpoint = 'work_dirs/yolov7-tiny_fp_8xb32-300e_coco/epoch_300.pth'
model = dict(
    _delete_=True,                 # replace the base model, do not merge into it
    type='RepQModel',
    architecture=_base_.model,     # the FP detector (yolov7-tiny_fp_8xb32-300e_coco.py)
    repq=dict(),                   # method / bits: the leaf configs
    init_checkpoint=fp_checkpoint,
)
custom_hooks = [dict(type='LSQCalibHook')]   # LSQ step sizes from 4 training batches
