# RepQ-BNEst with periodic correction (ours, not in the paper), W4A4: the RepQ-BNEst config, and
# every 8th step the exact batch statistics are computed too, used, and turned into a
# per-channel correction (variance ratio, mean shift) for the steps between.
_base_ = './yolov6-n_repq-bnest_w4a4_trees.py'
model = dict(repq=dict(est_refresh=8))
