# Full-precision YOLOv7-tiny-style detector (ELAN, RepConv outputs) on COCO, 640x640.
#   bash tools/dist_train.sh configs/yolov7_coco/yolov7-tiny_fp_8xb32-300e_coco.py 8
_base_ = ['../_base_/det_yolov7.py', '../_base_/det_coco_640.py']
