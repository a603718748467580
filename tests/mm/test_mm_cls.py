"""End-to-end classification through mmengine's Runner (mmpretrain 1.2.0, mmengine 0.10.7).

A tiny mmpretrain RepVGG classifier on a folder of generated PNGs (mmpretrain
``CustomDataset``, class per folder): RepQ w4a4 training (RepQ-BN and RepQ-BNEst), resume,
``tools/merge_quant.py``, the stock mmpretrain ``tools/test.py`` on the merged checkpoint and
our ``tools/test.py`` on the QAT checkpoint; plus the hooks, the ``repq`` validation, the
checkpoint allowlist and the registry scopes.
"""
from __future__ import annotations

import io
import json
import os
import os.path as osp
import subprocess

import numpy as np
import pytest
import torch

pytest.importorskip('mmpretrain')
pytest.importorskip('cv2')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import MODELS  # noqa: E402

import repq_mm  # noqa: E402,F401
from repq_mm.mm import (BNEstHook, LSQCalibHook, RepQModel, calibrate_lsq,  # noqa: E402
                        check_repq_cfg, reestimate_bn)
from repq_mm.mm import hooks as repq_hooks  # noqa: E402
from repq_mm.mm.checkpoint import SAFE_GLOBALS, safe_load  # noqa: E402
from repq_mm.rep import RepBlock  # noqa: E402

from helpers import (ARCH, DATA_PREPROCESSOR, NUM_CLASSES, PY, ROOT,  # noqa: E402,F401
                     merge_tool, test_tool, train_tool, write_config)
from helpers import build as _build  # noqa: E402
from helpers import loader as _loader  # noqa: E402
from helpers import stock_test_py as _stock_test_py  # noqa: E402


def _steps(sd):
    return {k: v.clone() for k, v in sd.items() if k.endswith('.step')}


def _repq_model(bn_mode='exact', **kw):
    return _build(dict(type='RepQModel', architecture=ARCH,
                       repq=dict(w_bits=4, a_bits=4, bn_mode=bn_mode, **kw),
                       data_preprocessor=DATA_PREPROCESSOR))


# --------------------------------------------------------------------------------------
# configuration, registry, checkpoints
# --------------------------------------------------------------------------------------
def test_repq_cfg_validation():
    cfg = check_repq_cfg(dict(w_bits=4, bn_mode='est', skip='head'))
    assert cfg['method'] == 'repq' and cfg['skip'] == ('head', )
    with pytest.raises(KeyError, match="did you mean 'w_bits'") as e:
        check_repq_cfg(dict(w_bit=4))
    assert 'a_bits' in str(e.value)      # lists the valid keys
    for bad, key in ((dict(w_bits=9), 'w_bits'), (dict(a_bits='4'), 'a_bits'),
                     (dict(bn_mode='estimated'), 'bn_mode'), (dict(method='qat'), 'method'),
                     (dict(first_bits=1), 'first_bits'), (dict(deploy='yes'), 'deploy'),
                     (dict(act_signed=2), 'act_signed'), (dict(skip=[1]), 'skip')):
        with pytest.raises(ValueError, match=key):
            check_repq_cfg(bad)
    with pytest.raises(KeyError, match='bn_mode'):
        RepQModel(ARCH, repq=dict(bn_mod='est'))


