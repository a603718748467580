"""Detection (mmdet 3.3): the YOLOv6-style and YOLOv7-style RepQ detectors.

* shapes of every detector form (full-precision multi-branch, RepQ QAT, merged deploy) and of
  the backbones / necks;
* merge equivalence of the whole detector (deploy vs QAT eval outputs, ``mode='tensor'``);
* the tree-tile converter's tiling rules;
* end to end on 4 real DeepForest tiles (``data/trees``, written by
  ``tools/dataset_converters/deepforest_trees.py``; ``tools/run_tests.sh`` fetches it): the
  stock mmdet ``tools/train.py`` trains the shipped CI config as it is for a few RepQ
  iterations (the checkpoint holds the initialised quantizers), ``tools/merge_quant.py``, the
  stock mmdet ``tools/test.py`` on the merged checkpoint (CocoMetric) against our
  ``tools/test.py`` on the QAT checkpoint, integer ONNX export;
* every tree and COCO config declares its model itself (a RepQModel around the FP config's
  detector for the quantized ones); every COCO config: build, one training step and one
  merge on random tensors.
"""
from __future__ import annotations

import copy
import glob
import importlib.util
import os.path as osp
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip('mmdet')

from mmengine.config import Config  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmdet.registry import MODELS as DET_MODELS  # noqa: E402
from mmdet.testing import demo_mm_inputs  # noqa: E402

import repq_mm  # noqa: E402,F401
from repq_mm import merge_model  # noqa: E402
from repq_mm.mm import RepQModel  # noqa: E402
from repq_mm.mm.checkpoint import safe_load  # noqa: E402
from repq_mm.mm.config import is_repq_model  # noqa: E402
from repq_mm.mm.det import ELANNet, ELANPAN, EfficientRep, RepPAN  # noqa: E402
from repq_mm.quant import QConv2d  # noqa: E402
from repq_mm.rep import RepBlock  # noqa: E402

from helpers import CI_CFG, PY, ROOT, TREES  # noqa: E402,F401
MAP_RE = re.compile(r'coco/bbox_mAP:\s*([0-9.]+)')


def _load_tool(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


test_tool = _load_tool(osp.join(ROOT, 'tools', 'test.py'), 'repq_det_test')
merge_tool = _load_tool(osp.join(ROOT, 'tools', 'merge_quant.py'), 'repq_det_merge')
converter = _load_tool(osp.join(ROOT, 'tools', 'dataset_converters', 'deepforest_trees.py'),
                       'repq_det_trees')


def _stock_tool(name) -> str:
    import mmdet
    path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', f'{name}.py')
    assert osp.isfile(path), path
    return path


# --------------------------------------------------------------------------------------
# tiny detectors (same parts as the configs, narrow)
# --------------------------------------------------------------------------------------
def _tiny_arch(kind: str) -> dict:
    cfg = Config.fromfile(osp.join(ROOT, 'configs', '_base_', f'det_{kind}.py'))
    arch = copy.deepcopy(cfg.model)       # a ConfigDict (mmdet heads read test_cfg.attr)
    if kind == 'yolov6':
        arch['backbone'].update(widen_factor=0.125)
        arch['neck'].update(in_channels=[32, 64, 128], widen_factor=0.125, out_channels=16)
    else:
        arch['backbone'].update(widen_factor=0.25)
        arch['neck'].update(in_channels=[32, 64, 64], widen_factor=0.25, out_channels=16)
    arch['bbox_head'].update(num_classes=1, in_channels=16, feat_channels=16, stacked_convs=1)
    return arch


def _build(arch, **repq):
    init_default_scope('mmdet')
    return RepQModel(copy.deepcopy(arch), repq=repq)


def _batch(n=2, size=64, num_classes=1, train=True, model=None):
    packed = demo_mm_inputs(batch_size=n, image_shapes=(3, size, size),
                            num_classes=max(num_classes, 2))
    for ds in packed['data_samples']:          # demo labels are 1 .. num_classes - 1
        ds.gt_instances.labels = ds.gt_instances.labels % num_classes
    return model.data_preprocessor(packed, train)


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _tensors(o)]


