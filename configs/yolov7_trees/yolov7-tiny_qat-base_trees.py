# Quantization-aware fine-tuning of the YOLOv7-tiny-style tree detector from its FP checkpoint.
_base_ = ['../_base_/det_yolov7.py', '../_base_/det_trees_qat.py']
model = dict(bbox_head=dict(num_classes=1))
fp_checkpoint = 'work_dirs/yolov7-tiny_fp_trees/epoch_100.pth'
