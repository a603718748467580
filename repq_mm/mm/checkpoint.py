"""Loading mmengine checkpoints with ``torch.load(weights_only=True)`` (torch >= 2.6).

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch 2.6 that means
``weights_only=True`` and every mmengine checkpoint fails on its ``message_hub`` entry. We
never switch ``weights_only`` off. Instead, importing :mod:`repq_mm.mm` allowlists exactly
the globals an mmengine 0.10.7 checkpoint contains (found with
``torch.serialization.get_unsafe_globals_in_checkpoint`` on real checkpoints):

* ``mmengine.logging.history_buffer.HistoryBuffer`` (``message_hub['log_scalars']``);
* numpy arrays inside it: ``numpy.ndarray``, ``numpy._core.multiarray._reconstruct``,
  ``numpy.dtype`` and the two dtype classes the buffers use (``numpy.dtypes.Float64DType``,
  ``numpy.dtypes.Int64DType``: a dtype is rebuilt with ``BUILD``, which checks its class); numpy scalars in ``runtime_info`` (e.g. ``eta``):
  ``numpy._core.multiarray.scalar``. numpy 1.x writes the same two functions under
  ``numpy.core.multiarray``; both spellings resolve to the same function;
* ``builtins.getattr``: ``HistoryBuffer.__getstate__`` pickles its statistics methods
  (``getattr(HistoryBuffer, 'min')`` ...). A real ``getattr`` would make the allowlist
  meaningless (it reaches any attribute of any allowed object), so the name is bound to
  :func:`history_buffer_getattr`, which resolves only functions defined on
  ``HistoryBuffer`` and raises for everything else;
* ``builtins.bytes``: ``torch.save`` pickles with protocol 2, which writes an *empty* bytes
  object (the data of an empty numpy array, e.g. a ``HistoryBuffer`` that logged nothing
  yet) as the call ``bytes()``; the name is bound to :func:`empty_bytes`, which returns
  ``b''`` and refuses any argument (``bytes(n)`` would allocate ``n`` bytes).
"""
from __future__ import annotations

import pickle

import numpy as np
import torch

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray

from mmengine.logging.history_buffer import HistoryBuffer


def history_buffer_getattr(obj, name, *default):
    """Restricted stand-in for ``builtins.getattr`` during ``weights_only`` loading: only
    ``getattr(HistoryBuffer, <statistics method>)`` as written by
    ``HistoryBuffer.__getstate__``."""
    if obj is HistoryBuffer and isinstance(name, str) and not name.startswith('_'):
        value = HistoryBuffer.__dict__.get(name)
        if callable(value) and getattr(value, '__module__', None) == HistoryBuffer.__module__:
            return value
        if name in HistoryBuffer._statistics_methods:  # registered custom statistics
            return HistoryBuffer._statistics_methods[name]
    raise pickle.UnpicklingError(
        f'weights_only load: getattr({obj!r}, {name!r}) is not allowed (only HistoryBuffer '
        'statistics methods are)')


def empty_bytes(*args):
    """Restricted stand-in for ``builtins.bytes`` during ``weights_only`` loading: only the
    argument-less call protocol 2 writes for ``b''``."""
    if args:
        raise pickle.UnpicklingError(
            f'weights_only load: bytes{args!r} is not allowed (only bytes() is)')
    return b''


def _safe_globals() -> list:
    globs = [
        HistoryBuffer,
        np.ndarray,
        np.dtype,
        # dtype instances are BUILT with their state: their classes must be allowed too
        type(np.dtype(np.float64)),
        type(np.dtype(np.int64)),
        (_multiarray._reconstruct, 'numpy._core.multiarray._reconstruct'),
        (_multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
        (_multiarray.scalar, 'numpy._core.multiarray.scalar'),
        (_multiarray.scalar, 'numpy.core.multiarray.scalar'),
        (history_buffer_getattr, 'builtins.getattr'),
        (empty_bytes, 'builtins.bytes'),
    ]
    return globs


#: exactly what :func:`register_safe_globals` allowlists
SAFE_GLOBALS = _safe_globals()
_registered = False


def register_safe_globals() -> None:
    """Allowlist :data:`SAFE_GLOBALS` for ``torch.load(weights_only=True)`` (idempotent)."""
    global _registered
    if _registered:
        return
    torch.serialization.add_safe_globals(SAFE_GLOBALS)
    _registered = True


def safe_load(filename: str, map_location='cpu') -> dict:
    """``torch.load(filename, weights_only=True)`` with the mmengine allowlist."""
    register_safe_globals()
    return torch.load(filename, map_location=map_location, weights_only=True)


def state_dict_of(checkpoint) -> dict:
    """The model state dict inside an mmengine / plain checkpoint (``state_dict`` or
    ``model`` entry, else the dict itself), with a DDP ``module.`` prefix stripped."""
    sd = checkpoint
    if isinstance(sd, dict):
        for key in ('state_dict', 'model'):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if sd and all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    return dict(sd)


def load_weights(model, checkpoint: str, error=RuntimeError):
    """Load ``checkpoint`` (weights_only, strict) into ``model`` and return the loaded
    object; an unreadable file or one that does not fit the model raises ``error`` with a
    short message naming the problem."""
    try:
        ck = safe_load(checkpoint)
    except Exception as e:  # noqa: BLE001 - truncated / corrupted / not a torch file
        raise error(f'cannot read checkpoint {checkpoint} (truncated or corrupted?): '
                    f'{type(e).__name__}: {str(e)[:300]}') from None
    try:
        model.load_state_dict(state_dict_of(ck), strict=True)
    except RuntimeError as e:
        raise error(f'checkpoint {checkpoint} does not fit the model of the config '
                    f'(another architecture or method?): {_first_lines(e)}') from None
    return ck


def _first_lines(e: Exception, n: int = 4) -> str:
    """The first ``n`` lines of an error message (load_state_dict lists every key)."""
    lines = str(e).splitlines()
    more = f'\n\t... ({len(lines) - n} more)' if len(lines) > n else ''
    return '\n'.join(lines[:n]) + more
