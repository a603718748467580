"""Re-parameterized blocks (torch only)."""
from .base import REP_BLOCKS, RepBlock, register_block
from .kernels import compose, identity_kernel, pad_to, regroup
from .repvgg import QARepVGGBlock, RepVGGBlock
from .stages import AvgStage, ConvStage, IdentityStage, MaskStage, ScaleStage, Stage

__all__ = ['REP_BLOCKS', 'RepBlock', 'register_block', 'compose', 'identity_kernel', 'pad_to',
           'regroup', 'RepVGGBlock', 'QARepVGGBlock', 'Stage', 'ConvStage', 'IdentityStage',
           'AvgStage', 'MaskStage', 'ScaleStage']
