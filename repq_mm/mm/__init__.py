"""OpenMMLab layer of repq_mm: importing it registers everything.

* mmengine's root ``MODELS``: :class:`RepQModel` and the torch-only building blocks (every
  class in :data:`repq_mm.rep.REP_BLOCKS`, ``QConv2d``, ``QLinear``). Child registries
  (mmpretrain, mmdet) find them through their parent, so configs of any default scope can
  use ``type='RepQModel'``.
* ``HOOKS``: :class:`LSQCalibHook`, :class:`BNEstHook`, :class:`NonFiniteCheckHook`.
* ``MODEL_WRAPPERS``: :class:`CPUCompatibleDDP` (DDP on CPU ranks, see :mod:`.ddp`).
* ``OPTIM_WRAPPERS``: :class:`CPUAmpOptimWrapper` (``--amp`` without a GPU, see :mod:`.amp`).
* mmdet's ``MODELS`` (only when mmdet is installed): the detector backbones / necks of
  :mod:`repq_mm.mm.det` (``EfficientRep``, ``RepPAN``, ``ELANNet``, ``ELANPAN``).
* ``torch.load(weights_only=True)`` allowlist for mmengine checkpoints
  (:mod:`repq_mm.mm.checkpoint`).

A config needs only ``custom_imports = dict(imports=['repq_mm'], allow_failed_imports=False)``
and its model declared as ``dict(type='RepQModel', architecture=..., repq=...)``.
Importing this package also makes mmengine's ``Config`` refuse the old form, a top-level
``repq`` dict beside a plain model, under every tool (:mod:`.config`).
"""
from mmengine.registry import MODELS

from ..quant import QConv2d, QLinear
from ..rep import REP_BLOCKS
from .amp import CPUAmpOptimWrapper, amp_optim_wrapper_type
from .checkpoint import SAFE_GLOBALS, register_safe_globals, safe_load, state_dict_of
from .config import RepQConfigError, check_config, install_config_check
from .ddp import CPUCompatibleDDP, setup_cpu_distributed
from .hooks import (BNEstHook, LSQCalibHook, calibrate_lsq, reestimate_bn, set_bn_mode,
                    step_stats)
from .model import REPQ_DEFAULTS, RepQModel, check_repq_cfg
from .nonfinite import NonFiniteCheckHook, first_nonfinite


def _register_modules() -> None:
    for cls in (*REP_BLOCKS.values(), QConv2d, QLinear):
        if MODELS.get(cls.__name__) is not cls and cls.__name__ not in MODELS.module_dict:
            MODELS.register_module(module=cls)


register_safe_globals()
_register_modules()
install_config_check()

# detection parts (mmdet's MODELS), only where mmdet is installed and importable
try:
    import mmdet.registry  # noqa: F401
except (ImportError, AssertionError):   # not installed / mmcv version it refuses
    pass
else:
    from . import det  # noqa: F401

__all__ = ['CPUAmpOptimWrapper', 'amp_optim_wrapper_type', 'RepQModel', 'check_repq_cfg', 'REPQ_DEFAULTS', 'check_config', 'RepQConfigError',
           'install_config_check', 'LSQCalibHook', 'BNEstHook', 'calibrate_lsq',
           'reestimate_bn', 'set_bn_mode', 'step_stats', 'SAFE_GLOBALS',
           'register_safe_globals', 'safe_load', 'state_dict_of', 'CPUCompatibleDDP',
           'setup_cpu_distributed', 'NonFiniteCheckHook', 'first_nonfinite']
