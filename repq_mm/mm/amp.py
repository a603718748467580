"""Mixed precision on machines without a GPU: :class:`CPUAmpOptimWrapper`.

mmengine's ``AmpOptimWrapper`` (what ``tools/train.py --amp`` selects) asserts a GPU / NPU /
MLU / MUSA device at construction, so ``--amp`` cannot run on a CPU-only machine.
``CPUAmpOptimWrapper`` is the same optimizer wrapper with the same ``optim_context`` —
``mmengine.runner.amp.autocast`` around the forward pass and the loss — on the CPU: bfloat16
by default (no loss scaling needed), or float16 with ``torch.amp.GradScaler('cpu')``. This
project's ``tools/train.py --amp`` selects it only where no CUDA device exists; with CUDA it
selects mmengine's ``AmpOptimWrapper`` unchanged.

Example config::

    optim_wrapper = dict(type='CPUAmpOptimWrapper', dtype='bfloat16',
                         optimizer=dict(type='SGD', lr=0.01, momentum=0.9))
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from mmengine.runner.amp import autocast
from torch import nn

_DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16}


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward passes run under CPU autocast.

    Args:
        dtype: ``'bfloat16'`` (default) or ``'float16'`` (or the torch dtype).
        loss_scale: float16 only: ``'dynamic'`` (default), a float (initial scale) or a
            dict of ``torch.amp.GradScaler`` arguments; ignored for bfloat16, which has
            float32's exponent range.
        **kwargs: passed to ``OptimWrapper``.
    """

    def __init__(self, dtype='bfloat16', loss_scale='dynamic', **kwargs):
        super().__init__(**kwargs)
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f'CPUAmpOptimWrapper: dtype must be one of '
                                 f'{sorted(_DTYPES)}, got {dtype!r}')
            dtype = _DTYPES[dtype]
        if dtype not in _DTYPES.values():
            raise ValueError(f'CPUAmpOptimWrapper: dtype must be bfloat16 or float16, got '
                             f'{dtype!r}')
        self.cast_dtype = dtype
        self.loss_scaler = None
        if dtype == torch.float16:
            if loss_scale == 'dynamic':
                self.loss_scaler = torch.amp.GradScaler('cpu')
            elif isinstance(loss_scale, float):
                self.loss_scaler = torch.amp.GradScaler('cpu', init_scale=loss_scale)
            elif isinstance(loss_scale, dict):
                self.loss_scaler = torch.amp.GradScaler('cpu', **loss_scale)
            else:
                raise TypeError(f'loss_scale must be "dynamic", a float or a dict, got '
                                f'{loss_scale!r}')

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        if self.loss_scaler is not None:
            loss = self.loss_scaler.scale(loss)
        loss.backward(**kwargs)
        self._inner_count += 1

    def step(self, **kwargs) -> None:
        if self.loss_scaler is None:
            return super().step(**kwargs)
        if self.clip_grad_kwargs:
            self.loss_scaler.unscale_(self.optimizer)
            self._clip_grad()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.loss_scaler is not None:
            state['loss_scaler'] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        scaler = state_dict.pop('loss_scaler', None)
        if scaler is not None and self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(scaler)
        super().load_state_dict(state_dict)

    @contextmanager
    def optim_context(self, model: nn.Module):
        with super().optim_context(model), autocast(device_type='cpu',
                                                    dtype=self.cast_dtype):
            yield


def amp_optim_wrapper_type() -> str:
    """What ``--amp`` selects here: mmengine's ``AmpOptimWrapper`` where CUDA (or another
    accelerator mmengine supports) exists, else :class:`CPUAmpOptimWrapper`."""
    from mmengine.device import (is_cuda_available, is_mlu_available, is_musa_available,
                                 is_npu_available)
    if is_cuda_available() or is_npu_available() or is_mlu_available() or \
            is_musa_available():
        return 'AmpOptimWrapper'
    return 'CPUAmpOptimWrapper'
