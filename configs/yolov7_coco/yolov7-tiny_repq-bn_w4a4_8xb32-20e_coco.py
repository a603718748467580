# RepQ-BN W4A4, YOLOv7-tiny-style detector, COCO.
_base_ = './yolov7-tiny_qat-base_8xb32-20e_coco.py'
model = dict(repq=dict(
    method='repq', bn_mode='exact', w_bits=4, a_bits=4, per_channel=True, init='mse',
    first_bits=8, layer_bits={'bbox_head.rtm_cls': 8, 'bbox_head.rtm_reg': 8}))
