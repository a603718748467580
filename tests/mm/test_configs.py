"""The shipped classification configs.

* every one declares its model itself (a RepQModel for the quantized ones, whose ``repq``
  matches the file name, with ``LSQCalibHook``), builds, trains one step and merges (random
  tensors; ImageNet is not available here, the float checkpoint download is switched off);
* derived configs and ``--cfg-options`` change single ``model.repq`` keys;
* the stock mmpretrain ``tools/train.py`` trains a shipped Fashion-MNIST RepQ config as it
  is (a few iterations on real images, from a float checkpoint given as
  ``model.init_checkpoint``; the checkpoint holds the initialised quantizers) and the stock
  ``tools/test.py`` evaluates that checkpoint; the old form (a bare top-level ``repq``) fails
  under the stock ``tools/train.py`` with the error naming the new one.
"""
import glob
import importlib.util
import json
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmpretrain')
from mmengine.config import Config  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402
from mmpretrain.structures import DataSample  # noqa: E402

import repq_mm  # noqa: E402,F401
from repq_mm.mm import RepQModel  # noqa: E402
from repq_mm.mm.checkpoint import safe_load  # noqa: E402
from repq_mm.mm.config import is_repq_model  # noqa: E402
from repq_mm.rep import RepBlock  # noqa: E402

from helpers import ROOT  # noqa: E402
PY = sys.executable
IMAGENET = sorted(glob.glob(osp.join(ROOT, 'configs/repvgg_imagenet/*_w*a*_*.py')))
FMNIST = sorted(glob.glob(osp.join(ROOT, 'configs/repvgg_fmnist/*.py')))
FMNIST_DATA = osp.join(ROOT, 'data', 'fashion_mnist')
NAME_RE = re.compile(r'_(fp|ptq|lsq|repq-bn|repq-bnest|repq-bnestc|repq-bnestk)'
                     r'(?:_w(\d)a(\d))?_')


def test_config_sets():
    """The globs below find exactly the shipped configs (an empty glob would make the
    parametrized tests pass vacuously)."""
    assert {osp.basename(p) for p in IMAGENET} == {
        f'repvgg-{arch}_{m}_w{b}a{b}_8xb32_in1k.py' for arch in ('A0', 'B0')
        for m in ('lsq', 'repq-bn', 'repq-bnest') for b in (8, 4)}
    assert {osp.basename(p) for p in FMNIST} == {'repvgg-A0w16_fp_fmnist.py'} | {
        f'repvgg-A0w16_{m}_w{w}a{a}_fmnist.py'
        for m in ('ptq', 'lsq', 'repq-bn', 'repq-bnest', 'repq-bnestc', 'repq-bnestk')
        for w, a in ((8, 8), (4, 4), (4, 8))}


def _check_declared(cfg, path):
    """The model the file name promises, declared in the config itself."""
    kind, w, a = NAME_RE.search(osp.basename(path)).groups()
    if kind == 'fp':
        assert cfg.model.type == 'ImageClassifier' and not is_repq_model(cfg.model)
        return
    assert is_repq_model(cfg.model), 'a quantized config declares its RepQModel'
    assert cfg.model.architecture.type == 'ImageClassifier'
    repq = cfg.model.repq
    method = 'repq' if kind.startswith('repq') else kind
    assert repq.method == method and (repq.w_bits, repq.a_bits) == (int(w), int(a))
    if method == 'repq':
        assert repq.bn_mode == ('exact' if kind == 'repq-bn' else 'est')
        assert repq.get('est_refresh', 0) == (8 if kind == 'repq-bnestc' else 0)
        assert repq.get('est_stats', 'diag') == ('kron' if kind == 'repq-bnestk' else 'diag')
    hooks = [h['type'] for h in cfg.custom_hooks]
    assert hooks.count('LSQCalibHook') == 1
    assert ('BNEstHook' in hooks) == kind.startswith('repq-bnest')
    assert 'init_checkpoint' in cfg.model and 'init_checkpoint' not in repq


def _batch(channels, size, n=2, classes=10):
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (channels, size, size), generator=g, dtype=torch.uint8)
            for _ in range(n)]
    samples = [DataSample().set_gt_label(i % classes) for i in range(n)]
    return dict(inputs=imgs, data_samples=samples)


