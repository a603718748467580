"""Non-finite detection during RepQ training: :class:`NonFiniteCheckHook`.

The core hot path only checks once per quantizer, when its step size is initialised
(:meth:`repq_mm.quant.LSQQuantizer.initialize`, and the inputs seen by
:func:`~repq_mm.mm.hooks.calibrate_lsq`). This optional hook adds a cheap check after every
``interval`` training iterations: the iteration's losses and every LSQ step size (one
``isfinite`` over the concatenated steps); on failure it names the first bad quantizer and
parameter and raises before the checkpoint hook saves the broken state::

    custom_hooks = [dict(type='NonFiniteCheckHook', interval=1)]
"""
from __future__ import annotations

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn

from ..quant import LSQQuantizer


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def first_nonfinite(model: nn.Module, params: bool = True) -> list[str]:
    """Descriptions of the first non-finite LSQ step size and (with ``params``) the first
    non-finite parameter / floating-point buffer of ``model``, in module order."""
    out = []
    for name, m in _unwrap(model).named_modules():
        if isinstance(m, LSQQuantizer) and not bool(torch.isfinite(m.step.detach()).all()):
            out.append(f'LSQ step size of {name} = {m.step.detach().flatten()[:4].tolist()}')
            break
    if params:
        tensors = list(_unwrap(model).named_parameters()) + [
            (n, b) for n, b in _unwrap(model).named_buffers() if b.is_floating_point()]
        for name, t in tensors:
            if not bool(torch.isfinite(t.detach()).all()):
                out.append(f'{"parameter" if isinstance(t, nn.Parameter) else "buffer"} '
                           f'{name}')
                break
    return out


@HOOKS.register_module()
class NonFiniteCheckHook(Hook):
    """Raise ``FloatingPointError`` as soon as a loss or an LSQ step size is not finite.

    Args:
        interval: check every this many training iterations.
        check_params: also check every parameter each time (slower; on a failure they are
            always scanned to name the first bad one).

    Runs before the checkpoint hook (priority ``ABOVE_NORMAL``), so no checkpoint of a
    broken state is written by the failing iteration.
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self, interval: int = 1, check_params: bool = False):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f'interval must be a positive int, got {interval!r}')
        self.interval = interval
        self.check_params = check_params
        self._steps: list[tuple[str, nn.Parameter]] | None = None

    def before_train(self, runner) -> None:
        self._steps = None

    def _step_params(self, runner):
        if self._steps is None:
            self._steps = [(n, m.step) for n, m in _unwrap(runner.model).named_modules()
                           if isinstance(m, LSQQuantizer)]
        return self._steps

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if not self.every_n_train_iters(runner, self.interval):
            return
        bad_losses = [k for k, v in (outputs or {}).items()
                      if isinstance(v, torch.Tensor) and v.is_floating_point()
                      and not bool(torch.isfinite(v.detach()).all())]
        steps = self._step_params(runner)
        steps_ok = not steps or bool(torch.isfinite(
            torch.cat([p.detach().reshape(-1) for _, p in steps])).all())
        params_ok = True
        if self.check_params:
            params_ok = not first_nonfinite(runner.model, params=True)
        if not bad_losses and steps_ok and params_ok:
            return
        where = first_nonfinite(runner.model, params=True)
        msg = f'non-finite values after training iteration {runner.iter + 1}'
        if bad_losses:
            msg += f': loss(es) {bad_losses}'
        msg += '; ' + ('; '.join(where) if where else
                       'all step sizes and parameters are finite (the input batch or the '
                       'forward produced it)')
        raise FloatingPointError(msg)
