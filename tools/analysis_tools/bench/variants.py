"""The models and training variants the benchmark measures.

Every variant is made from one full-precision model through :func:`repq_mm.convert_to_repq`
and :func:`repq_mm.merge_model`, the same calls a user makes:

* ``fp_multibranch``: the model as built (multi-branch, BN, train mode);
* ``fp_merged``: ``merge_model`` (every rep block one plain conv, no BN): the floor;
* ``lsq``: ``convert_to_repq(merge_model(fp))``: the paper's LSQ baseline;
* ``repq_bn`` / ``repq_est``: ``convert_to_repq`` with ``bn_mode='exact'`` / ``'est'``;
* ``repq_estc8``: BNEst with exact statistics every 8th step (``est_refresh=8``);
* ``repq_estk``: BNEst with the Kronecker-factored statistics (``est_stats='kron'``);
* ``repq_bn_noquant`` / ``repq_est_noquant``: the merged RepQ forward without quantizers;
* ``mm_fp_multibranch``: mmpretrain's own RepVGG (reference, when installed).

Example:
    >>> from argparse import Namespace
    >>> from repq_mm import QConfig
    >>> args = Namespace(model='block', channels=8)
    >>> base, desc = build_model(args)
    >>> desc
    'RepVGGBlock(8, 8, act=ReLU)'
    >>> m = make_variant('repq_est', base, QConfig(w_bits=4, a_bits=4))
    >>> m.bn_mode, m.training, m.w_quant.bits
    ('est', True, 4)
"""
from __future__ import annotations

import copy
import os.path as osp
from pathlib import Path

import torch
from torch import nn

from repq_mm import convert_to_repq, merge_model
from repq_mm.convert import find_rep_blocks
from repq_mm.models import REPVGG_ARCHS, RepVGGNet
from repq_mm.quant import QConfig
from repq_mm.rep import RepBlock, RepVGGBlock

ROOT = Path(__file__).resolve().parents[3]

TRAIN_VARIANTS = {
    'fp_multibranch': 'FP multi-branch',
    'fp_merged': 'FP merged conv (floor)',
    'lsq': 'LSQ baseline (merged + LSQ)',
    'repq_bn': 'RepQ-BN (exact stats)',
    'repq_est': 'RepQ-BNEst',
    'repq_estc8': 'RepQ-BNEst + exact-stats correction every 8 steps',
    'repq_estk': 'RepQ-BNEst, Kronecker statistics (est_stats=kron)',
    'repq_bn_noquant': 'RepQ-BN merge, no quantizers',
    'repq_est_noquant': 'RepQ-BNEst merge, no quantizers',
    'mm_fp_multibranch': 'mmpretrain RepVGG FP multi-branch',
}
DEFAULT_TRAIN = ('fp_multibranch', 'fp_merged', 'lsq', 'repq_bn', 'repq_est')
INFER_VARIANTS = {
    'fp_train_form': 'FP train-form (multi-branch, eval)',
    'fp_deploy': 'FP deploy (merged conv)',
    'repq_eval': 'RepQ-BN net in eval (cached Q_w(M))',
    'q_deploy': 'Deploy + fake quant (QConv2d eval)',
    'mm_deploy': 'mmpretrain RepVGG deploy (switch_to_deploy)',
}
MERGE_OPS = {
    'to_deploy_fp': 'to_deploy() over all blocks (FP)',
    'merge_model_fp': 'merge_model(inplace=False) (FP, incl. deepcopy)',
    'to_deploy_repq': 'to_deploy() over all blocks (RepQ, quantized)',
}

#: ``--model`` shorthands for the detectors (full-precision tree configs, 1 class)
DETECTORS = {
    'yolov6': osp.join(ROOT, 'configs', 'yolov6_trees', 'yolov6-n_fp_trees.py'),
    'yolov7': osp.join(ROOT, 'configs', 'yolov7_trees', 'yolov7-tiny_fp_trees.py'),
}


def _floats(s: str | None) -> tuple[float, ...] | None:
    return None if s in (None, '') else tuple(float(v) for v in s.split(','))


def _ints(s: str | None) -> tuple[int, ...] | None:
    return None if s in (None, '') else tuple(int(v) for v in s.split(','))


class _MMWrapper(nn.Module):
    """An mmpretrain ``ImageClassifier`` (config), an mmdet detector or an mmpretrain
    ``RepVGG`` backbone as ``x -> tensor(s)``."""

    def __init__(self, model: nn.Module, kind: str, num_classes: int = 0, channels: int = 0):
        super().__init__()
        self.model, self.kind = model, kind
        if kind == 'backbone':
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        if self.kind in ('classifier', 'detector'):
            return self.model(x, mode='tensor')
        feats = self.model(x)
        return self.head(torch.flatten(self.gap(feats[-1]), 1))


def mmpretrain_available() -> str | None:
    """mmpretrain's version if it is installed (without importing it), else ``None``."""
    import importlib.metadata
    import importlib.util
    try:
        if importlib.util.find_spec('mmpretrain') is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return importlib.metadata.version('mmpretrain')
    except importlib.metadata.PackageNotFoundError:
        return 'unknown'


def build_mm_repvgg(arch: str, num_classes: int, in_channels: int) -> nn.Module | None:
    """mmpretrain's ``RepVGG`` backbone + GAP + Linear (same head as :class:`RepVGGNet`)."""
    try:
        from mmpretrain.models.backbones import RepVGG
    except Exception:  # noqa: BLE001
        return None
    backbone = RepVGG(arch, in_channels=in_channels, out_indices=(3,))
    a, b = REPVGG_ARCHS[arch.upper()][1]
    return _MMWrapper(backbone, 'backbone', num_classes, int(512 * b))


