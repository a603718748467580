"""Distributed data parallel on CPU (gloo) with mmengine's Runner.

mmengine 0.10.7's ``Runner.wrap_model`` always passes ``device_ids=[LOCAL_RANK]`` to a
``DistributedDataParallel`` wrapper (default or ``model_wrapper_cfg``), and torch refuses
``device_ids`` for a CPU module, so ``tools/dist_train.sh`` cannot train on CPU ranks.
:class:`CPUCompatibleDDP` is ``MMDistributedDataParallel`` that drops ``device_ids`` /
``output_device`` when the module's parameters live on the CPU (unchanged otherwise). It is
registered in mmengine's ``MODEL_WRAPPERS``, so a config selects it the mmengine way::

    model_wrapper_cfg = dict(type='CPUCompatibleDDP', broadcast_buffers=False,
                             find_unused_parameters=False)

``tools/train.py`` does so automatically (:func:`setup_cpu_distributed`) for a distributed
launch without CUDA when the config sets no ``model_wrapper_cfg``. The same function works
around mmengine's ``init_dist`` for the ``pytorch`` launcher, which calls
``torch.cuda.set_device`` unconditionally and so fails on a machine without a GPU driver.

SyncBN: mmengine converts BNs (``sync_bn='torch'``) in ``wrap_model``, *after* the model was
built, i.e. after RepQ conversion; the converted ``nn.SyncBatchNorm`` modules replace the
ones our rep blocks hold (blocks read ``stage.bn`` / ``post_bn`` at every call), so RepQ-BN
and RepQ-BNEst then all-reduce their batch statistics (``repq_mm.rep.stats``). RepQ never
calls the BN modules' own forward during training, which torch's ``SyncBatchNorm`` would
refuse on CPU.
"""
from __future__ import annotations

import torch
from mmengine.logging import print_log
from torch import nn
from mmengine.model.wrappers import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS

from ..rep import RepBlock


def _on_cpu(module: torch.nn.Module) -> bool:
    devices = {p.device.type for p in module.parameters()}
    return devices == {'cpu'} or not devices


@MODEL_WRAPPERS.register_module()
class CPUCompatibleDDP(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that also wraps CPU modules (gloo): ``device_ids`` and
    ``output_device`` are dropped when every parameter is on the CPU, as torch requires."""

    def __init__(self, module, device_ids=None, output_device=None, **kwargs):
        if _on_cpu(module):
            device_ids = output_device = None
        super().__init__(module=module, device_ids=device_ids, output_device=output_device,
                         **kwargs)

    def _passing_sync_batchnorm_handle(self, module):
        """torch refuses every ``SyncBatchNorm`` in a CPU module (its forward needs a GPU).
        BNs inside RepQ blocks are fine: the block folds them with statistics it all-reduces
        itself (``repq_mm.rep.stats.channel_var_mean(sync=True)``) and never calls their
        forward. Any other ``SyncBatchNorm`` is refused, naming it."""
        if self.device_type != 'cpu':
            return super()._passing_sync_batchnorm_handle(module)
        owned = {id(bn) for m in module.modules() if isinstance(m, RepBlock) and m.repq
                 for bn in m.bns()}
        for name, layer in module.named_modules():
            if isinstance(layer, nn.SyncBatchNorm) and id(layer) not in owned:
                raise ValueError(
                    f'SyncBatchNorm {name!r} on CPU ranks: torch\'s SyncBatchNorm forward '
                    'needs a GPU; on CPU only BNs inside RepQ blocks (statistics all-reduced '
                    'by repq_mm) can be synchronised. Drop sync_bn or keep that layer a '
                    'plain BatchNorm.')


def setup_cpu_distributed(cfg) -> bool:
    """Make a distributed launch work on CPU ranks (no CUDA): what ``tools/train.py`` calls
    before building the Runner. Does nothing when CUDA is available or the launcher is
    ``'none'``. Otherwise:

    * ``launcher='pytorch'`` (torchrun, ``tools/dist_train.sh``): initialises the process
      group itself, as mmengine's ``init_dist`` would but without its unconditional
      ``torch.cuda.set_device`` (which raises without a GPU driver), with the backend of
      ``env_cfg.dist_cfg`` (``nccl`` needs CUDA: gloo instead) and its ``timeout``;
      the Runner then finds the group initialised and uses it;
    * ``model_wrapper_cfg``: :class:`CPUCompatibleDDP` with the Runner's own defaults
      (``broadcast_buffers=False``, ``find_unused_parameters`` from the config), unless the
      config chose a wrapper.

    Returns whether it changed anything.
    """
    import datetime

    import torch.distributed as dist
    import torch.multiprocessing as mp
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none' or torch.cuda.is_available():
        return False
    if launcher == 'pytorch' and not (dist.is_available() and dist.is_initialized()):
        env_cfg = cfg.get('env_cfg', None) or {}
        dist_cfg = dict(env_cfg.get('dist_cfg', None) or {})
        backend = dist_cfg.pop('backend', 'gloo')
        if backend == 'nccl':
            print_log('no CUDA: dist_cfg.backend nccl replaced by gloo', logger='current',
                      level=30)
            backend = 'gloo'
            if isinstance(env_cfg.get('dist_cfg', None), dict):
                cfg.env_cfg.dist_cfg['backend'] = 'gloo'
        if dist_cfg.get('timeout', None) is not None:
            dist_cfg['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
        if mp.get_start_method(allow_none=True) is None:
            mp.set_start_method('spawn')
        dist.init_process_group(backend=backend, **dist_cfg)
    if cfg.get('model_wrapper_cfg', None) is None:
        cfg.model_wrapper_cfg = dict(type='CPUCompatibleDDP', broadcast_buffers=False,
                                     find_unused_parameters=cfg.get('find_unused_parameters',
                                                                    False))
    print_log('no CUDA: distributed training on CPU ranks '
              f'({cfg.model_wrapper_cfg.get("type")})', logger='current')
    return True
