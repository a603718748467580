"""Small pure-torch reference networks built from the rep blocks (no OpenMMLab needed)."""
from .repvgg import REPVGG_ARCHS, RepVGGNet

__all__ = ['REPVGG_ARCHS', 'RepVGGNet']