def _warm_up(model, steps=2):
    """Training-mode forwards + SGD steps: LSQ init, BN running stats, non-trivial weights."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        data = _batch(model=model)
        losses = model(**data, mode='loss')
        loss, _ = model.parse_losses(losses)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss


@pytest.mark.parametrize('cls,kw,in_ch,out', [
    (EfficientRep, dict(widen_factor=0.125), None, [(32, 8), (64, 4), (128, 2)]),
    (ELANNet, dict(widen_factor=0.25), None, [(32, 8), (64, 4), (64, 2)]),
    (RepPAN, dict(widen_factor=0.125, out_channels=24), [32, 64, 128], [(24, 8), (24, 4), (24, 2)]),
    (RepPAN, dict(widen_factor=0.125), [32, 64, 128], [(16, 8), (32, 4), (64, 2)]),
    (ELANPAN, dict(widen_factor=0.25, out_channels=24), [32, 64, 64], [(24, 8), (24, 4), (24, 2)]),
])
def test_backbone_neck_shapes(cls, kw, in_ch, out):
    assert DET_MODELS.get(cls.__name__) is cls
    if in_ch is None:
        m = cls(**kw)
        x = torch.randn(2, 3, 64, 64)
    else:
        m = cls(in_ch, **kw)
        x = [torch.randn(2, c, s, s) for c, s in zip(in_ch, (8, 4, 2))]
    outs = m(x)
    assert [(o.shape[1], o.shape[2]) for o in outs] == out
    assert list(getattr(m, 'out_channels')) == [c for c, _ in out]
    assert any(isinstance(b, RepBlock) for b in m.modules()) or cls is ELANNet


@pytest.mark.parametrize('kind', ['yolov6', 'yolov7'])
def test_detector_forms_shapes_and_merge(kind):
    """FP multi-branch, RepQ QAT and merged deploy forms: same output shapes; the deploy
    form has no rep block left and reproduces the QAT eval outputs."""
    torch.manual_seed(0)
    arch = _tiny_arch(kind)
    fp = _build(arch, method='fp')
    qat = _build(arch, method='repq', bn_mode='exact', w_bits=8, a_bits=8, per_channel=True)
    n_rep = sum(isinstance(m, RepBlock) for m in fp.modules())
    assert n_rep > 0 and n_rep == sum(isinstance(m, RepBlock) for m in qat.modules())
    for model in (fp, qat):
        loss = _warm_up(model)
        assert torch.isfinite(loss)
    deploy = merge_model(qat).eval()
    fp_deploy = merge_model(fp).eval()
    assert not any(isinstance(m, RepBlock) for m in deploy.modules())
    assert any(isinstance(m, QConv2d) for m in deploy.modules())
    # the deploy config builds the same structure and takes the merged weights exactly
    rebuilt = _build(arch, method='repq', bn_mode='exact', w_bits=8, a_bits=8,
                     per_channel=True, deploy=True)
    rebuilt.load_state_dict(deploy.state_dict(), strict=True)
    rebuilt.eval()
    qat.eval()
    fp.eval()
    data = _batch(n=2, size=96, train=False, model=qat)
    with torch.no_grad():
        outs = {name: _tensors(m(**data, mode='tensor')) for name, m in
                (('fp', fp), ('fp_deploy', fp_deploy), ('qat', qat), ('deploy', deploy),
                 ('rebuilt', rebuilt))}
    shapes = [tuple(t.shape) for t in outs['qat']]
    # (cls_scores, bbox_preds) x 3 levels at strides 8 / 16 / 32
    assert shapes == [(2, 1, 12, 12), (2, 1, 6, 6), (2, 1, 3, 3),
                      (2, 4, 12, 12), (2, 4, 6, 6), (2, 4, 3, 3)]
    for name, ts in outs.items():
        assert [tuple(t.shape) for t in ts] == shapes, name
    for ref, other in (('fp', 'fp_deploy'), ('qat', 'deploy'), ('qat', 'rebuilt')):
        for a, b in zip(outs[ref], outs[other]):
            tol = 1e-4 * max(1.0, a.abs().max().item())
            assert torch.allclose(a, b, atol=tol, rtol=1e-4), (ref, other,
                                                                (a - b).abs().max().item())
    # predictions (NMS'ed boxes) agree too
    with torch.no_grad():
        pa = qat(**data, mode='predict')
        pb = deploy(**data, mode='predict')
    for a, b in zip(pa, pb):
        assert torch.allclose(a.pred_instances.scores, b.pred_instances.scores, atol=1e-5)
        assert torch.allclose(a.pred_instances.bboxes, b.pred_instances.bboxes, atol=1e-3)


@pytest.mark.parametrize('method,bn_mode', [('lsq', 'exact'), ('repq', 'est')])
def test_detector_other_methods_merge(method, bn_mode):
    torch.manual_seed(1)
    qat = _build(_tiny_arch('yolov6'), method=method, bn_mode=bn_mode, w_bits=4, a_bits=4,
                 per_channel=True, first_bits=8,
                 layer_bits={'bbox_head.rtm_cls': 8, 'bbox_head.rtm_reg': 8})
    if method == 'lsq':
        assert not any(isinstance(m, RepBlock) for m in qat.modules())
    _warm_up(qat)
    qat.eval()
    deploy = merge_model(qat).eval()
    data = _batch(n=1, size=64, train=False, model=qat)
    with torch.no_grad():
        a, b = _tensors(qat(**data, mode='tensor')), _tensors(deploy(**data, mode='tensor'))
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-4 * max(1.0, x.abs().max().item()), rtol=1e-4)


# --------------------------------------------------------------------------------------
# converter
# --------------------------------------------------------------------------------------
def test_tiling_rules():
    assert converter.tile_origins(2299) == [0, 400, 800, 1200, 1600, 2000]   # 299 px kept
    assert converter.tile_origins(2472) == [0, 400, 800, 1200, 1600, 2000]   # 72 px dropped
    assert converter.tile_origins(400) == [0]
    boxes = np.array([[10, 10, 50, 50],        # inside
                      [380, 10, 420, 50],      # half inside: kept, clipped
                      [390, 10, 430, 50],      # a quarter inside: dropped
                      [500, 500, 540, 540]],   # outside
                     dtype=np.float64)
    b = converter.tile_boxes(boxes, 0, 0, 1000, 1000)
    assert b.tolist() == [[10, 10, 50, 50], [380, 10, 400, 50]]
    b = converter.tile_boxes(boxes, 400, 0, 1000, 1000)     # second column
    assert b.tolist() == [[0, 10, 20, 50], [0, 10, 30, 50]]
    s = converter.split([f't{i:02d}.png' for i in range(45)])
    assert len(s['val']) == 9 and len(s['train']) == 36
    assert s == converter.split(list(reversed([f't{i:02d}.png' for i in range(45)])))


# --------------------------------------------------------------------------------------
# end to end through the Runner on real tiles
# --------------------------------------------------------------------------------------
def test_end_to_end_trees(trees, tmp_path, monkeypatch):
    # the stock mmdet tools/train.py (its main(), in this process) trains the shipped config
    # as it is: 3 iterations
    work = tmp_path / 'qat'
    opts = ['train_cfg.max_epochs=3', 'train_cfg.val_interval=3',
            'default_hooks.checkpoint.interval=3']
    stock_train = _load_tool(_stock_tool('train'), 'stock_mmdet_train')
    monkeypatch.setattr(sys, 'argv', [_stock_tool('train'), CI_CFG, '--work-dir', str(work),
                                      '--cfg-options', *opts])
    stock_train.main()
    log = ''.join(open(p).read() for p in glob.glob(str(work / '*' / '*.log')))
    assert 'LSQ calibration on 1 batch(es)' in log
    ckpt = work / 'epoch_3.pth'
    ck = safe_load(str(ckpt))
    assert ck['meta']['iter'] == 3
    # the checkpoint holds the quantizers of the RepQ model the config declares, every one
    # initialised (LSQCalibHook; AdamW at lr 1e-5 for the steps keeps them positive), and
    # the rep blocks' branches (RepQ keeps them)
    cfg = Config.fromfile(CI_CFG)
    init_default_scope('mmdet')
    names = {k for k in DET_MODELS.build(cfg.model).state_dict()
             if k.endswith(('quant.step', 'quant.initialized'))}
    sd = ck['state_dict']
    assert names == {k for k in sd if k.endswith(('quant.step', 'quant.initialized'))}
    assert any('.w_quant.' in k for k in names) and any('.a_quant.' in k for k in names)
    assert all(int(sd[k]) == 1 for k in names if k.endswith('initialized'))
    assert all(torch.isfinite(sd[k]).all() and (sd[k] > 0).all()
               for k in names if k.endswith('step'))
    assert any('.branches.' in k for k in sd)
    # the QAT model through our tools/test.py (CocoMetric on 2 val tiles)
    qat_metrics = test_tool.main([CI_CFG, str(ckpt), '--work-dir', str(tmp_path / 'qtest'),
                                  '--cfg-options', *opts])
    assert 'coco/bbox_mAP' in qat_metrics and 'coco/bbox_mAP_50' in qat_metrics
    # merge, then the stock mmdet tools/test.py on the merged checkpoint
    out = tmp_path / 'merged'
    assert merge_tool.main([CI_CFG, str(ckpt), str(out), '--cfg-options', *opts]) == 0
    for f in ('deploy_config.py', 'merged.pth', 'int_weights.pth'):
        assert (out / f).is_file()
    sd = torch.load(out / 'merged.pth', map_location='cpu', weights_only=True)['state_dict']
    assert not any('branches' in k for k in sd)
    r = subprocess.run([PY, _stock_tool('test'), str(out / 'deploy_config.py'),
                        str(out / 'merged.pth'), '--work-dir', str(tmp_path / 'stock')],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    stock_map = float(MAP_RE.findall(r.stdout)[-1])
    assert abs(stock_map - qat_metrics['coco/bbox_mAP']) <= 1e-3
    # integer ONNX export of the detector (backbone + neck + head tensors), checked in
    # onnxruntime on two real tiles: every output within one quantization step of its
    # layer; the head's own post-processing gives the same detections
    from repq_mm.export import ExportError  # noqa: F401  (the tool's error type)
    from repq_mm.mm import cli
    from repq_mm.mm.export import compare_detections, export_checkpoint, load_images
    import json
    with open(osp.join(trees, 'annotations', 'instances_val.json')) as f:
        imgs = [osp.join(trees, 'images', i['file_name']) for i in json.load(f)['images'][:2]]
    cfg = Config.fromfile(CI_CFG)
    cli.prepare_cfg(cfg)
    onnx_path = tmp_path / 'onnx' / 'det.onnx'
    info = export_checkpoint(cfg, str(ckpt), str(onnx_path), fp32_out=str(tmp_path / 'fp.onnx'),
                             check_images=imgs)
    c = info['check']
    assert onnx_path.is_file() and c['within_one_step'] and c['num_outputs'] == 6
    assert c['batch'] == 2 and all(d <= t for d, t in zip(c['diffs'], c['tolerances']))
    assert info['size'] < info['fp32']['size']
    assert c['detections'] is not None and c['detections']['torch'] == c['detections']['onnx']
    from repq_mm.mm.export import build_merged_model
    from repq_mm.export import compare_onnx
    model, _ = build_merged_model(cfg, str(ckpt))
    batch, samples = load_images(cfg, model, imgs, 3, with_samples=True)
    # the plain QDQ form keeps the float biases of the PyTorch model, so every detection of
    # the head's post-processing matches end to end (the default fused form's int32 biases
    # move codes at rounding boundaries; it is checked layer by layer above)
    qdq_path = tmp_path / 'onnx' / 'det_qdq.onnx'
    export_checkpoint(cfg, str(ckpt), str(qdq_path), check_images=imgs, form='qdq')
    res = compare_onnx(model, str(qdq_path), batch)
    dets = compare_detections(model, batch, samples, res['onnx_outputs'], score_thr=0.0)
    assert dets['torch'] == dets['onnx'] > 0 and dets['min_iou'] > 0.999
    assert dets['max_score_diff'] < 1e-4


def test_merge_check_on_real_tiles(trees):
    """merge_quant's comparison path on an mmdet model: real val batches, dict / tuple
    outputs of ``mode='tensor'`` (a trained-for-two-steps RepQ-BN W4A4 detector)."""
    from repq_mm.mm import cli
    from repq_mm.mm.deploy import compare
    from repq_mm.mm.pipeline import eval_dataloader
    cfg = Config.fromfile(CI_CFG)
    cli.prepare_cfg(cfg)
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = DET_MODELS.build(cfg.model)
    _, loader = eval_dataloader(cfg)
    _warm_up(model)
    model.eval()
    deploy = merge_model(model).eval()
    res = compare(model, deploy, loader, 1)
    assert res['batches'] == 1 and res['rel'] <= 1e-4 and res['max_abs'] >= 0


# --------------------------------------------------------------------------------------
# COCO configs: build, one training step and one merge on random tensors
# --------------------------------------------------------------------------------------
COCO_CONFIGS = sorted(p for d in ('yolov6_coco', 'yolov7_coco')
                      for p in glob.glob(osp.join(ROOT, 'configs', d, '*.py'))
                      if '_qat-base_' not in p)


def test_coco_config_set():
    names = {osp.basename(p) for p in COCO_CONFIGS}
    for size in ('yolov6-n', 'yolov6-s'):
        assert {f'{size}_fp_8xb32-300e_coco.py', f'{size}_repq-bn_w8a8_8xb32-20e_coco.py',
                f'{size}_repq-bn_w4a4_8xb32-20e_coco.py'} <= names
    assert {'yolov7-tiny_fp_8xb32-300e_coco.py', 'yolov7-tiny_repq-bn_w8a8_8xb32-20e_coco.py',
            'yolov7-tiny_repq-bn_w4a4_8xb32-20e_coco.py'} <= names


@pytest.mark.parametrize('path', COCO_CONFIGS, ids=osp.basename)
def test_coco_config_step_and_merge(path):
    cfg = Config.fromfile(path)
    assert cfg.train_dataloader.dataset.type == 'CocoDataset'
    assert cfg.train_dataloader.dataset.data_root == 'data/coco/'
    qat = '_fp_' not in osp.basename(path)
    assert is_repq_model(cfg.model) == qat        # the config declares its model itself
    arch = cfg.model.architecture if qat else cfg.model
    assert arch.bbox_head.num_classes == 80
    if qat:
        assert cfg.model.init_checkpoint.endswith('epoch_300.pth')
        assert [h['type'] for h in cfg.custom_hooks] == ['LSQCalibHook']
        size = osp.basename(path).split('_')[0]
        fp_cfg = Config.fromfile(osp.join(osp.dirname(path), f'{size}_fp_8xb32-300e_coco.py'))
        assert arch == fp_cfg.model                  # the FP config's detector, wrapped
        cfg.model.init_checkpoint = None             # no FP checkpoint here
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = DET_MODELS.build(cfg.model)
    # FP configs build the plain mmdet detector (multi-branch); RepQ ones the wrapper
    assert isinstance(model, RepQModel) == qat
    model.init_weights()
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-3))
    model.train()
    packed = demo_mm_inputs(batch_size=2, image_shapes=(3, 64, 64), num_classes=80)
    losses = model.train_step(packed, optim)
    assert torch.isfinite(losses['loss'])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    deploy = merge_model(model).eval()
    assert not any(isinstance(m, RepBlock) for m in deploy.modules())
    data = _batch(n=1, size=64, num_classes=80, train=False, model=model)
    with torch.no_grad():
        a, b = _tensors(model(**data, mode='tensor')), _tensors(deploy(**data, mode='tensor'))
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-4 * max(1.0, x.abs().max().item()), rtol=1e-4)


TREE_CONFIGS = sorted(p for d in ('yolov6_trees', 'yolov7_trees', 'reference_trees')
                      for p in glob.glob(osp.join(ROOT, 'configs', d, '*_trees.py'))
                      if '_qat-base_' not in p)


def test_tree_config_set():
    names = {osp.basename(p) for p in TREE_CONFIGS}
    for m in ('fp', 'fp-ft'):
        assert f'yolov6-n_{m}_trees.py' in names
    for m in ('lsq', 'repq-bn', 'repq-bnest', 'repq-bnestc', 'repq-bnestk'):
        for b in ('w8a8', 'w4a8', 'w4a4'):
            assert f'yolov6-n_{m}_{b}_trees.py' in names
    for m in ('fp', 'fp-ft', 'lsq_w8a8', 'lsq_w4a4', 'repq-bn_w8a8', 'repq-bn_w4a4'):
        assert f'yolov7-tiny_{m}_trees.py' in names


@pytest.mark.parametrize('path', TREE_CONFIGS, ids=osp.basename)
def test_tree_config_builds(path):
    """Every tree config parses and builds (QAT ones without their FP checkpoint); the QAT
    ones keep the stem and every per-level output conv at 8 bits and fine-tune on the FP
    run's last-stage data (no mosaic), without EMA."""
    from repq_mm.quant import LSQQuantizer
    cfg = Config.fromfile(path)
    name = osp.basename(path)
    qat = not re.search(r'_fp(-mixup)?_trees', name)
    assert is_repq_model(cfg.model) == qat        # the config declares its model itself
    arch = cfg.model.architecture if qat else cfg.model
    assert arch.bbox_head.num_classes == 1
    hooks = [h['type'] for h in cfg.get('custom_hooks', [])]
    if qat:
        prefix = name.split('_')[0]
        fp_cfg = Config.fromfile(osp.join(osp.dirname(path), f'{prefix}_fp_trees.py'))
        assert arch == fp_cfg.model                  # the FP config's detector, wrapped
        assert cfg.model.init_checkpoint == f'work_dirs/{prefix}_fp_trees/epoch_100.pth'
        cfg.model.init_checkpoint = None
        assert 'EMAHook' not in hooks and 'PipelineSwitchHook' not in hooks
        assert 'CachedMosaic' not in [t['type'] for t in cfg.train_dataloader.dataset.pipeline]
        method = cfg.model.repq.method
        assert hooks.count('LSQCalibHook') == (method != 'fp')
        assert ('BNEstHook' in hooks) == ('_repq-bnest' in name)
        repq = cfg.model.repq
        assert (repq.get('est_refresh', 0) == 8) == ('_repq-bnestc_' in name)
        assert (repq.get('est_stats', 'diag') == 'kron') == ('_repq-bnestk_' in name)
        if method != 'fp':
            bits_tag = re.search(r'_w(\d+)a(\d+)_', name)
            assert (repq.w_bits, repq.a_bits) == tuple(map(int, bits_tag.groups()))
        assert method == {'fp-ft': 'fp', 'lsq': 'lsq'}.get(name.split('_')[1], 'repq')
    else:
        assert {'EMAHook', 'PipelineSwitchHook'} <= set(hooks)
    init_default_scope('mmdet')
    model = DET_MODELS.build(cfg.model)
    assert isinstance(model, RepQModel) == qat
    if qat and cfg.model.repq.method == 'fp':   # the fine-tune control: no quantizer at all
        assert not any(isinstance(q, LSQQuantizer) for q in model.modules())
    elif qat:
        bits = {n.rsplit('.', 1)[0]: q.bits for n, q in model.named_modules()
                if isinstance(q, LSQQuantizer) and n.endswith('w_quant')}
        outs = [n for n in bits if '.rtm_cls.' in n or '.rtm_reg.' in n]
        assert len(outs) == 6 and all(bits[n] == 8 for n in outs)
        w, a = cfg.model.repq.w_bits, cfg.model.repq.a_bits
        assert sorted(set(bits.values())) == sorted({w, 8})
        a_bits = {q.bits for n, q in model.named_modules()
                  if isinstance(q, LSQQuantizer) and n.endswith('a_quant')}
        assert sorted(a_bits) == sorted({a, 8})


