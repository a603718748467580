"""Distributed RepQ training with ``tools/dist_train.sh CONFIG 2``: torchrun, mmengine's
``pytorch`` launcher, gloo, two CPU processes (``CPUCompatibleDDP`` selected by
``tools/train.py``), ``sync_bn='torch'``.

A check hook (imported by the config) all-gathers per-rank checksums and records:

* after LSQ calibration (before the first iteration): the step sizes, identical on every
  rank (statistics all-reduced);
* that every BN inside the rep blocks is an ``nn.SyncBatchNorm`` after mmengine's
  conversion (which runs after ours) and that the batch statistics were all-reduced;
* after training: the whole state dict (parameters, step sizes, BN running statistics;
  no BN re-estimation, so equal running statistics come from SyncBN semantics alone, the
  ranks see different data), identical on every rank and equal to rank 0's checkpoint.

About 40 s on 2 cores.
"""
from __future__ import annotations

import json
import os
import os.path as osp
import socket
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip('mmpretrain')

from helpers import ROOT, write_config  # noqa: E402

from repq_mm.mm.checkpoint import safe_load  # noqa: E402

CHECK_HOOK = '''
import hashlib
import json
import os.path as osp

import torch
from mmengine.dist import all_gather_object, get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

import repq_mm.rep.stats as stats
from repq_mm.rep import RepBlock

SYNC_CALLS = [0]
_orig = stats.channel_var_mean


def _counting(y, sync=False):
    SYNC_CALLS[0] += int(bool(sync))
    return _orig(y, sync)


stats.channel_var_mean = _counting
import repq_mm.rep.base as base  # noqa: E402
base.channel_var_mean = _counting


def checksum(tensors):
    h = hashlib.sha256()
    for k, v in tensors:
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@HOOKS.register_module()
class RankCheckHook(Hook):
    priority = 'LOWEST'          # after LSQCalibHook and after the last checkpoint

    def __init__(self):
        self.rec = {}

    def _model(self, runner):
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def _all_equal(self, key, value):
        values = all_gather_object(value)
        self.rec[key] = values
        return all(v == values[0] for v in values)

    def before_train(self, runner):
        model = self._model(runner)
        self.rec['wrapper'] = type(runner.model).__name__
        self.rec['world'] = get_world_size()
        bns = [bn for m in model.modules() if isinstance(m, RepBlock) for bn in m.bns()]
        self.rec['bn_types'] = sorted({type(bn).__name__ for bn in bns})
        steps = [(n, p) for n, p in model.named_parameters() if n.endswith('.step')]
        self.rec['calib_equal'] = self._all_equal('calib', checksum(steps))

    def after_train(self, runner):
        model = self._model(runner)
        sd = sorted(model.state_dict().items())
        self.rec['final_equal'] = self._all_equal('final', checksum(sd))
        self.rec['sync_calls'] = SYNC_CALLS[0]
        self.rec['final_checksum'] = checksum(sd)
        with open(osp.join(runner.work_dir, f'rank{get_rank()}.json'), 'w') as f:
            json.dump(self.rec, f)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_dist_train_two_cpu_ranks(tmp_path, data_root):  # noqa: F811
    (tmp_path / 'rank_check_hook.py').write_text(CHECK_HOOK)
    extra = textwrap.dedent("""
        custom_imports = dict(imports=['repq_mm', 'rank_check_hook'],
                              allow_failed_imports=False)
        sync_bn = 'torch'
        log_level = 'INFO'
        """)
    hooks = [dict(type='LSQCalibHook', num_batches=2), dict(type='RankCheckHook')]
    cfg = write_config(tmp_path / 'dist_cfg.py', data_root,
                       dict(w_bits=4, a_bits=4, bn_mode='est', per_channel=True), hooks,
                       max_iters=3, ckpt_interval=3, extra=extra)
    wd = str(tmp_path / 'wd')
    for attempt in range(2):
        # a fresh port each time; one retry because the rendezvous of two CPU processes can
        # fail for reasons outside the code under test (port taken between probe and bind)
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHON=sys.executable,
                   PORT=str(_free_port()), CUDA_VISIBLE_DEVICES='',
                   PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path),
                                               os.environ.get('PYTHONPATH', '')]))
        proc = subprocess.run(['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), cfg, '2',
                               '--work-dir', wd, '--no-pin-memory'],
                              env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            break
        sys.stderr.write(f'dist_train attempt {attempt} failed:\n'
                         f'{(proc.stdout + proc.stderr)[-6000:]}\n')
        shutil.rmtree(wd, ignore_errors=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert 'accuracy/top1' in proc.stdout + proc.stderr          # validation ran too
    recs = []
    for r in range(2):
        with open(osp.join(wd, f'rank{r}.json')) as f:
            recs.append(json.load(f))
    for rec in recs:
        assert rec['world'] == 2 and rec['wrapper'] == 'CPUCompatibleDDP'
        assert rec['bn_types'] == ['SyncBatchNorm'], rec['bn_types']
        assert rec['sync_calls'] > 0                    # BNEst moments were all-reduced
        assert rec['calib_equal'], rec['calib']         # LSQ init identical on every rank
        assert rec['final_equal'], rec['final']         # same model on every rank
    # rank 0 wrote the checkpoint; it is the model every rank holds
    ck = safe_load(osp.join(wd, 'iter_3.pth'))
    sd = ck['state_dict']
    import hashlib
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().numpy().tobytes())
    assert h.hexdigest() == recs[0]['final_checksum'] == recs[1]['final_checksum']
    # the BN running statistics moved (trained with batch statistics, not left at init)
    assert any(k.endswith('running_mean') and not torch.equal(v, torch.zeros_like(v))
               for k, v in sd.items())
