# RepQ fine-tuning of the YOLOv7-tiny-style COCO detector from its FP checkpoint.
_base_ = ['../_base_/det_yolov7.py', '../_base_/det_coco_qat.py']
fp_checkpoint = 'work_dirs/yolov7-tiny_fp_8xb32-300e_coco/epoch_300.pth'