def test_config_form(tmp_path, data_root):
    """The RepQModel form: taken as it is, single keys changed by ``--cfg-options``; the old
    top-level ``repq`` (in the file or as an option) and misspelled sections are refused by
    mmengine's ``Config`` itself once repq_mm is imported (what the stock tools hit)."""
    from repq_mm.mm import RepQConfigError
    path = write_config(tmp_path / 'c.py', data_root,
                        repq=dict(w_bits=4, a_bits=4, init_checkpoint='fp.pth'))
    cfg = Config.fromfile(path)
    assert cfg.model.type == 'RepQModel' and cfg.model.init_checkpoint == 'fp.pth'
    assert cfg.model.architecture.type == 'ImageClassifier'
    cfg.merge_from_dict({'model.repq.w_bits': 8, 'model.init_checkpoint': None})
    assert dict(cfg.model.repq) == dict(w_bits=8, a_bits=4) and cfg.model.init_checkpoint is None
    before = cfg.pretty_text
    with pytest.raises(ValueError, match=r"top-level `repq` section beside its RepQModel.*"
                       r"model\.repq\.w_bits=4"):
        cfg.merge_from_dict({'repq.w_bits': 4})       # the old option spelling
    assert cfg.pretty_text == before and 'repq' not in cfg     # a refused merge: no change
    with pytest.raises(KeyError, match=r"'reqp' \(did you mean 'repq'\?\)"):
        cfg.merge_from_dict({'model.reqp.w_bits': 4})
    # the old form: a bare repq beside the plain model, refused when the file is read
    bare = write_config(tmp_path / 'bare.py', data_root,
                        extra="repq = dict(w_bits=4, a_bits=4, init_checkpoint='fp.pth')\n")
    with pytest.raises(RepQConfigError) as e:
        Config.fromfile(bare)
    msg = str(e.value)
    assert 'beside a plain ImageClassifier model' in msg and 'bare.py' in msg
    assert "type='RepQModel'" in msg and 'architecture=_base_.model' in msg
    assert "repq=dict(w_bits=4, a_bits=4)" in msg and "init_checkpoint='fp.pth'" in msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, KeyError)
    misspelled = write_config(tmp_path / 'misspelled.py', data_root,
                              extra='reqp = dict(w_bits=4)\n')
    with pytest.raises(KeyError, match="'reqp' section: did you mean 'repq'"):
        Config.fromfile(misspelled)
    # a plain model without any repq-like section is left alone
    assert Config.fromfile(write_config(tmp_path / 'fp.py', data_root)).model == ARCH


def test_registry_scopes():
    """Root registration is found from mmpretrain's and mmdet's scopes (parent lookup)."""
    for scope in ('mmpretrain', 'mmdet'):
        with MODELS.switch_scope_and_registry(scope) as reg:
            assert reg.scope == scope
            assert reg.get('RepQModel') is RepQModel
            assert reg.get('QConv2d') is repq_mm.QConv2d
            for name, cls in repq_mm.REP_BLOCKS.items():
                assert reg.get(name) is cls
    from mmengine.registry import HOOKS
    with HOOKS.switch_scope_and_registry('mmpretrain') as reg:
        assert reg.get('LSQCalibHook') is LSQCalibHook and reg.get('BNEstHook') is BNEstHook
    model = _build(dict(type='RepQModel', architecture=ARCH, repq=dict(w_bits=4, a_bits=4),
                        data_preprocessor=DATA_PREPROCESSOR))
    assert model.data_preprocessor is model.architecture.data_preprocessor
    assert type(model.data_preprocessor).__name__ == 'ClsDataPreprocessor'
    assert model.backbone is model.architecture.backbone


