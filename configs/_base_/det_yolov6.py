# YOLOv6-style detector (n size) from mmdet 3.3 parts and repq_mm blocks:
# EfficientRep backbone (RepVGG blocks, SPPF) -> Rep-PAN neck (RepVGG-block stages, a RepVGG
# output block per level) -> mmdet's decoupled anchor-free RTMDetSepBNHead (separate branches
# per level, like YOLOv6's efficient decoupled head) with the dynamic soft-label assigner,
# quality focal loss and GIoU loss. Sizes: n = deepen 0.33 / widen 0.25, s = 0.33 / 0.5.
custom_imports = dict(imports=['repq_mm'], allow_failed_imports=False)

deepen_factor = 0.33
widen_factor = 0.25
neck_out_channels = 64
num_classes = 80
act = dict(type='ReLU')          # YOLOv6 uses ReLU in its RepVGG blocks

model = dict(
    type='SingleStageDetector',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[103.53, 116.28, 123.675],
        std=[57.375, 57.12, 58.395],
        bgr_to_rgb=False,
        pad_size_divisor=32,
        batch_augments=None),
    backbone=dict(
        type='EfficientRep',
        base_channels=(64, 128, 256, 512, 1024),
        num_repeats=(1, 6, 12, 18, 6),
        deepen_factor=deepen_factor,
        widen_factor=widen_factor,
        block_type='RepVGGBlock',
        act_cfg=act),
    neck=dict(
        type='RepPAN',
        in_channels=[int(256 * widen_factor), int(512 * widen_factor),
                     int(1024 * widen_factor)],
        base_channels=(256, 128, 128, 256, 256, 512),
        num_repeats=(12, 12, 12, 12),
        deepen_factor=deepen_factor,
        widen_factor=widen_factor,
        out_channels=neck_out_channels,
        block_type='RepVGGBlock',
        act_cfg=act),
    bbox_head=dict(
        type='RTMDetSepBNHead',
        num_classes=num_classes,
        in_channels=neck_out_channels,
        feat_channels=neck_out_channels,
        stacked_convs=2,
        share_conv=False,
        anchor_generator=dict(type='MlvlPointGenerator', offset=0, strides=[8, 16, 32]),
        bbox_coder=dict(type='DistancePointBBoxCoder'),
        loss_cls=dict(type='QualityFocalLoss', use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0),
        with_objectness=False,
        exp_on_reg=False,
        pred_kernel_size=1,
        norm_cfg=dict(type='BN', momentum=0.03, eps=0.001),
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
