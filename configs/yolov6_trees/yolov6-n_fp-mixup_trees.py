# The FP YOLOv6-n-style tree detector with RTMDet-tiny's full augmentation: MixUp of two
# mosaics for half of the batches until the no-mosaic last stage (mmdet's rtmdet_tiny recipe).
_base_ = ['./yolov6-n_fp_trees.py']
train_dataloader = dict(dataset=dict(pipeline={{_base_.train_pipeline_mixup}}))