def _readme_config() -> str:
    """The config example of the README's "Using RepQ from an OpenMMLab config"."""
    with open(osp.join(ROOT, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    section = text.split('## Using RepQ from an OpenMMLab config', 1)[1]
    return section.split('```python\n', 1)[1].split('```', 1)[0]


def test_readme_config_example(tmp_path):
    """The README's example (mmpretrain's RepVGG-A0 config wrapped in RepQModel) builds the
    RepQ model it describes."""
    text = _readme_config()
    assert "type='RepQModel'" in text and 'architecture=_base_.model' in text
    path = tmp_path / 'repvgg_a0_repq.py'
    path.write_text(text)
    cfg = Config.fromfile(str(path))
    assert cfg.default_scope == 'mmpretrain'
    assert [h['type'] for h in cfg.custom_hooks] == ['LSQCalibHook']
    assert cfg.model.architecture.backbone.type == 'RepVGG'
    cfg.merge_from_dict({'model.init_checkpoint': None})    # no download here
    model = _build(cfg.model)
    assert isinstance(model, RepQModel)
    blocks = [m for m in model.modules() if isinstance(m, RepBlock)]
    assert len(blocks) == 22 and all(b.repq and b.bn_mode == 'est' for b in blocks)
    assert type(model.architecture.head.fc).__name__ == 'QLinear'
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000)


def test_safe_globals_reject_other_getattr():
    from mmengine.logging.history_buffer import HistoryBuffer

    class Evil:
        def __reduce__(self):
            return getattr, (HistoryBuffer, '__init__')

    class Evil2:
        def __reduce__(self):
            return getattr, (np.ndarray, 'tofile')

    for obj in (Evil(), Evil2()):
        buf = io.BytesIO()
        torch.save({'x': obj}, buf)
        buf.seek(0)
        with pytest.raises(Exception, match='not allowed|Unsupported|getattr'):
            torch.load(buf, weights_only=True)
    names = {g[1] if isinstance(g, tuple) else f'{g.__module__}.{g.__qualname__}'
             for g in SAFE_GLOBALS}
    assert 'builtins.getattr' in names and \
        'mmengine.logging.history_buffer.HistoryBuffer' in names


# --------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------
def test_calibrate_lsq(data_root):
    torch.manual_seed(0)
    model = _repq_model()
    loader = _loader(data_root)
    qs = repq_hooks.quantizers(model)
    assert qs and not any(q.is_initialized for _, q, _ in qs)
    summary = calibrate_lsq(model, loader, num_batches=2)
    assert summary['batches'] == 2 and not summary['missed']
    assert all(q.is_initialized and q.enabled for _, q, _ in qs)
    assert model.training                        # mode restored
    # stem activation quantizer: 2 mean|x| / sqrt(Q_P) over the two batches, signed input
    stem_a = model.architecture.backbone.stem.a_quant
    means = []
    for i, batch in enumerate(loader):
        if i == 2:
            break
        means.append(model.data_preprocessor(batch, False)['inputs'].abs().mean().item())
    assert bool(stem_a.is_signed)
    qp = stem_a.qrange[1]
    assert stem_a.step.item() == pytest.approx(2 * np.mean(means) / qp ** 0.5, rel=1e-5)
    # after a ReLU the inputs are non-negative: unsigned
    assert not model.architecture.backbone.stage_1[0].a_quant.is_signed
    before = _steps(model.state_dict())
    assert calibrate_lsq(model, loader, 2)['act'] == 0      # already initialised: no-op
    after = _steps(model.state_dict())
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_reestimate_bn_keeps_steps(data_root):
    torch.manual_seed(0)
    model = _repq_model('est')
    loader = _loader(data_root, 'train', 8, True)
    calibrate_lsq(model, loader, 1)
    model.train()
    bns = [bn for m in model.modules() if isinstance(m, RepBlock) for bn in m.bns()]
    for bn in bns:
        bn.momentum = 0.3
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    old = [bn.running_mean.clone() for bn in bns]
    assert reestimate_bn(model, loader, 3, mode='exact') == 3
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in params.items())
    assert all(bn.momentum == 0.3 for bn in bns)
    assert all(m.bn_mode == 'est' for m in model.modules() if isinstance(m, RepBlock))
    assert model.training and all(m.training for m in model.modules())
    assert any(not torch.equal(o, bn.running_mean) for o, bn in zip(old, bns))
    assert all(torch.isfinite(bn.running_var).all() and (bn.running_var > 0).all()
               for bn in bns)
    # the stem's 3x3 BN: cumulative average of exact batch means (RepQ input = Q_a(x))
    stem = model.architecture.backbone.stem
    bn = stem.branches[0][0].bn
    expect = []
    for i, batch in enumerate(repq_hooks._fresh_loader(loader)):
        if i == 3:
            break
        x = stem.a_quant(model.data_preprocessor(batch, False)['inputs'])
        y = torch.nn.functional.conv2d(x, stem.branches[0][0].weight, None, 2, 1)
        expect.append(y.mean((0, 2, 3)))
    # the sampler is seeded per epoch: the fresh loader repeats the same batches
    assert torch.allclose(bn.running_mean, torch.stack(expect).mean(0), atol=1e-4)