def build_model(args) -> tuple[nn.Module | None, str]:
    """The full-precision model named by ``args.model`` and a one-line description
    (model ``None``: skipped, the description says why).

    ``args`` is the benchmark's namespace: ``model`` and, as the model needs them,
    ``channels`` (``block``), ``in_channels``, ``num_classes``, ``width_multiplier``,
    ``num_blocks`` (comma-separated strings or ``None``)."""
    spec = args.model
    if spec == 'block':
        c = args.channels
        return RepVGGBlock(c, c, act=nn.ReLU()), f'RepVGGBlock({c}, {c}, act=ReLU)'
    if spec.upper() in REPVGG_ARCHS:
        net = RepVGGNet(spec, in_channels=args.in_channels, num_classes=args.num_classes,
                        width_multiplier=_floats(args.width_multiplier),
                        num_blocks=_ints(args.num_blocks))
        blocks = [len(s) for s in net.stages]
        return net, (f'RepVGGNet({spec.upper()}, stages={blocks}, out_channels='
                     f'{net.out_channels}, num_classes={args.num_classes})')
    if spec.startswith('mmpretrain:'):
        what = spec.split(':', 1)[1]
        version = mmpretrain_available()
        try:
            import mmpretrain  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any failure means "not usable"
            return None, (f'{spec}: mmpretrain is not importable ({type(e).__name__}: {e}); '
                          'skipped')
        if what.upper() in REPVGG_ARCHS:
            return (build_mm_repvgg(what, args.num_classes, args.in_channels),
                    f'mmpretrain {version} RepVGG({what.upper()}) + GAP + Linear')
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from mmpretrain.registry import MODELS
        cfg = Config.fromfile(what)
        init_default_scope(cfg.get('default_scope', 'mmpretrain'))
        model = MODELS.build(cfg.model)
        return _MMWrapper(model, 'classifier'), f'mmpretrain {version} config {what}'
    if spec in DETECTORS or spec.startswith('mmdet:'):
        path = DETECTORS.get(spec) or spec.split(':', 1)[1]
        try:
            import mmdet
            from mmdet.registry import MODELS as DET_MODELS
            from mmengine.config import Config
            from mmengine.registry import init_default_scope
            import repq_mm.mm  # noqa: F401  (registers the YOLO-style backbones / necks)
        except Exception as e:  # noqa: BLE001 - any failure means "not usable"
            return None, f'{spec}: mmdet is not importable ({type(e).__name__}: {e}); skipped'
        from repq_mm.mm.config import is_repq_model
        cfg = Config.fromfile(path)
        if is_repq_model(cfg.model):
            raise SystemExit(f'--model {spec}: give the full-precision config (this one has a '
                             'RepQModel); the variants are made here')
        init_default_scope('mmdet')
        model = DET_MODELS.build(cfg.model)
        return (_MMWrapper(model, 'detector'),
                f'mmdet {mmdet.__version__} detector {osp.relpath(path, ROOT)} (training step: '
                'smooth-L1 of the head outputs to zero as the loss; the assigner / detection loss '
                'costs the same for every variant and is left out)')
    raise SystemExit(f'unknown --model {spec!r}: use block, one of '
                     f'{sorted(REPVGG_ARCHS)}, mmpretrain:CONFIG_OR_ARCH, '
                     f'{" / ".join(DETECTORS)} or mmdet:CONFIG')


def rep_blocks(model: nn.Module) -> list[RepBlock]:
    """The :class:`RepBlock` s of ``model`` (outermost ones, each once), as
    :func:`repq_mm.convert.find_rep_blocks` finds them; foreign blocks are left out."""
    seen, out = set(), []
    for _, m in find_rep_blocks(model):
        if isinstance(m, RepBlock) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def make_variant(name: str, base: nn.Module, qcfg: QConfig, *,
                 mm_model: nn.Module | None = None) -> nn.Module:
    """A training-mode copy of ``base`` converted as the variant ``name`` says
    (``mm_fp_multibranch``: a copy of ``mm_model``)."""
    if name == 'mm_fp_multibranch':
        if mm_model is None:
            raise ValueError("variant 'mm_fp_multibranch' needs mm_model (mmpretrain's RepVGG)")
        return copy.deepcopy(mm_model).train()
    if name not in TRAIN_VARIANTS:
        raise ValueError(f'unknown variant {name!r}; choose from {list(TRAIN_VARIANTS)}')
    m = copy.deepcopy(base).train()
    if name == 'fp_multibranch':
        return m
    if name == 'fp_merged':
        return merge_model(m, inplace=True)
    if name == 'lsq':
        return convert_to_repq(merge_model(m, inplace=True), qcfg=qcfg, inplace=True)
    if name == 'repq_estc8':
        return convert_to_repq(m, qcfg=qcfg.replace(bn_mode='est', est_refresh=8),
                               inplace=True)
    if name == 'repq_estk':
        return convert_to_repq(m, qcfg=qcfg.replace(bn_mode='est', est_stats='kron'),
                               inplace=True)
    mode = 'exact' if name.startswith('repq_bn') else 'est'
    return convert_to_repq(m, qcfg=qcfg.replace(bn_mode=mode),
                           quantize=not name.endswith('noquant'), inplace=True)


def make_inputs(args, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed batch (and class targets) every measurement uses."""
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch_size, args.in_channels if args.model != 'block' else
                    args.channels, args.input_size, args.input_size, generator=g)
    target = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    return x.to(device), target.to(device)
