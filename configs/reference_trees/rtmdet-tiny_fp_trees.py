# External reference for the tree detectors: mmdet's own RTMDet-tiny (CSPNeXt backbone,
# CSPNeXt-PAFPN neck, shared-conv separate-BN head), from scratch (no ImageNet backbone),
# trained with exactly the data pipeline, schedule, EMA and evaluation of the YOLOv6- /
# YOLOv7-style FP tree configs (configs/_base_/det_trees.py), so only the model differs.
# BN instead of SyncBN (single process on CPU). Not a RepQ model: nothing is quantized.
_base_ = ['../_base_/det_trees.py']

act = dict(type='SiLU', inplace=True)
norm = dict(type='BN')
model = dict(
    type='RTMDet',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[103.53, 116.28, 123.675],
        std=[57.375, 57.12, 58.395],
        bgr_to_rgb=False,
        batch_augments=None),
    backbone=dict(
        type='CSPNeXt', arch='P5', expand_ratio=0.5, deepen_factor=0.167, widen_factor=0.375,
        channel_attention=True, norm_cfg=norm, act_cfg=act),
    neck=dict(
        type='CSPNeXtPAFPN', in_channels=[96, 192, 384], out_channels=96, num_csp_blocks=1,
        expand_ratio=0.5, norm_cfg=norm, act_cfg=act),
    bbox_head=dict(
        type='RTMDetSepBNHead',
        num_classes=1,
        in_channels=96,
        stacked_convs=2,
        feat_channels=96,
        anchor_generator=dict(type='MlvlPointGenerator', offset=0, strides=[8, 16, 32]),
        bbox_coder=dict(type='DistancePointBBoxCoder'),
        loss_cls=dict(type='QualityFocalLoss', use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0),
        with_objectness=False,
        exp_on_reg=False,
        share_conv=True,
        pred_kernel_size=1,
        norm_cfg=norm,
        act_cfg=act),
    train_cfg=dict(
        assigner=dict(type='DynamicSoftLabelAssigner', topk=13),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    test_cfg=dict(
        nms_pre=30000,
        min_bbox_size=0,
        score_thr=0.001,
        nms=dict(type='nms', iou_threshold=0.65),
        max_per_img=300),
)
