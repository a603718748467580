# RepQ-BN W8A8, YOLOv6-s-style detector, COCO (bn_mode='est' for RepQ-BNEst).
_base_ = './yolov6-s_qat-base_8xb32-20e_coco.py'
model = dict(repq=dict(
    method='repq', bn_mode='exact', w_bits=8, a_bits=8, per_channel=True, init='mse',
    first_bits=8, layer_bits={'bbox_head.rtm_cls': 8, 'bbox_head.rtm_reg': 8}))