def test_det_experiments_fold_options(trees):
    """``det_experiments.py --fold K``: the options point every dataset and evaluator at
    fold K's files; the three validation folds are disjoint 9-tile sets, none overlaps its
    training tiles, fold 0 is the configs' own split; a missing fold file is named."""
    import json
    det = _load_tool(osp.join(ROOT, 'tools', 'det_experiments.py'), 'repq_det_experiments')
    assert det.fold_opts(None) == []
    vals = []
    for k in range(3):
        opts = dict(o.split('=', 1) for o in det.fold_opts(k))
        assert set(opts) == {f'{s}_dataloader.dataset.ann_file' for s in ('train', 'val', 'test')} \
            | {'val_evaluator.ann_file', 'test_evaluator.ann_file'}
        val = opts['val_dataloader.dataset.ann_file']
        assert val.endswith(f'val_fold{k}.json') and opts['test_dataloader.dataset.ann_file'] == val
        assert opts['val_evaluator.ann_file'] == opts['test_evaluator.ann_file'] == \
            'data/trees/' + val

        def images(rel):
            with open(osp.join(TREES, rel)) as f:
                return {im['file_name'] for im in json.load(f)['images']}
        v, t = images(val), images(opts['train_dataloader.dataset.ann_file'])
        assert len(v) == 9 and not v & t
        vals.append(v)
    assert not (vals[0] & vals[1] or vals[0] & vals[2] or vals[1] & vals[2])
    assert vals[0] == images(osp.join('annotations', 'instances_val.json'))
    with pytest.raises(SystemExit, match='instances_train_fold7.json'):
        det.fold_opts(7)