def _one_step_and_merge(path, channels, size):
    cfg = Config.fromfile(path)
    _check_declared(cfg, path)
    quantized = is_repq_model(cfg.model)
    if quantized:
        cfg.merge_from_dict({'model.init_checkpoint': None})
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    model = MODELS.build(dict(cfg.model, data_preprocessor=cfg.data_preprocessor)
                         if cfg.get('data_preprocessor', None) else cfg.model)
    assert isinstance(model, RepQModel) == quantized
    model.init_weights()
    # clipped: from random init (the real configs start from a trained FP checkpoint) the
    # deep B0 nets with BNEst can produce exploding gradients, which would make this smoke
    # test's single step overflow instead of testing the step and the merge
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-3),
                         clip_grad=dict(max_norm=1.0))
    model.train()
    data = _batch(channels, size)
    losses = model.train_step(data, optim)
    assert torch.isfinite(losses['loss'])
    if not quantized:
        return
    blocks = [m for m in model.modules() if isinstance(m, RepBlock)]
    assert bool(blocks) == (cfg.model.repq.method == 'repq'), \
        'only RepQ keeps rep blocks during QAT'
    model.eval()
    with torch.no_grad():
        x = model.data_preprocessor(data, False)['inputs']
        y_qat = model(x, mode='tensor')
        deploy = repq_mm.merge_model(model)
        assert not any(isinstance(m, RepBlock) for m in deploy.modules())
        y_dep = deploy(x, mode='tensor')
    assert torch.allclose(y_qat, y_dep, rtol=1e-4, atol=1e-4 * y_qat.abs().max().item())


@pytest.mark.parametrize('path', IMAGENET, ids=osp.basename)
def test_imagenet_configs(path):
    cfg = Config.fromfile(path)
    assert cfg.model.init_checkpoint.startswith('https://download.openmmlab.com/')
    assert cfg.model.architecture.backbone.type == 'RepVGG'
    _one_step_and_merge(path, 3, 32)


@pytest.mark.parametrize('path', FMNIST, ids=osp.basename)
def test_fmnist_configs(path):
    _one_step_and_merge(path, 1, 32)


def test_derived_config_and_options(tmp_path):
    """A config derived from a shipped one, and ``--cfg-options``, change single keys of
    ``model.repq`` / the wrapper; the rest of the RepQ model stays as declared."""
    base = osp.join(ROOT, 'configs/repvgg_fmnist/repvgg-A0w16_repq-bn_w4a4_fmnist.py')
    derived = tmp_path / 'derived.py'
    derived.write_text(f'_base_ = {base!r}\nmodel = dict(repq=dict(w_bits=8))\n')
    cfg = Config.fromfile(str(derived))
    ref = Config.fromfile(base)
    assert cfg.model.repq == dict(ref.model.repq, w_bits=8) and cfg.model.repq.a_bits == 4
    assert cfg.model.architecture == ref.model.architecture
    cfg.merge_from_dict({'model.repq.bn_mode': 'est', 'model.init_checkpoint': 'fp.pth',
                         'model.architecture.head.num_classes': 5})
    assert cfg.model.repq.bn_mode == 'est' and cfg.model.init_checkpoint == 'fp.pth'
    assert cfg.model.architecture.head.num_classes == 5
    assert cfg.model.architecture.backbone == ref.model.architecture.backbone
    with pytest.raises(ValueError, match=r'top-level `repq`.*model\.repq\.w_bits=4'):
        cfg.merge_from_dict({'repq.w_bits': 4})         # the old option: refused, not ignored
    assert cfg.model.repq.w_bits == 8


# --------------------------------------------------------------------------------------
# the stock mmpretrain tools on a shipped config
# --------------------------------------------------------------------------------------
def _stock_tool(name) -> str:
    import mmpretrain
    path = osp.join(osp.dirname(mmpretrain.__file__), '.mim', 'tools', f'{name}.py')
    assert osp.isfile(path), path
    return path


def _run_stock(name, argv, monkeypatch):
    """The stock tool's ``main()`` as it is, in this process (its argv; the imports of a
    fresh interpreter would dominate the test's time; the fresh-process path, repq_mm
    imported by ``Config.fromfile`` itself, is what the old-form test below runs)."""
    path = _stock_tool(name)
    spec = importlib.util.spec_from_file_location(f'stock_mmpretrain_{name}', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, 'argv', [path, *argv])
    return mod.main()


def _log(work_dir) -> str:
    """The text of the run log(s) mmengine wrote under ``work_dir``."""
    return ''.join(open(p).read() for p in sorted(glob.glob(osp.join(work_dir, '*', '*.log'))))


@pytest.fixture(scope='module')
def fmnist():
    if not osp.isfile(osp.join(FMNIST_DATA, 't10k-images-idx3-ubyte')):
        pytest.skip('data/fashion_mnist missing: run '
                    'tools/dataset_converters/fetch_fashion_mnist.py (tools/run_tests.sh does)')
    return FMNIST_DATA


