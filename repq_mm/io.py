"""Files written all or nothing, and model outputs flattened: the one place for both.

* :func:`atomic_path`: a temporary file next to ``path``, moved into place (``os.replace``)
  only when the ``with`` block succeeds, with the mode ``open`` would give (``mkstemp``
  makes files private); removed otherwise. Several in one ``contextlib.ExitStack`` move
  into place together, after the last check of the block.
* :func:`atomic_dir`: the same for a folder (an existing one is replaced at the end).
* :func:`flatten_tensors`: every tensor of a nested output (tuples, lists, dicts in their
  order), the order ``torch.onnx.export`` numbers a model's outputs in.

Example:
    >>> import os, tempfile
    >>> from repq_mm.io import atomic_path
    >>> d = tempfile.mkdtemp()
    >>> with atomic_path(os.path.join(d, 'a.txt')) as tmp:
    ...     _ = open(tmp, 'w').write('done')
    >>> open(os.path.join(d, 'a.txt')).read()
    'done'
"""
from __future__ import annotations

import contextlib
import os
import os.path as osp
import shutil
import tempfile

__all__ = ['atomic_path', 'atomic_dir', 'flatten_tensors', 'umask_mode']


def umask_mode(base: int = 0o666) -> int:
    """``base`` masked by the process umask (what ``open`` / ``mkdir`` give)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path in ``path``'s folder (created if missing); on success it
    replaces ``path``, on an exception it is removed and ``path`` is left as it was."""
    path = osp.abspath(path)
    d = osp.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.', suffix='.tmp', dir=d)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(out_dir: str):
    """Yield a temporary folder next to ``out_dir``; on success it becomes ``out_dir``
    (an existing ``out_dir`` is moved aside first and removed after), on an exception it
    is removed and ``out_dir`` is left as it was."""
    out_dir = osp.abspath(out_dir)
    parent = osp.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{osp.basename(out_dir)}.tmp-', dir=parent)
    os.chmod(tmp, umask_mode(0o777))           # mkdtemp makes it private
    try:
        yield tmp
        old = None
        if osp.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f'.{osp.basename(out_dir)}.old-', dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def flatten_tensors(obj) -> list:
    """Every tensor in a nested model output, in order (tuples, lists, dict values in
    insertion order); other leaves are dropped."""
    import torch
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in flatten_tensors(o)]
    if isinstance(obj, dict):
        return [t for k in obj for t in flatten_tensors(obj[k])]
    return []
