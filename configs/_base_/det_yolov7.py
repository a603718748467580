# YOLOv7-style detector (tiny size) from mmdet 3.3 parts and repq_mm blocks:
# ELANNet backbone (ELAN blocks, SPPF) -> ELAN-PAN neck with a YOLOv7 RepConv output per
# level -> mmdet's decoupled anchor-free RTMDetSepBNHead (dynamic soft-label assigner, quality
# focal loss, GIoU loss). YOLOv7-tiny widths (32 ... 512), LeakyReLU(0.1).
_base_ = ['./det_yolov6.py']

widen_factor = 1.0
neck_out_channels = 128
act = dict(type='LeakyReLU', negative_slope=0.1)

model = dict(
    backbone=dict(
        _delete_=True,
        type='ELANNet',
        base_channels=(32, 64, 128, 256, 512),
        widen_factor=widen_factor,
        elan_depth=2,
        act_cfg=act),
    neck=dict(
        _delete_=True,
        type='ELANPAN',
        in_channels=[int(128 * widen_factor), int(256 * widen_factor),
                     int(256 * widen_factor)],
        mid_channels=(64, 128, 256),
        widen_factor=widen_factor,
        out_channels=neck_out_channels,
        out_block_type='RepConv',
        act_cfg=act),
    bbox_head=dict(in_channels=neck_out_channels, feat_channels=neck_out_channels,
                   act_cfg=act),
)
