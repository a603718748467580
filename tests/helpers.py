"""Builders and tools shared by the test modules (``tests/`` is on ``sys.path``: pytest
puts the folder of the root ``conftest.py`` there). Fixtures are in ``conftest.py``."""
from __future__ import annotations

import importlib.util
import math
import os
import os.path as osp
import sys

import torch
import torch.nn.functional as F

from repq_mm.rep import ConvStage, MaskStage, RepBlock, ScaleStage

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))   # the checkout
PY = sys.executable
NUM_CLASSES = 3

ARCH = dict(
    type='ImageClassifier',
    backbone=dict(type='RepVGG',
                  arch=dict(num_blocks=[1, 1, 1, 1], width_factor=[0.25] * 4,
                            group_layer_map=None, se_cfg=None),
                  out_indices=(3, )),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=NUM_CLASSES, in_channels=128,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0), topk=(1, )))
DATA_PREPROCESSOR = dict(num_classes=NUM_CLASSES, mean=[127.5] * 3, std=[127.5] * 3,
                         to_rgb=False)


def load_tool(name, path=None):
    """A tool script as a module: ``tools/{name}.py``, or ``path`` (relative to the
    checkout) under the module name ``name``."""
    spec = importlib.util.spec_from_file_location(
        f'repq_tool_{name}', osp.join(ROOT, path or osp.join('tools', f'{name}.py')))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_TOOLS = {'train_tool': 'train', 'test_tool': 'test', 'merge_tool': 'merge_quant'}


def __getattr__(name):
    """``train_tool`` / ``test_tool`` / ``merge_tool``: this project's tools as modules,
    loaded on first use (they import mmengine)."""
    if name in _TOOLS:
        mod = globals()[name] = load_tool(_TOOLS[name])
        return mod
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def make_pngs(root, counts=(('train', 12), ('val', 6))) -> str:
    """``NUM_CLASSES`` classes of 32x32 PNGs (colour-coded, noisy) under ``root/split/classK``,
    ``counts`` images per class and split."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(0)
    for split, n in counts:
        for c in range(NUM_CLASSES):
            d = osp.join(str(root), split, f'class{c}')
            os.makedirs(d)
            for i in range(n):
                img = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
                img[..., c] += 120
                cv2.imwrite(osp.join(d, f'{i}.png'), img)
    return str(root)


def stock_test_py() -> str:
    import mmpretrain
    path = osp.join(osp.dirname(mmpretrain.__file__), '.mim', 'tools', 'test.py')
    assert osp.isfile(path), path
    return path


def write_config(path, data_root, repq=None, custom_hooks=(), max_iters=4, ckpt_interval=2,
                 extra='', batch_sizes=(8, 9), weight_decay=1e-4):
    """A tiny classification config; with ``repq`` (settings, may hold ``init_checkpoint``)
    its model is ``dict(type='RepQModel', architecture=ARCH, repq=..., init_checkpoint=...)``,
    the form every tool builds. Hooks are only the given ones."""
    pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
    model = ARCH
    if repq is not None:
        repq = dict(repq)
        model = dict(type='RepQModel', architecture=ARCH,
                     init_checkpoint=repq.pop('init_checkpoint', None), repq=repq)

    def loader(split, shuffle, bs):
        return dict(batch_size=bs, num_workers=0,
                    dataset=dict(type='CustomDataset', data_root=osp.join(data_root, split),
                                 pipeline=pipeline),
                    sampler=dict(type='DefaultSampler', shuffle=shuffle))

    text = f"""
default_scope = 'mmpretrain'
custom_imports = dict(imports=['repq_mm'], allow_failed_imports=False)
model = {model!r}
data_preprocessor = {DATA_PREPROCESSOR!r}
train_dataloader = {loader('train', True, batch_sizes[0])!r}
val_dataloader = {loader('val', False, batch_sizes[1])!r}
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9,
                                    weight_decay={weight_decay!r}))
