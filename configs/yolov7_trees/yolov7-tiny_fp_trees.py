# Full-precision YOLOv7-tiny-style detector (ELAN backbone / neck, RepConv outputs) on the
# DeepForest tree tiles, trained from scratch: 100 epochs, 900 iterations of batch 4 at 416 px.
_base_ = ['../_base_/det_yolov7.py', '../_base_/det_trees.py']
model = dict(bbox_head=dict(num_classes=1))
