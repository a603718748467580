"""Re-parameterized blocks (torch only)."""
from .base import REP_BLOCKS, RepBlock, register_block
from .kernels import compose, identity_kernel, pad_to, regroup
from .acb import ACBlock
from .dbb import DiverseBranchBlock
from .ecb import ECBBlock
from .linear_chain import LinearChainBlock
from .mobileone import MobileOneBlock
from .orepa import OREPABlock
from .repvgg import QARepVGGBlock, RepVGGBlock
from .yolo import RepConv
from .stages import AvgStage, ConvStage, IdentityStage, MaskStage, ScaleStage, Stage

__all__ = ['REP_BLOCKS', 'RepBlock', 'register_block', 'compose', 'identity_kernel', 'pad_to',
           'regroup', 'RepVGGBlock', 'QARepVGGBlock', 'Stage', 'ConvStage', 'IdentityStage',
           'AvgStage', 'MaskStage', 'ScaleStage', 'ACBlock', 'DiverseBranchBlock', 'ECBBlock',
           'LinearChainBlock', 'MobileOneBlock', 'OREPABlock', 'RepConv']