train_cfg = dict(by_epoch=False, max_iters={max_iters}, val_interval={max_iters})
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=1),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval={ckpt_interval}, by_epoch=False),
    sampler_seed=dict(type='DistSamplerSeedHook'))
custom_hooks = {list(custom_hooks)!r}
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
log_level = 'WARNING'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
"""
    text += extra
    with open(path, 'w') as f:
        f.write(text)
    return str(path)


def build(model_cfg, scope: str = 'mmpretrain'):
    """``MODELS.build`` in the given default scope."""
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(scope)
    return MODELS.build(model_cfg)


def loader(data_root, split='val', bs=9, shuffle=False):
    """A DataLoader over ``data_root/split`` (the ``data_root`` fixture's PNGs)."""
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    init_default_scope('mmpretrain')
    return Runner.build_dataloader(dict(
        batch_size=bs, num_workers=0,
        dataset=dict(type='CustomDataset', data_root=osp.join(data_root, split),
                     pipeline=[dict(type='LoadImageFromFile'), dict(type='PackInputs')]),
        sampler=dict(type='DefaultSampler', shuffle=shuffle)), seed=0)


# -- the tree tiles (tools/dataset_converters/deepforest_trees.py) -------------------------
TREES = osp.join(ROOT, 'data', 'trees')
CI_CFG = osp.join(ROOT, 'configs', 'yolov6_trees', 'yolov6-n_repq-bn_w4a4_trees-ci.py')


# -- rep blocks ------------------------------------------------------------------------
BATCH = 3


@torch.no_grad()
def randomize(block: RepBlock, gen: torch.Generator) -> RepBlock:
    """Make every branch matter: random BN statistics / affine, conv biases, scales."""
    def rn(*shape, s=1.0):
        return torch.randn(*shape, generator=gen) * s

    def ru(*shape, lo=0.5, hi=1.5):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    for bn in block.bns():
        c = bn.num_features
        bn.running_mean.copy_(rn(c, s=0.5))
        bn.running_var.copy_(ru(c))
        bn.weight.copy_(ru(c) * torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0))
        bn.bias.copy_(rn(c, s=0.3))
    for branch in block.branches:
        for st in branch:
            if isinstance(st, ConvStage) and st.bias is not None:
                st.bias.copy_(rn(st.out_channels, s=0.2))
            elif isinstance(st, ScaleStage):
                st.scale.copy_(ru(st.out_channels))
            elif isinstance(st, MaskStage):
                st.scale.copy_(rn(*st.scale.shape, s=0.3))
                st.bias.copy_(rn(st.out_channels, s=0.2))
    return block


def make_input(cin, size, gen, kind='iid', batch=BATCH):
    """``iid``: independent Gaussian per element with per-channel offset and scale.
    ``corr``: channel-mixed, spatially blurred, post-ReLU (feature-map-like)."""
    if kind == 'iid':
        x = torch.randn(batch, cin, size, size, generator=gen)
        return x * (0.5 + torch.rand(1, cin, 1, 1, generator=gen)) + \
            torch.randn(1, cin, 1, 1, generator=gen) * 0.5
    z = torch.randn(batch, cin, size + 2, size + 2, generator=gen)
    mix = 0.6 + 0.6 * torch.randn(cin, cin, generator=gen) / math.sqrt(cin)
    z = torch.einsum('oi,nihw->nohw', mix, z)
    z = F.avg_pool2d(z, 3, 1)
    return F.relu(z + 0.3 * torch.randn(1, cin, 1, 1, generator=gen))


def snapshot(net):
    """Module names / types / identities and a copy of the state of ``net``."""
    return [(n, type(m), id(m)) for n, m in net.named_modules()], \
        {k: v.clone() for k, v in net.state_dict().items()}


def unchanged(net, snap) -> bool:
    """``net`` has the modules and the state it had at :func:`snapshot`."""
    mods, sd = snap
    now = snapshot(net)
    return now[0] == mods and now[1].keys() == sd.keys() and \
        all(torch.equal(now[1][k], sd[k]) for k in sd)
