"""Resume after a kill, bitwise (CPU, ``randomness=dict(seed=0, deterministic=True)``,
``num_workers=0``), and checkpoint loading by the stock mmpretrain tools.

``tools/train.py`` runs in subprocesses (``torch.use_deterministic_algorithms`` is
process-global): a RepQ-BNEst run with iteration checkpoints every 2 iterations is SIGKILLed
after iteration 3, resumed with ``--resume`` from ``iter_2.pth`` and must reach bitwise the
same ``iter_6.pth`` model as an uninterrupted run. The run covers LSQ initialisation (not
repeated on resume), step-size freezing, a ``BNEstHook`` phase switch between the checkpoint
and the end, and the final BN re-estimation. The extended in-process resume checks (same
iteration count, no re-calibration, frozen steps) live in ``test_mm_cls.py``.
About 30 s.
"""
from __future__ import annotations

import os
import os.path as osp
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip('mmpretrain')

from helpers import ROOT, write_config  # noqa: E402
from helpers import stock_test_py as _stock_test_py  # noqa: E402

from repq_mm.mm.checkpoint import safe_load  # noqa: E402

PY = sys.executable

KILL_HOOK = '''
import os
import signal

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class KillAfterIterHook(Hook):
    """SIGKILL the process right after iteration REPQ_KILL_AFTER (1-based); a no-op when the
    variable is unset. No cleanup of any kind runs: a real crash."""
    priority = 'LOWEST'

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        at = int(os.environ.get('REPQ_KILL_AFTER', '0'))
        if at and runner.iter + 1 == at:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def _env(tmp_path, **extra):
    return dict(os.environ, OMP_NUM_THREADS='1',
                PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path),
                                            os.environ.get('PYTHONPATH', '')]), **extra)


def _train(tmp_path, cfg, work_dir, *args, **env):
    return subprocess.run([PY, osp.join(ROOT, 'tools', 'train.py'), cfg, '--work-dir',
                           work_dir, '--no-pin-memory', '--no-persistent-workers', *args],
                          env=_env(tmp_path, **env), capture_output=True, text=True,
                          timeout=300)


def test_kill_and_resume_is_bitwise(tmp_path, data_root):  # noqa: F811
    (tmp_path / 'kill_hook.py').write_text(KILL_HOOK)
    hooks = [dict(type='LSQCalibHook', num_batches=2, freeze_step_at=5),
             dict(type='BNEstHook', phases=[(0, 'est'), (0.5, 'exact')],
                  reestimate_batches=2),
             dict(type='KillAfterIterHook')]
    extra = textwrap.dedent("""
        custom_imports = dict(imports=['repq_mm', 'kill_hook'], allow_failed_imports=False)
        randomness = dict(seed=0, deterministic=True)
        log_level = 'INFO'
        """)
    cfg = write_config(tmp_path / 'resume_cfg.py', data_root,
                       dict(w_bits=4, a_bits=4, bn_mode='est', per_channel=True),
                       hooks, max_iters=6, ckpt_interval=2, extra=extra)
    wd, ref_wd = str(tmp_path / 'wd'), str(tmp_path / 'ref')

    killed = _train(tmp_path, cfg, wd, REPQ_KILL_AFTER='3')
    assert killed.returncode == -9, killed.stderr[-3000:]            # SIGKILL
    assert 'LSQ calibration on 2 batch(es)' in killed.stdout + killed.stderr
    assert sorted(f for f in os.listdir(wd) if f.endswith('.pth')) == ['iter_2.pth']

    # what the checkpoint carries: LSQ initialisation flags, signedness, step sizes, BN
    # running statistics (plain torch.load with weights_only=True)
    ck2 = torch.load(osp.join(wd, 'iter_2.pth'), map_location='cpu', weights_only=True)
    sd2 = ck2['state_dict']
    inits = {k: v for k, v in sd2.items() if k.endswith('.initialized')}
    assert len(inits) == 12 and all(int(v) == 1 for v in inits.values())
    assert any(k.endswith('.signed') and int(v) == 0 for k, v in sd2.items())  # post-ReLU
    steps = [v for k, v in sd2.items() if k.endswith('.step')]
    assert len(steps) == 12 and all(torch.isfinite(s).all() and (s > 0).all() for s in steps)
    assert any(k.endswith('running_var') for k in sd2)
    assert ck2['meta']['iter'] == 2 and ck2['optimizer']['state']        # momentum buffers

    resumed = _train(tmp_path, cfg, wd, '--resume')
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert 'LSQ calibration on' not in out                     # initialisation survives
    assert "bn_mode='exact'" in out                             # phase switch after resume
    assert 'BN re-estimation' in out
    reference = _train(tmp_path, cfg, ref_wd)
    assert reference.returncode == 0, reference.stderr[-3000:]

    a = safe_load(osp.join(wd, 'iter_6.pth'))
    b = safe_load(osp.join(ref_wd, 'iter_6.pth'))
    assert a['meta']['iter'] == b['meta']['iter'] == 6
    sa, sb = a['state_dict'], b['state_dict']
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f'resumed != uninterrupted (bitwise) for {differ[:5]}'
    # the steps changed during training (the comparison is not trivially about zeros)
    s6 = {k: v for k, v in sa.items() if k.endswith('.step')}
    assert any(not torch.equal(v, sd2[k]) for k, v in s6.items())

    # the stock mmpretrain tools/test.py loads the QAT checkpoint with the config the run
    # dumped (model type RepQModel; repq_mm's checkpoint allowlist via custom_imports)
    dumped = osp.join(wd, 'resume_cfg.py')
    assert osp.isfile(dumped)
    proc = subprocess.run([PY, _stock_test_py(), dumped, osp.join(wd, 'iter_6.pth'),
                           '--work-dir', str(tmp_path / 'stock')], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'accuracy/top1' in proc.stdout + proc.stderr
