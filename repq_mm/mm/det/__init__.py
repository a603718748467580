"""Detection parts for RepQ (mmdet 3.x): YOLOv6-style and YOLOv7-style backbones and necks
built from our rep blocks, registered in mmdet's ``MODELS`` (``type='EfficientRep'``,
``'RepPAN'``, ``'ELANNet'``, ``'ELANPAN'``). The heads, losses, assigners, datasets and
metrics are mmdet's own (see ``configs/yolov6_trees``). Imported by :mod:`repq_mm.mm` when
mmdet is installed.
"""
from .backbones import EfficientRep, ELANNet
from .layers import SPPF, ELANBlock, RepStage, make_divisible, make_round, rep_block
from .necks import ELANPAN, RepPAN

__all__ = ['EfficientRep', 'ELANNet', 'RepPAN', 'ELANPAN', 'RepStage', 'SPPF', 'ELANBlock',
           'rep_block', 'make_divisible', 'make_round']
