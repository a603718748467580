# RTMDet-tiny reference with its own full augmentation (MixUp of two mosaics for half of the
# batches until the no-mosaic last stage, as in mmdet's rtmdet_tiny config).
_base_ = ['./rtmdet-tiny_fp_trees.py']
train_dataloader = dict(dataset=dict(pipeline={{_base_.train_pipeline_mixup}}))