def test_stock_mmpretrain_train_and_test(tmp_path, fmnist, monkeypatch):
    cfg_path = osp.join(ROOT, 'configs/repvgg_fmnist/repvgg-A0w16_repq-bn_w4a4_fmnist.py')
    cfg = Config.fromfile(cfg_path)
    # a float checkpoint of the architecture (what the FP config trains)
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    fp = MODELS.build(dict(cfg.model.architecture, data_preprocessor=cfg.data_preprocessor))
    fp_path = str(tmp_path / 'fp.pth')
    torch.save({'state_dict': fp.state_dict()}, fp_path)
    # 16 images, batch 8: one epoch of 2 iterations, validated on 16 images (the 10k test
    # file for both: mmpretrain's FashionMNIST parses its whole file before `indices`
    # applies, 60k training images take ~10 s)
    small = ['train_dataloader.dataset.split=test', 'train_dataloader.dataset.test_mode=True',
             'train_dataloader.dataset.indices=16', 'train_dataloader.batch_size=8',
             'val_dataloader.dataset.indices=16', 'val_dataloader.batch_size=16',
             'test_dataloader.dataset.indices=16', 'test_dataloader.batch_size=16',
             'custom_hooks.0.num_batches=2', 'custom_hooks.0.save_calibrated=True',
             'default_hooks.logger.interval=1']
    wd = str(tmp_path / 'wd')
    _run_stock('train', [cfg_path, '--work-dir', wd, '--cfg-options',
                         f'model.init_checkpoint={fp_path}', *small], monkeypatch)
    out = _log(wd)
    assert f'RepQModel: loading float checkpoint {fp_path}' in out
    assert 'LSQ calibration on 2 batch(es)' in out
    ck = safe_load(osp.join(wd, 'epoch_1.pth'))
    assert ck['meta']['iter'] == 2
    sd = ck['state_dict']
    calibrated = safe_load(osp.join(wd, 'calibrated.pth'))['state_dict']   # before training
    # the quantizers of the RepQ model the config declares, all initialised by LSQCalibHook
    model = MODELS.build(dict(cfg.model, init_checkpoint=None,
                              data_preprocessor=cfg.data_preprocessor))
    names = {k for k in model.state_dict() if k.endswith(('quant.step', 'quant.initialized'))}
    assert names == {k for k in sd if k.endswith(('quant.step', 'quant.initialized'))}
    assert any('.w_quant.' in k for k in names) and any('.a_quant.' in k for k in names)
    steps = sorted(k for k in names if k.endswith('step'))
    for state in (calibrated, sd):
        assert all(int(state[k]) == 1 for k in names if k.endswith('initialized'))
        assert all(torch.isfinite(state[k]).all() for k in steps)
    assert all((calibrated[k] > 0).all() for k in steps)             # LSQ initialisation
    assert any(not torch.equal(calibrated[k], sd[k]) for k in steps)  # then trained
    assert any(k.endswith('branches.0.0.bn.running_var') for k in sd)    # RepQ blocks kept
    val_acc = float(re.findall(r'accuracy/top1: ([0-9.]+)', out)[-1])

    # the stock tools/test.py evaluates that checkpoint with the same config: the same
    # accuracy as the end-of-training validation on the same images (nothing recalibrated)
    metrics = str(tmp_path / 'metrics.json')
    twd = str(tmp_path / 'test')
    _run_stock('test', [cfg_path, osp.join(wd, 'epoch_1.pth'), '--work-dir', twd, '--out',
                        metrics, '--out-item', 'metrics', '--cfg-options', *small], monkeypatch)
    assert 'LSQ calibration' not in _log(twd) and 'Epoch(test)' in _log(twd)
    with open(metrics) as f:
        assert json.load(f)['accuracy/top1'] == pytest.approx(val_acc, abs=1e-6)


def test_bare_repq_fails_under_stock_train(tmp_path):
    """The old form: a top-level ``repq`` beside the plain model. The stock train.py would
    train the plain model in full precision; it fails instead, before anything is built,
    with the RepQModel form in the message. A fresh interpreter: ``repq_mm`` is first
    imported by the config's ``custom_imports`` inside ``Config.fromfile``."""
    fp_cfg = osp.join(ROOT, 'configs/repvgg_fmnist/repvgg-A0w16_fp_fmnist.py')
    old = tmp_path / 'old_form.py'
    old.write_text(f"_base_ = {fp_cfg!r}\n"
                   "repq = dict(w_bits=4, a_bits=4, bn_mode='exact', init_checkpoint='fp.pth')\n")
    wd = tmp_path / 'wd'
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([PY, _stock_tool('train'), str(old), '--work-dir', str(wd)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    err = proc.stderr
    assert 'RepQConfigError' in err and 'top-level `repq` section beside a plain ' \
        'ImageClassifier model' in err, err[-3000:]
    assert "type='RepQModel'" in err and 'architecture=_base_.model' in err
    assert "repq=dict(w_bits=4, a_bits=4, bn_mode='exact')" in err
    assert "init_checkpoint='fp.pth'" in err and "dict(type='LSQCalibHook')" in err
    assert not wd.exists()                                  # failed before the Runner
