# RepQ fine-tuning of the YOLOv6-s-style COCO detector from its FP checkpoint: the n-size
# QAT base with the s widths (as in yolov6-s_fp_8xb32-300e_coco.py); leaf configs set
# `model.repq`.
_base_ = './yolov6-n_qat-base_8xb32-20e_coco.py'
fp_checkpoint = 'work_dirs/yolov6-s_fp_8xb32-300e_coco/epoch_300.pth'
model = dict(
    architecture=dict(
        backbone=dict(widen_factor=0.5),
        neck=dict(in_channels=[128, 256, 512], widen_factor=0.5, out_channels=128),
        bbox_head=dict(in_channels=128, feat_channels=128)),
    init_checkpoint=fp_checkpoint)
