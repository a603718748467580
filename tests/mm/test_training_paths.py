"""The training paths users take, through mmengine's Runner and this project's tools.

* ``tools/train.py --amp`` on a machine without a GPU selects ``CPUAmpOptimWrapper``
  (mmengine's ``AmpOptimWrapper`` asserts a GPU): the forward passes of the tiny classifier
  (RepQ-BN, RepQ-BNEst with ``est_refresh``) and of the tree detector run under
  ``mmengine.runner.amp.autocast(device_type='cpu', dtype=torch.bfloat16)``; the trained
  checkpoint merges (``tools/merge_quant.py``) and the merged model evaluates to the QAT
  model's metric.
* ``compile=...`` in the config (mmengine compiles ``model.train_step``; backend ``eager``:
  dynamo's graph capture, guards and side effects, where RepQ's state lives; inductor
  itself is tested in ``test_compile.py``): the compiled run equals the eager run
  (parameters, running statistics, step sizes), and its checkpoint merges and evaluates.
"""
from __future__ import annotations

import glob
import os.path as osp

import pytest
import torch

pytest.importorskip('mmpretrain')

from helpers import (ARCH, DATA_PREPROCESSOR, CI_CFG, merge_tool, test_tool,  # noqa: E402
                     train_tool, write_config)
from helpers import build as _build  # noqa: E402

from repq_mm.rep import base as rep_base  # noqa: E402

COMMON = ['--no-pin-memory', '--no-persistent-workers']


def _fp_checkpoint(tmp_path) -> str:
    torch.manual_seed(0)
    fp = _build(dict(ARCH, data_preprocessor=dict(DATA_PREPROCESSOR,
                                                  type='ClsDataPreprocessor')))
    path = str(tmp_path / 'fp.pth')
    torch.save({'state_dict': fp.state_dict()}, path)
    return path


def _record_autocast(monkeypatch) -> list:
    """Record, for every training-mode rep block call, the autocast dtype it ran under."""
    seen = []
    real = rep_base.RepBlock.forward

    def forward(self, x, *args, **kwargs):
        if self.training:
            seen.append(torch.get_autocast_dtype('cpu')
                        if torch.is_autocast_enabled('cpu') else None)
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(rep_base.RepBlock, 'forward', forward)
    return seen


def _merge_and_compare(cfg, ckpt, tmp_path, key, opts=()):
    """merge_quant, then our tools/test.py on the QAT checkpoint and on the merged one."""
    out = str(tmp_path / 'deploy')
    extra = ['--cfg-options', *opts] if opts else []
    assert merge_tool.main([cfg, ckpt, out, *extra]) == 0
    qat = test_tool.main([cfg, ckpt, '--work-dir', str(tmp_path / 't_qat'), *extra])
    merged = test_tool.main([osp.join(out, 'deploy_config.py'), osp.join(out, 'merged.pth'),
                             '--work-dir', str(tmp_path / 't_merged'), *extra])
    assert qat[key] == pytest.approx(merged[key], abs=1e-3), (qat, merged)
    return qat, merged


@pytest.mark.parametrize('bn_mode,refresh', [('exact', 0), ('est', 2)])
def test_amp_classifier(tmp_path, data_root, monkeypatch, bn_mode, refresh):
    repq = dict(w_bits=4, a_bits=4, bn_mode=bn_mode, est_refresh=refresh,
                init_checkpoint=_fp_checkpoint(tmp_path))
    cfg = write_config(tmp_path / f'amp_{bn_mode}.py', data_root, repq,
                       [dict(type='LSQCalibHook', num_batches=1)], max_iters=3,
                       ckpt_interval=3)
    seen = _record_autocast(monkeypatch)
    runner = train_tool.main([cfg, '--amp', '--work-dir', str(tmp_path / 'wd'), *COMMON])
    monkeypatch.undo()
    assert type(runner.optim_wrapper).__name__ == 'CPUAmpOptimWrapper'
    assert runner.optim_wrapper.cast_dtype == torch.bfloat16
    # every training call of every block ran under bfloat16 autocast (calibration, outside
    # the optimizer's context, in float32)
    assert seen.count(torch.bfloat16) == 3 * 5 and set(seen) <= {torch.bfloat16, None}
    sd = runner.model.state_dict()
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    assert all(v.dtype != torch.bfloat16 for v in sd.values())   # parameters stay float32
    _merge_and_compare(cfg, str(tmp_path / 'wd' / 'iter_3.pth'), tmp_path, 'accuracy/top1')


def test_amp_detector(trees, tmp_path, monkeypatch):
    opts = ['train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
            'default_hooks.checkpoint.interval=1', 'train_dataloader.batch_size=2']
    work = tmp_path / 'qat'
    seen = _record_autocast(monkeypatch)
    runner = train_tool.main([CI_CFG, '--amp', '--work-dir', str(work), '--cfg-options',
                              *opts])
    monkeypatch.undo()
    assert type(runner.optim_wrapper).__name__ == 'CPUAmpOptimWrapper'
    assert runner.optim_wrapper.cast_dtype == torch.bfloat16
    assert seen.count(torch.bfloat16) > 0 and set(seen) <= {torch.bfloat16, None}
    log = ''.join(open(p).read() for p in glob.glob(str(work / '*' / '*.log')))
    assert 'LSQ calibration' in log
    sd = runner.model.state_dict()
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    _merge_and_compare(CI_CFG, str(work / 'epoch_1.pth'), tmp_path, 'coco/bbox_mAP', opts)


def test_compile_classifier(tmp_path, data_root):
    """``compile=dict(backend='eager')`` (what ``compile=True`` does, without inductor's
    C++ build): the compiled Runner trains the same model as the eager one."""
    repq = dict(w_bits=4, a_bits=4, bn_mode='est', est_refresh=2,
                init_checkpoint=_fp_checkpoint(tmp_path))
    hooks = [dict(type='LSQCalibHook', num_batches=1)]
    runs = {}
    for name, extra in (('eager', ''), ('compiled', "compile = dict(backend='eager')\n")):
        cfg = write_config(tmp_path / f'{name}.py', data_root, repq, hooks, max_iters=3,
                           ckpt_interval=3, extra=extra)
        torch._dynamo.reset()
        runs[name] = (cfg, train_tool.main([cfg, '--work-dir', str(tmp_path / name),
                                            *COMMON]))
    torch._dynamo.reset()
    assert not hasattr(runs['eager'][1].model.train_step, '_torchdynamo_orig_callable')
    assert hasattr(runs['compiled'][1].model.train_step, '_torchdynamo_orig_callable')
    se, sc = (r.model.state_dict() for _, r in runs.values())
    assert se.keys() == sc.keys()
    for k, v in se.items():
        if v.is_floating_point():
            assert torch.allclose(v, sc[k], rtol=1e-4, atol=1e-5), k
        else:
            assert torch.equal(v, sc[k]), k
    cfg = runs['compiled'][0]
    _merge_and_compare(cfg, str(tmp_path / 'compiled' / 'iter_3.pth'), tmp_path,
                       'accuracy/top1')
