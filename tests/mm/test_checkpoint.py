"""``weights_only`` loading of mmengine checkpoints after ``import repq_mm`` (torch >= 2.6
loads with ``weights_only=True``; mmengine 0.10.7 does not pass it)."""
from __future__ import annotations

import io
import json
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


# --------------------------------------------------------------------------------------
# the repq settings recorded in RepQModel checkpoints
# --------------------------------------------------------------------------------------
def _repq_model(**repq):
    pytest.importorskip('mmpretrain')
    from helpers import ARCH, build
    torch.manual_seed(0)
    return build(dict(type='RepQModel', architecture=ARCH, repq=repq))


def test_checkpoint_records_the_settings(tmp_path):
    """A RepQModel state dict carries the settings that decide what it computes; loading it
    into a model with other settings warns and names them; the weights-only load of a
    saved checkpoint keeps the record; a checkpoint without a record (older repq_mm) still
    loads strictly, with a log line."""
    import warnings

    from repq_mm.mm.checkpoint import safe_load
    from repq_mm.mm.model import RECORDED_KEYS, SettingsMismatchWarning
    m = _repq_model(w_bits=4, a_bits=4, int_bias=True, skip=('head', ))
    sd = m.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())   # tensor-only state dict
    rec = json.loads(bytes(sd['_extra_state'].tolist()))['repq']
    assert set(rec) == set(RECORDED_KEYS)
    assert rec['w_bits'] == 4 and rec['int_bias'] is True and rec['skip'] == ['head']
    path = str(tmp_path / 'ck.pth')
    torch.save({'state_dict': sd}, path)
    loaded = safe_load(path)['state_dict']
    same = _repq_model(w_bits=4, a_bits=4, int_bias=True, skip=('head', ),
                       bn_mode='est')                 # bn_mode: training only, not recorded
    with warnings.catch_warnings():
        warnings.simplefilter('error', SettingsMismatchWarning)
        same.load_state_dict(loaded, strict=True)
    assert same.loaded_settings == rec
    other = _repq_model(w_bits=8, a_bits=4, skip=('head', ))
    with pytest.warns(SettingsMismatchWarning, match=r"int_bias=True \(this model: False\)") \
            as w:
        other.load_state_dict(loaded, strict=True)
    msg = str(w[0].message)
    assert "w_bits=4 (this model: 8)" in msg and 'model.repq.w_bits=4' in msg
    assert 'a_bits' not in msg
    old = {k: v for k, v in loaded.items() if k != '_extra_state'}
    fresh = _repq_model(w_bits=8, skip=('head', ))
    fresh.load_state_dict(old, strict=True)            # no missing key, no error
    assert fresh.loaded_settings is None


def test_load_qat_model_refuses_other_settings(tmp_path):
    """merge / export / ONNX evaluation (``load_qat_model``) refuse a checkpoint trained
    with other settings, naming them and the option that fixes it, unless the caller
    overrides exactly those keys."""
    pytest.importorskip('mmpretrain')
    from mmengine.config import Config

    from helpers import write_config
    from repq_mm.mm.pipeline import load_qat_model
    m = _repq_model(w_bits=4, a_bits=4, int_bias=True)
    path = str(tmp_path / 'ck.pth')
    torch.save({'state_dict': m.state_dict()}, path)
    root = str(tmp_path / 'data')
    cfg = Config.fromfile(write_config(tmp_path / 'c.py', root, dict(w_bits=4, a_bits=4)))
    with pytest.raises(ValueError, match=r'int_bias=True \(this model: False\).*'
                                         r'--cfg-options model\.repq\.int_bias=True'):
        load_qat_model(cfg, path)
    model, _, settings = load_qat_model(cfg, path, repq_overrides=dict(int_bias=True))
    assert settings['int_bias'] is True and model.loaded_settings['int_bias'] is True
    model, _, _ = load_qat_model(cfg, path, repq_overrides=dict(int_bias=False))
    assert model.loaded_settings['int_bias'] is True     # overridden on purpose: allowed
