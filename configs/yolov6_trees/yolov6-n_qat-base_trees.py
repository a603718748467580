# Quantization-aware fine-tuning of the YOLOv6-n-style tree detector from its FP checkpoint
# (configs/yolov6_trees/yolov6-n_fp_trees.py). Leaf configs set only the `repq` dict.
_base_ = ['../_base_/det_yolov6.py', '../_base_/det_trees_qat.py']
model = dict(bbox_head=dict(num_classes=1))
# where `python tools/train.py configs/yolov6_trees/yolov6-n_fp_trees.py` puts it
fp_checkpoint = 'work_dirs/yolov6-n_fp_trees/epoch_100.pth'