def test_det_experiments_fold_summary(tmp_path, capsys):
    """``det_experiments.py --fold 0 1 2 --summary-only``: every fold's mAP, mean ± std, the
    paired differences to the LSQ baseline / RepQ-BN and whether they resolve (same sign on
    every fold, |mean| > std); steps not run are named, not dropped; W4A8 steps are found by
    their own names; bad option combinations and missing configs are refused."""
    import json
    det = _load_tool(osp.join(ROOT, 'tools', 'det_experiments.py'), 'repq_det_experiments')
    runs = {'fp': [0.136, 0.150, 0.120], 'fp-ft': [0.124, 0.140, 0.110],
            'lsq_w4a4': [0.090, 0.100, 0.080], 'repq-bn_w4a4': [0.120, 0.130, 0.110],
            'repq-bnest_w4a4': [0.095, 0.095, None], 'lsq_w4a8': [0.110, 0.120, 0.100],
            'repq-bn_w4a8': [0.125, None, 0.105]}
    for step, vals in runs.items():
        for k, v in enumerate(vals):
            if v is None:
                continue
            d = tmp_path / f'fold{k}' / 'yolov6' / step
            d.mkdir(parents=True)
            r = dict(mAP=v, mAP50=3 * v)
            if step not in ('fp', 'fp-ft'):
                r.update(merged_mAP=v, merged_mAP50=3 * v if k else 0.0)
            (d / 'result.json').write_text(json.dumps(r))
    methods = ['fp-ft', 'lsq', 'repq-bn', 'repq-bnest']
    md, data, missing = det.fold_summary(str(tmp_path), 'yolov6', [0, 1, 2], [(4, 4), (4, 8)],
                                         methods)
    assert missing == ['fold 2: repq-bnest_w4a4', 'fold 1: repq-bn_w4a8',
                       'fold 0: repq-bnest_w4a8', 'fold 1: repq-bnest_w4a8',
                       'fold 2: repq-bnest_w4a8']
    assert ('| FP (multi-branch) | 0.136 | 0.150 | 0.120 | 0.135 ± 0.015 | 0.406 ± 0.045 | – |'
            in md)
    assert md.count('FP + the quantized runs') == 1           # one control, not one per width
    assert '| RepQ-BN W4A4 | 0.120 | 0.130 | 0.110 | 0.120 ± 0.010 |' in md
    assert 'NO (3 folds)' in md                                # fold 0's merged mAP50 differs
    diffs = data['diffs']
    bn = diffs['repq-bn_w4a4 - lsq_w4a4']
    assert bn['diffs'] == pytest.approx([0.03, 0.03, 0.03]) and bn['resolves'] is True
    est = diffs['repq-bnest_w4a4 - lsq_w4a4']                  # +0.005, -0.005: no
    assert est['folds'] == [0, 1] and est['resolves'] is False
    assert diffs['repq-bn_w4a8 - lsq_w4a8']['folds'] == [0, 2]
    assert diffs['repq-bnest_w4a8 - lsq_w4a8']['mean'] is None  # no fold at all
    assert ('| RepQ-BN W4A4 − LSQ baseline | +0.030, +0.030, +0.030 | +0.030 ± 0.000 | yes |'
            in md)
    assert 'Not run yet: fold 2: repq-bnest_w4a4' in md

    assert det.main(['--fold', '0', '1', '2', '--summary-only', '--folds-root', str(tmp_path),
                     '--bits', '4', '4a8', '--methods', *methods]) == 0
    out = capsys.readouterr().out
    assert '5 steps not run yet' in out
    written = (tmp_path / 'yolov6' / 'summary.md').read_text()
    assert 'validation folds 0, 1, 2' in written
    assert '| RepQ-BN W4A8 | 0.125 | – | 0.105 |' in written
    assert json.loads((tmp_path / 'yolov6' / 'summary.json').read_text())['missing'] == missing
    for bad, msg in ((['--fold', '0', '--work-root', str(tmp_path)], '--folds-root'),
                     (['--summary-only'], '--summary-only needs --fold'),
                     (['--model', 'yolov7', '--methods', 'repq-bnest'],
                      'yolov7-tiny_repq-bnest_w8a8_trees.py'),
                     (['--bits', '4b8'], '4b8')):
        with pytest.raises(SystemExit):
            det.main(bad)
        assert msg in capsys.readouterr().err
