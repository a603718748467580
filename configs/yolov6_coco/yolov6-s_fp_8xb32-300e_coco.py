# Full-precision YOLOv6-s-style detector (deepen 0.33 / widen 0.5) on COCO, 640x640, from scratch.
#   bash tools/dist_train.sh configs/yolov6_coco/yolov6-s_fp_8xb32-300e_coco.py 8
_base_ = ['../_base_/det_yolov6.py', '../_base_/det_coco_640.py']
model = dict(
    backbone=dict(widen_factor=0.5),
    neck=dict(in_channels=[128, 256, 512], widen_factor=0.5, out_channels=128),
    bbox_head=dict(in_channels=128, feat_channels=128))
