# RepQ fine-tuning of the YOLOv6-s-style COCO detector from its FP checkpoint; leaf configs
# set only the `repq` dict.
_base_ = ['../_base_/det_yolov6.py', '../_base_/det_coco_qat.py']
model = dict(
    backbone=dict(widen_factor=0.5),
    neck=dict(in_channels=[128, 256, 512], widen_factor=0.5, out_channels=128),
    bbox_head=dict(in_channels=128, feat_channels=128))
fp_checkpoint = 'work_dirs/yolov6-s_fp_8xb32-300e_coco/epoch_300.pth'
