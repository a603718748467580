"""LSQ fake quantizers and quantized plain layers (torch only)."""
from .config import BN_MODES, QConfig
from .layers import QConv2d, QLinear, int_grid_bias
from .lsq import LSQQuantizer, check_bits, lsq_fake_quant, quant_range

__all__ = ['BN_MODES', 'QConfig', 'QConv2d', 'QLinear', 'LSQQuantizer', 'check_bits',
           'int_grid_bias', 'lsq_fake_quant', 'quant_range']
