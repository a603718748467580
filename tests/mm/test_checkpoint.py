"""``weights_only`` loading of mmengine checkpoints after ``import repq_mm`` (torch >= 2.6
loads with ``weights_only=True``; mmengine 0.10.7 does not pass it)."""
from __future__ import annotations

import io
import pickle

import pytest
import torch

pytest.importorskip('mmengine')

from mmengine.logging.history_buffer import HistoryBuffer  # noqa: E402

import repq_mm  # noqa: E402,F401  (registers the allowlist)
from repq_mm.mm.checkpoint import SAFE_GLOBALS, empty_bytes  # noqa: E402


def _save(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_empty_history_buffer_loads_weights_only():
    """A HistoryBuffer that logged nothing pickles an empty numpy array, whose data
    protocol 2 writes as the call ``bytes()``."""
    hb = HistoryBuffer()
    full = HistoryBuffer()
    full.update(1.5)
    ck = dict(message_hub=dict(log_scalars={'empty': hb, 'full': full}),
              state_dict={'w': torch.ones(2)})
    out = torch.load(_save(ck), weights_only=True)
    assert len(out['message_hub']['log_scalars']['empty'].data[0]) == 0
    assert out['message_hub']['log_scalars']['full'].current() == 1.5


def test_bytes_allowlist_is_the_empty_call_only():
    assert empty_bytes() == b''
    for args in ((10 ** 9,), ([1, 2],), ('abc', 'utf8')):
        with pytest.raises(pickle.UnpicklingError):
            empty_bytes(*args)
    # a pickle that calls bytes(n) (an allocation of n bytes) is refused
    payload = b'\x80\x02cbuiltins\nbytes\nK\x05\x85R.'
    buf = _save({'x': 1})
    import zipfile
    zin = zipfile.ZipFile(buf)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, 'w') as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith('data.pkl'):
                data = payload
            zout.writestr(item, data)
    zbuf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(zbuf, weights_only=True)
    assert any(isinstance(g, tuple) and g[1] == 'builtins.bytes' for g in SAFE_GLOBALS)