def test_bnest_hook_phases():
    hook = BNEstHook(phases=[(0, 'est'), (0.5, 'exact')], reestimate_batches=0)
    assert [hook.mode_at(i, 10) for i in (0, 4, 5, 9)] == ['est', 'est', 'exact', 'exact']
    with pytest.raises(ValueError):
        BNEstHook(phases=[(0, 'estimated')])
    with pytest.raises(ValueError):
        LSQCalibHook(num_batches=0)


# --------------------------------------------------------------------------------------
# end to end through the Runner and the tools
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize('bn_mode', ['exact', 'est'])
def test_end_to_end(tmp_path, data_root, monkeypatch, bn_mode):
    # a float checkpoint to start from (an mmpretrain classifier state dict)
    torch.manual_seed(0)
    fp = _build(dict(ARCH, data_preprocessor=dict(DATA_PREPROCESSOR,
                                                  type='ClsDataPreprocessor')))
    fp_path = str(tmp_path / 'fp.pth')
    torch.save({'state_dict': fp.state_dict()}, fp_path)

    hooks = [dict(type='LSQCalibHook', num_batches=2, freeze_step_at=2, log_interval=1)]
    if bn_mode == 'est':
        hooks.append(dict(type='BNEstHook', phases=[(0, 'est'), (0.9, 'exact')],
                          reestimate_batches=2))
    repq = dict(w_bits=4, a_bits=4, bn_mode=bn_mode, init_checkpoint=fp_path)
    # distinct file names: mmengine names a run's MessageHub / logger after the config file
    # and the second it starts, and reuses an existing instance of that name
    cfg4 = write_config(tmp_path / f'qat4_{bn_mode}.py', data_root, repq, hooks, max_iters=4)
    cfg6 = write_config(tmp_path / f'qat6_{bn_mode}.py', data_root, repq, hooks, max_iters=6)
    cfg6_ref = write_config(tmp_path / f'ref6_{bn_mode}.py', data_root, repq, hooks,
                            max_iters=6)
    wd, ref_wd = str(tmp_path / 'wd'), str(tmp_path / 'wd_ref')
    common = ['--no-pin-memory', '--no-persistent-workers']

    runner = train_tool.main([cfg4, '--work-dir', wd] + common)
    assert runner.iter == 4 and osp.isfile(osp.join(wd, 'iter_4.pth'))
    model = runner.model
    assert isinstance(model, RepQModel)
    assert all(q.is_initialized for _, q, _ in repq_hooks.quantizers(model))
    # every checkpoint loads with weights_only=True (HistoryBuffer, numpy in message_hub)
    ck4 = torch.load(osp.join(wd, 'iter_4.pth'), map_location='cpu', weights_only=True)
    ck2 = safe_load(osp.join(wd, 'iter_2.pth'))
    s2, s4 = _steps(ck2['state_dict']), _steps(ck4['state_dict'])
    assert s2 and all(torch.equal(s2[k], s4[k]) for k in s2)     # frozen from iteration 2

    # resume to 6: same iteration count, quantizers not re-initialised
    calls = []
    real = repq_hooks.calibrate_lsq
    monkeypatch.setattr(repq_hooks, 'calibrate_lsq',
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = train_tool.main([cfg6, '--work-dir', wd, '--resume'] + common)
    monkeypatch.setattr(repq_hooks, 'calibrate_lsq', real)
    assert resumed.iter == 6 and calls == []
    ck6 = safe_load(osp.join(wd, 'iter_6.pth'))
    assert ck6['meta']['iter'] == 6
    s6 = _steps(ck6['state_dict'])
    assert all(torch.equal(s4[k], s6[k]) for k in s4)
    # an uninterrupted run to 6 gives the same model
    ref = train_tool.main([cfg6_ref, '--work-dir', ref_wd] + common)
    ref_sd = ref.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        assert torch.allclose(v.float(), ref_sd[k].float(), atol=1e-5), k

    # merge; a second merge into the same folder is refused unless it is the same model
    ckpt = osp.join(wd, 'iter_6.pth')
    out = str(tmp_path / 'deploy')
    assert merge_tool.main([cfg6, ckpt, out, '--check-batches', '2']) == 0
    assert sorted(os.listdir(out)) == ['deploy_config.py', 'int_weights.pth', 'merged.pth']
    assert merge_tool.main([cfg6, ckpt, out]) == 0                  # same model: fine
    assert merge_tool.main([cfg6, osp.join(wd, 'iter_4.pth'), out]) == 1
    assert merge_tool.main([cfg6, osp.join(wd, 'iter_4.pth'), str(tmp_path / 'd4')]) == 0
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.deploy')]

    merged = torch.load(osp.join(out, 'merged.pth'), map_location='cpu', weights_only=True)
    assert merged['meta']['check']['rel'] <= 1e-4
    ints = torch.load(osp.join(out, 'int_weights.pth'), map_location='cpu',
                      weights_only=True)['layers']
    assert len(ints) == 6                                  # stem, 4 stages, fc
    for name, rec in ints.items():
        assert rec['codes'].dtype == torch.int8
        assert -8 <= int(rec['codes'].min()) and int(rec['codes'].max()) <= 7
        w = merged['state_dict'][name + '.weight']
        assert torch.allclose(rec['codes'].float() * rec['scale'], w, atol=1e-6)
    dcfg = Config.fromfile(osp.join(out, 'deploy_config.py'))
    assert dcfg.model.repq['deploy'] is True and dcfg.model.init_checkpoint is None
    assert dcfg.load_from == osp.join(out, 'merged.pth')

    # stock mmpretrain tools/test.py on the merged checkpoint ...
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
               OMP_NUM_THREADS='1')
    metrics_json = str(tmp_path / 'stock_metrics.json')
    proc = subprocess.run([PY, _stock_test_py(), osp.join(out, 'deploy_config.py'),
                           osp.join(out, 'merged.pth'), '--work-dir', str(tmp_path / 'wt1'),
                           '--out', metrics_json, '--out-item', 'metrics'],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(metrics_json) as f:
        stock_acc = json.load(f)['accuracy/top1']
    # ... and ours on the QAT checkpoint: the same accuracy
    metrics = test_tool.main([cfg6, ckpt, '--work-dir', str(tmp_path / 'wt2'),
                              '--no-pin-memory'])
    assert metrics['accuracy/top1'] == pytest.approx(stock_acc, abs=1e-3)


# --------------------------------------------------------------------------------------
# the other methods
# --------------------------------------------------------------------------------------
def test_methods_model_forms():
    from repq_mm.quant import QConv2d, QLinear
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    forms = {}
    for method in ('repq', 'lsq', 'ptq', 'fp'):
        model = _repq_model(method=method).eval()
        blocks = [m for m in model.modules() if isinstance(m, RepBlock)]
        qconvs = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
        forms[method] = (len(blocks), len(qconvs))
        with torch.no_grad():
            assert model(x).shape == (2, NUM_CLASSES)
    assert forms == {'repq': (5, 1), 'lsq': (0, 6), 'ptq': (0, 6), 'fp': (0, 0)}
    fp = _repq_model(method='fp')
    assert type(fp.architecture.backbone.stem).__name__ == 'RepVGGBlock'   # untouched
    deploy = _repq_model(deploy=True)
    assert not [m for m in deploy.modules() if isinstance(m, RepBlock)]
    assert len([m for m in deploy.modules() if isinstance(m, QConv2d)]) == 5


def test_init_weights_before_conversion():
    """Without init_checkpoint, init_weights gives the original model's init (its init_cfg:
    Kaiming on Conv2d, BN constant) *before* conversion; with one, it leaves weights alone."""
    torch.manual_seed(0)
    model = _repq_model(per_channel=True)
    w = model.architecture.backbone.stage_1[0].branches[0][0].weight
    before = w.detach().clone()
    step_ids = {id(q.step) for _, q, _ in repq_hooks.quantizers(model)}
    model.init_weights()
    assert not torch.equal(before, w)                      # re-initialised, same Parameter
    assert w is model.architecture.backbone.stage_1[0].branches[0][0].weight
    assert {id(q.step) for _, q, _ in repq_hooks.quantizers(model)} == step_ids
    # per-channel weight steps have their final shape from the start (optimizer / DDP)
    assert model.architecture.backbone.stage_1[0].w_quant.step.shape == (16, )


def test_ptq_calibrates_at_test_time(tmp_path, data_root):
    torch.manual_seed(0)
    fp = _build(dict(ARCH, data_preprocessor=dict(DATA_PREPROCESSOR,
                                                  type='ClsDataPreprocessor')))
    fp_path = str(tmp_path / 'fp.pth')
    torch.save({'state_dict': fp.state_dict()}, fp_path)
    cfg = write_config(tmp_path / 'ptq.py', data_root,
                       dict(method='ptq', w_bits=8, a_bits=8, init_checkpoint=fp_path),
                       [dict(type='LSQCalibHook', num_batches=2, save_calibrated=True)],
                       max_iters=0)
    metrics = test_tool.main([cfg, 'none', '--work-dir', str(tmp_path / 'wt'),
                              '--no-pin-memory'])
    # a PTQ "training" of 0 iterations: calibration only, saved for merge_quant
    wd = str(tmp_path / 'wd')
    runner = train_tool.main([cfg, '--work-dir', wd, '--no-validate'])
    assert runner.iter == 0 and osp.isfile(osp.join(wd, 'calibrated.pth'))
    out = str(tmp_path / 'deploy')
    assert merge_tool.main([cfg, osp.join(wd, 'calibrated.pth'), out]) == 0
    ours = test_tool.main([osp.join(out, 'deploy_config.py'), osp.join(out, 'merged.pth'),
                           '--work-dir', str(tmp_path / 'wt2')])
    # same data, same calibration batches (seeded sampler): the same accuracy
    assert ours['accuracy/top1'] == pytest.approx(metrics['accuracy/top1'])


# --------------------------------------------------------------------------------------
# distributed statistics (2 CPU ranks, gloo)
# --------------------------------------------------------------------------------------
def _dist_worker(rank, world, port, out):
    import torch.distributed as dist
    from mmengine.model import BaseModel
    from torch import nn

    from repq_mm.rep import RepVGGBlock
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)

    class Net(BaseModel):
        def __init__(self):
            super().__init__()
            self.blk = RepVGGBlock(4, 4, act=nn.ReLU())
            self.fc = nn.Linear(4, 2)

        def forward(self, inputs, data_samples=None, mode='tensor'):
            return self.fc(self.blk(inputs).mean((2, 3)))

    torch.manual_seed(0)                    # same weights on every rank
    model = RepQModel(Net(), repq=dict(w_bits=4, a_bits=4))
    g = torch.Generator().manual_seed(rank)
    # rank 0 sees non-negative inputs only, rank 1 also negative ones
    batches = [dict(inputs=(torch.rand(2, 4, 6, 6, generator=g) * (rank + 1)) - rank * 0.5)
               for _ in range(2)]
    calibrate_lsq(model, batches, num_batches=2)
    q = model.architecture.blk.a_quant
    model.train()
    reestimate_bn(model, batches, 2)
    bn = model.architecture.blk.branches[0][0].bn
    torch.save(dict(step=q.step.detach().clone(), signed=bool(q.is_signed),
                    local=[b['inputs'].abs().mean().item() for b in batches],
                    running_mean=bn.running_mean.clone()), f'{out}/rank{rank}.pt')
    dist.destroy_process_group()


def test_distributed_calibration(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2))
    assert torch.equal(r0['step'], r1['step'])                  # all ranks agree
    assert r0['signed'] and r1['signed']                        # any negative value: signed
    qp = 7                                                      # 4-bit signed
    expect = 2 * np.mean(r0['local'] + r1['local']) / qp ** 0.5
    assert r0['step'].item() == pytest.approx(expect, rel=1e-5)
    assert torch.allclose(r0['running_mean'], r1['running_mean'])
