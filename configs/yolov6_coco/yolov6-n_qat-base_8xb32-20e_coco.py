# RepQ fine-tuning of the YOLOv6-n-style COCO detector from its FP checkpoint; leaf configs
# set only the `repq` dict.
_base_ = ['../_base_/det_yolov6.py', '../_base_/det_coco_qat.py']

fp_checkpoint = 'work_dirs/yolov6-n_fp_8xb32-300e_coco/epoch_300.pth'
