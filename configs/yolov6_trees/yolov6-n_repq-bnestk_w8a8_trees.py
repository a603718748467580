# RepQ-BNEst with Kronecker-factored statistics (ours, not in the paper), W8A8: the RepQ-BNEst
# config with the branch output variances from the input's channel covariance (exact for 1x1
# branches) times its KxK spatial autocorrelation (docs/method.md); no exact passes during
# training.
_base_ = './yolov6-n_repq-bnest_w8a8_trees.py'
model = dict(repq=dict(est_stats='kron'))
