# Full-precision YOLOv6-n-style detector (deepen 0.33 / widen 0.25) on COCO, 640x640, from scratch.
#   bash tools/dist_train.sh configs/yolov6_coco/yolov6-n_fp_8xb32-300e_coco.py 8
_base_ = ['../_base_/det_yolov6.py', '../_base_/det_coco_640.py']

