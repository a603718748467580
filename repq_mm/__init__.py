"""repq_mm: RepQ quantization-aware training for re-parameterized networks.

The core (``repq_mm.quant``, ``repq_mm.rep``, ``repq_mm.convert``) needs torch only.
OpenMMLab registration lives in ``repq_mm.mm`` and is imported here only when mmengine is
installed, so ``custom_imports = dict(imports=['repq_mm'])`` is all a config needs.
"""
from .quant import LSQQuantizer, QConfig, QConv2d, QLinear
from .rep import REP_BLOCKS, RepBlock
from .convert import convert_to_repq, merge_model

__version__ = '0.1.0'
__all__ = ['LSQQuantizer', 'QConfig', 'QConv2d', 'QLinear', 'REP_BLOCKS', 'RepBlock',
           'convert_to_repq', 'merge_model']

# OpenMMLab registration, only where mmengine is installed (the core stays torch-only).
try:
    import mmengine  # noqa: F401
except ImportError:
    pass
else:
    from . import mm  # noqa: F401
