#!/usr/bin/env python
"""Per-layer bit-width sensitivity of a RepQ / LSQ / PTQ model and budgeted mixed precision.

    python tools/analysis_tools/sensitivity.py CONFIG CHECKPOINT [--low-bits 4]
        [--low-a-bits A] [--high-bits 8] [--num-batches 8] [--batch-size B]
        [--data train|val] [--metric loss|metric] [--metric-key KEY]
        [--budget-bytes B ...] [--budget-like w4a4 ...] [--budget-high-layers K ...]
        [--out-dir DIR] [--from-json FILE] [--device cpu] [--cfg-options k=v ...]

CONFIG is a quantized config (``model = dict(type='RepQModel', ...)``);
its ``method`` (repq / lsq / ptq), granularity, ``init`` rule, ``first_bits`` /
``last_bits`` / ``layer_bits`` are used, its bit widths are not. CHECKPOINT is either

* a float checkpoint (no LSQ step sizes in it): the model is converted with the config's
  settings, every quantized layer at ``--high-bits`` (weights and activations), and
  calibrated (PTQ, :func:`repq_mm.mm.calibrate_lsq`) on the calibration subset; or
* a QAT checkpoint of CONFIG: the model as trained; every quantized layer must be at
  ``--high-bits`` (e.g. a W8A8 QAT run).

Measured, for every quantized layer (``QConv2d`` / ``QLinear`` / RepQ rep block, in
network order): the change of the measure when that layer alone goes to the low bit width
(weights ``--low-bits``, activations ``--low-a-bits``, default the same), the others kept
at the high one. The low-bit step sizes come from calibrating fresh low-bit quantizers with
the model's own init rule on the calibration subset (:func:`repq_mm.sensitivity.
low_bit_quantizers`), as PTQ at that bit width would. Measures:

* ``--metric loss`` (default): the task loss (the model in ``mode='loss'``, eval mode, the
  sum of its loss terms as mmengine's ``parse_losses`` gives it), averaged over the
  calibration subset weighted by batch size; delta = loss(layer low) - loss(baseline);
* ``--metric metric``: the evaluator's metric (``val_evaluator``, e.g. top-1 or bbox mAP)
  on the whole ``val_dataloader``; delta = metric(baseline) - metric(layer low). Slower.

Calibration subset (deterministic): ``--num-batches`` x ``--batch-size`` (default: the
training batch size) samples drawn with a fixed seed (``--seed``) from the training split
read through the *validation* pipeline (no random augmentation; ``--data train``, default),
or from the validation split (``--data val``). The subset is used for the calibration and
for the loss.

Writes to ``--out-dir`` (default ``work_dirs/sensitivity/<config name>``):

* ``sensitivity.md``: the ranked table (layer, weight elements, weight bytes at low / high,
  baseline measure, measure with the layer low, delta) and the chosen layers per budget;
* ``sensitivity.json``: the same data, the settings and the sizes;
* ``sensitivity.png``: bar chart of the deltas in network order;
* per budget, ``mixed_<budget>.py``: a config inheriting CONFIG (``_base_`` = its absolute
  path) with ``w_bits=--low-bits``, ``a_bits=--low-a-bits`` and ``layer_bits`` = the
  config's own entries plus ``{chosen layer: --high-bits}``; ``first_bits`` / ``last_bits``
  as CONFIG says. With a float CHECKPOINT it also sets ``init_checkpoint`` to it, so
  ``tools/train.py mixed_<budget>.py`` runs the mixed-precision QAT. Each written config is
  built once and checked: every layer has the planned bit widths and the planned bytes.

Budgets (each repeatable; one config per value):

* ``--budget-bytes B``: total weight bytes (``repq_mm.sensitivity`` convention: packed
  codes, float32 step sizes and biases, the rest of the model as stored);
* ``--budget-like w4a4``: the size of the same config at uniform W4 (the config's
  first / last / layer_bits kept), e.g. with ``--low-bits 3`` the mixed W3/W8 model of the
  size of uniform W4A4;
* ``--budget-high-layers K``: at most K layers at the high bit width (the K most
  sensitive).

Layers the config pins (``first_bits``, ``last_bits``, ``layer_bits``) keep their bits and
are not selectable; their bytes count. The byte budget is met exactly (0/1 knapsack on the
deltas, :func:`repq_mm.sensitivity.select_by_bytes`); layers with delta <= 0 stay low.

``--from-json`` reuses the sensitivities of an earlier run (same config, checkpoint, bit
widths and measure) to write configs for other budgets without measuring again.

Example (Fashion-MNIST RepVGG from its float checkpoint: mixed W3A4 / W8A8 at the size of
uniform W4A4 and of uniform W5A5, and with the 4 most sensitive layers at 8 bits)::

    python tools/analysis_tools/sensitivity.py \\
        configs/repvgg_fmnist/repvgg-A0w16_repq-bn_w4a4_fmnist.py \\
        work_dirs/fmnist/seed0/fp/epoch_6.pth --low-bits 3 --low-a-bits 4 \\
        --budget-like w4a4 w5a5 --budget-high-layers 4 --out-dir work_dirs/sens_fmnist
    python tools/train.py work_dirs/sens_fmnist/mixed_w4a4-size.py    # the mixed QAT
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import os.path as osp
import re
import sys
import textwrap

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import DATASETS, init_default_scope  # noqa: E402

from repq_mm import sensitivity as sens  # noqa: E402
from repq_mm.mm import calibrate_lsq, check_repq_cfg, cli  # noqa: E402
from repq_mm.mm.checkpoint import load_weights, safe_load, state_dict_of  # noqa: E402
from repq_mm.io import atomic_path  # noqa: E402
from repq_mm.mm.config import is_repq_model  # noqa: E402
from repq_mm.mm.pipeline import build_repq_model, is_repq_config, repq_settings  # noqa: E402

ROOT_NAME = 'architecture'          # RepQModel's converted module: layer_bits names live here


class SensitivityError(RuntimeError):
    """Bad input or a result that must not be written (message names the problem)."""


# --------------------------------------------------------------------------------------
# the config form (the only place that knows it)
# --------------------------------------------------------------------------------------
def repq_section(cfg) -> tuple[dict, dict, str | None]:
    """``(model_cfg, repq, init_checkpoint)`` of a config already passed through
    ``cli.prepare_cfg``. ``repq`` is a plain dict without ``init_checkpoint``."""
    if not is_repq_config(cfg):
        raise SensitivityError(
            "CONFIG is not a quantized config: give one whose model is "
            "dict(type='RepQModel', ...) (e.g. configs/repvgg_fmnist/"
            'repvgg-A0w16_repq-bn_w4a4_fmnist.py); its method and first/last/layer_bits are '
            'used, the bit widths come from --low-bits / --high-bits')
    model = cfg.model
    raw = model.get('repq', None) or {}
    repq = repq_settings(cfg)
    init = raw.get('init_checkpoint', None) or model.get('init_checkpoint', None)
    return model, repq, init


def bits_override(raw_cfg, w_bits: int, a_bits: int, layer_bits: dict,
                  init_checkpoint: str | None) -> str:
    """The lines a config inheriting ``raw_cfg`` (the file as written, before
    ``prepare_cfg``; its model ``dict(type='RepQModel', architecture=..., repq=dict(...),
    init_checkpoint=...)``) needs to set these bits: ``model = dict(repq=dict(w_bits=...,
    a_bits=..., layer_bits=...), init_checkpoint=...)``. mmengine merges these dicts into
    the inherited ones (other keys stay as inherited); ``layer_bits`` is written in full
    (the config's entries first). ``init_checkpoint`` ``None``: not written (inherited).
    """
    lb = '{\n' + ''.join(f'        {k!r}: {v!r},\n' for k, v in layer_bits.items()) + '    }'
    model = raw_cfg.get('model', None) or {}
    if not is_repq_model(model):
        raise SensitivityError("CONFIG's model is not dict(type='RepQModel', ...): cannot "
                               'write a config inheriting it')
    text = (f'model = dict(\n    repq=dict(w_bits={w_bits!r}, a_bits={a_bits!r}, '
            f'layer_bits={lb}),\n')
    if init_checkpoint is not None:
        text += f'    init_checkpoint={init_checkpoint!r},\n'
    return text + ')\n'


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------
def build_model(cfg, overrides: dict | None = None, init_checkpoint: str | None = None):
    """The ``RepQModel`` of ``cfg`` with its ``repq`` updated by ``overrides``."""
    return build_repq_model(cfg, overrides, SensitivityError, init_checkpoint)


def checkpoint_kind(path: str) -> str:
    """``'qat'`` when the checkpoint holds LSQ step sizes, else ``'float'``."""
    try:
        sd = state_dict_of(safe_load(path))
    except Exception as e:  # noqa: BLE001 - named below
        raise SensitivityError(f'cannot read checkpoint {path}: {type(e).__name__}: '
                               f'{str(e)[:300]}') from None
    return 'qat' if any(k.endswith(('w_quant.step', 'a_quant.step')) for k in sd) else 'float'


def bit_plan(model) -> dict[str, tuple[int, int | None]]:
    return {layer.name: (layer.w_bits, layer.a_bits)
            for layer in sens.quantized_layers(model.get_submodule(ROOT_NAME))}


# --------------------------------------------------------------------------------------
# data and measures
# --------------------------------------------------------------------------------------
def _unwrap_dataset(ds_cfg):
    """The innermost dataset config of wrappers (``dataset=dict(...)`` inside)."""
    while isinstance(ds_cfg, dict) and 'dataset' in ds_cfg:
        ds_cfg = ds_cfg['dataset']
    if not isinstance(ds_cfg, dict) or 'type' not in ds_cfg:
        raise SensitivityError(f'cannot read the dataset config {ds_cfg!r} (concatenated '
                               'datasets are not supported: give one dataset)')
    return ds_cfg


def calibration_loader(cfg, data: str, num_batches: int, batch_size: int | None, seed: int):
    """A loader over a fixed random subset (seed ``seed``) of ``num_batches * batch_size``
    samples: the training split through the validation pipeline (``data='train'``) or the
    validation split (``'val'``). Returns ``(loader, description)``."""
    from mmengine.runner import Runner
    val = cfg.get('val_dataloader', None) or cfg.get('test_dataloader', None)
    if data == 'train':
        dl = cfg.get('train_dataloader', None)
        if not dl or not val:
            raise SensitivityError('--data train needs train_dataloader and val_dataloader '
                                   '(for its pipeline) in the config')
        dl = copy.deepcopy(dl)
        ds = _unwrap_dataset(dl['dataset'])
        ds['pipeline'] = copy.deepcopy(_unwrap_dataset(val['dataset'])['pipeline'])
        what = 'training split, validation pipeline'
    else:
        if not val:
            raise SensitivityError('--data val needs val_dataloader in the config')
        dl = copy.deepcopy(val)
        ds = _unwrap_dataset(dl['dataset'])
        what = 'validation split'
    bs = batch_size or dl.get('batch_size', 1)
    dataset = DATASETS.build(ds)
    if hasattr(dataset, 'full_init'):
        dataset.full_init()
    n = min(len(dataset), num_batches * bs)
    if n == 0:
        raise SensitivityError(f'the {what} dataset is empty')
    gen = torch.Generator().manual_seed(seed)
    idx = sorted(torch.randperm(len(dataset), generator=gen)[:n].tolist())
    loader = Runner.build_dataloader(dict(
        batch_size=bs, num_workers=0, persistent_workers=False,
        dataset=torch.utils.data.Subset(dataset, idx),
        sampler=dict(type='DefaultSampler', shuffle=False),
        collate_fn=copy.deepcopy(dl.get('collate_fn', None) or dict(type='pseudo_collate'))),
        seed=seed)
    desc = (f'{n} samples of the {what} ({len(dataset)} in all; random subset, seed {seed}), '
            f'batches of {bs}')
    return loader, desc


class LossMeasure:
    """Mean task loss over fixed batches (preprocessed once, ``training=False``)."""

    higher_is_better = False
    name = 'loss'

    def __init__(self, model, loader):
        with torch.no_grad():
            self.batches = [model.data_preprocessor(b, False) for b in loader]

    @torch.no_grad()
    def __call__(self, model) -> float:
        model.eval()
        total, count = 0.0, 0
        for data in self.batches:
            losses = model(**data, mode='loss')
            loss, _ = model.parse_losses(losses)
            n = len(data['data_samples']) if data.get('data_samples') is not None else \
                int(data['inputs'].shape[0])
            total += float(loss) * n
            count += n
        value = total / count
        if not math.isfinite(value):
            raise SensitivityError(f'the loss is not finite ({value})')
        return value


class MetricMeasure:
    """The ``val_evaluator`` metric ``key`` (default: its first) on the ``val_dataloader``."""

    higher_is_better = True

    def __init__(self, cfg, key: str | None):
        from mmengine.evaluator import Evaluator
        from mmengine.runner import Runner
        if not cfg.get('val_dataloader', None) or not cfg.get('val_evaluator', None):
            raise SensitivityError('--metric metric needs val_dataloader and val_evaluator')
        dl = copy.deepcopy(cfg.val_dataloader)
        dl['persistent_workers'] = False
        self.loader = Runner.build_dataloader(dl, seed=0)
        self.evaluator = Evaluator(copy.deepcopy(cfg.val_evaluator))
        if hasattr(self.loader.dataset, 'metainfo'):
            self.evaluator.dataset_meta = self.loader.dataset.metainfo
        self.key = key
        self.name = key or 'metric'

    @torch.no_grad()
    def __call__(self, model) -> float:
        model.eval()
        for batch in self.loader:
            outputs = model.val_step(batch)
            self.evaluator.process(data_samples=outputs, data_batch=batch)
        metrics = self.evaluator.evaluate(len(self.loader.dataset))
        if self.key is None:
            self.key = self.name = next(iter(metrics))
        if self.key not in metrics:
            raise SensitivityError(f'--metric-key {self.key!r} is not among the metrics '
                                   f'{sorted(metrics)}')
        return float(metrics[self.key])


# --------------------------------------------------------------------------------------
# budgets
# --------------------------------------------------------------------------------------
def parse_like(text: str) -> int:
    m = re.fullmatch(r'[wW]([2-8])(?:[aA][2-8])?', text)
    if not m:
        raise SensitivityError(f'--budget-like takes e.g. w4a4 or w4 (weight bits 2..8), got '
                               f'{text!r}')
    return int(m.group(1))


def plan_for(layers, pinned: dict, chosen: set, low_w: int, low_a: int, high: int) -> dict:
    """``{name: (w_bits, a_bits)}``: pinned as pinned, chosen high, the rest low."""
    out = {}
    for layer in layers:
        if layer.name in pinned:
            out[layer.name] = pinned[layer.name]
        elif layer.name in chosen:
            out[layer.name] = (high, high)
        else:
            out[layer.name] = (low_w, low_a)
    return out


def plan_bytes(layers, plan: dict, other: int) -> int:
    return sens.plan_weight_bytes(layers, {n: b[0] for n, b in plan.items()}, other)


def choose(kind: str, value, layers, pinned: dict, deltas: dict, low_w: int, low_a: int,
           high: int, other: int) -> dict:
    """One budget: which free (not pinned) layers go to ``high``. Returns a JSON-ready
    record (``tag``, ``chosen``, ``bytes``, ``budget_bytes`` ...)."""
    free = [layer for layer in layers if layer.name not in pinned]
    base = plan_bytes(layers, plan_for(layers, pinned, set(), low_w, low_a, high), other)
    costs = [sens.layer_weight_bytes(f, high) - sens.layer_weight_bytes(f, low_w)
             for f in free]
    vals = [deltas[f.name] for f in free]
    rec = dict(kind=kind, value=value)
    if kind == 'high-layers':
        idx = sens.select_top_k(vals, value)
        rec['tag'] = f'top{value}'
    else:
        if kind == 'like':
            bits = parse_like(value)
            budget = plan_bytes(layers, plan_for(layers, pinned, set(), bits, bits, high),
                                other)
            rec['tag'] = f'{value.lower()}-size'
        else:
            budget = int(value)
            rec['tag'] = f'{budget}B'
        rec['budget_bytes'] = budget
        if budget < base:
            raise SensitivityError(
                f'budget {kind} {value} ({budget} bytes) is below the size with every free '
                f'layer at {low_w} bits ({base} bytes): nothing fits; raise the budget or '
                'lower --low-bits')
        idx = sens.select_by_bytes(costs, vals, budget - base)
    taken = set(idx)
    rec.update(chosen=[free[i].name for i in idx],
               bytes=base + sum(costs[i] for i in idx),
               sensitivity_kept=sum(vals[i] for i in idx),
               sensitivity_low=sum(v for i, v in enumerate(vals) if i not in taken))
    return rec


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------
def _atomic_write(path: str, text: str) -> None:
    """Write ``path`` all or nothing (:func:`repq_mm.io.atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        f.write(text)


def write_mixed_config(path, raw_cfg, config_path, rec, base_layer_bits, low_w, low_a, high,
                       init_checkpoint, header: str) -> str:
    layer_bits = {**base_layer_bits, **{n: high for n in rec['chosen']}}
    body = bits_override(raw_cfg, low_w, low_a, layer_bits, init_checkpoint)
    text = header + f'_base_ = [{osp.abspath(config_path)!r}]\n' + body
    _atomic_write(path, text)
    rec.update(config=path, layer_bits=layer_bits)
    return text


def verify_mixed_config(path: str, expect_plan: dict, expect_bytes: int) -> None:
    """Build ``path`` the way our tools do and check its bits and bytes."""
    cfg = Config.fromfile(path)
    cli.prepare_cfg(cfg)
    repq_section(cfg)
    model = build_model(cfg)
    got = bit_plan(model)
    wrong = {n: (got.get(n), b) for n, b in expect_plan.items() if got.get(n) != b}
    if wrong or set(got) != set(expect_plan):
        raise SensitivityError(f'{path} builds other bit widths than planned '
                               f'(got, planned): {dict(list(wrong.items())[:5])}')
    size = sens.model_weight_bytes(model.get_submodule(ROOT_NAME))['total']
    if size != expect_bytes:
        raise SensitivityError(f'{path} builds a model of {size} bytes, planned {expect_bytes}')


def markdown(res: dict) -> str:
    s = res['settings']
    better = 'higher is better' if res['higher_is_better'] else 'lower is better'
    lines = [f'# Per-layer sensitivity: {osp.basename(s["config"])}', '',
             f'- config: `{s["config"]}`', f'- checkpoint: `{s["checkpoint"]}` '
             f'({s["checkpoint_kind"]})',
             f'- measure: {res["measure"]} ({better}); '
             f'delta = degradation when the layer alone goes to W{s["low_w_bits"]}A'
             f'{s["low_a_bits"]}, every other layer at W{s["high_bits"]}A{s["high_bits"]}',
             f'- data: {res["data"]}', f'- baseline (all at {s["high_bits"]} bits): '
             f'{res["baseline"]:.6g}', '',
             '| rank | layer | type | weights | bytes @W{} | bytes @W{} | with layer low | delta '
             '| pinned |'.format(s['low_w_bits'], s['high_bits']),
             '|---:|---|---|---:|---:|---:|---:|---:|---|']
    for r in sorted(res['layers'], key=lambda r: r['rank']):
        pin = '' if r['pinned'] is None else f'W{r["pinned"][0]}A{r["pinned"][1]}'
        lines.append(f'| {r["rank"]} | `{r["name"]}` | {r["kind"]} | {r["elements"]} | '
                     f'{r["bytes_low"]} | {r["bytes_high"]} | {r["value"]:.6g} | '
                     f'{r["delta"]:+.4g} | {pin} |')
    z = res['sizes']
    lines += ['', '## Weight bytes', '',
              f'- every layer at W{s["low_w_bits"]}: {z["all_low"]}; every layer at '
              f'W{s["high_bits"]}: {z["all_high"]}',
              f'- the config at uniform W{s["low_w_bits"]} (pinned layers as pinned): '
              f'{z["config_low"]}; at uniform W{s["high_bits"]}: {z["config_high"]}',
              f'- not quantized (as stored): {z["other"]}']
    for b in res['budgets']:
        lines += ['', f'## Budget {b["kind"]} {b["value"]}' + (
            f' = {b["budget_bytes"]} bytes' if 'budget_bytes' in b else ''), '',
            f'- kept at {s["high_bits"]} bits: ' + (', '.join(f'`{n}`' for n in b['chosen'])
                                                    or 'none'),
            f'- weight bytes: {b["bytes"]} (uniform W{s["low_w_bits"]}: {z["config_low"]}, '
            f'uniform W{s["high_bits"]}: {z["config_high"]})',
            f'- summed delta kept high {b["sensitivity_kept"]:.4g}, left low '
            f'{b["sensitivity_low"]:.4g}',
            f'- config: `{b["config"]}`', '', '```python',
            f'w_bits={s["low_w_bits"]}, a_bits={s["low_a_bits"]}, '
            f'layer_bits={json.dumps(b["layer_bits"], indent=4)}', '```']
    return '\n'.join(lines) + '\n'


def bar_chart(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    layers = res['layers']
    chosen = set(res['budgets'][0]['chosen']) if res['budgets'] else set()
    colors = ['#7f7f7f' if r['pinned'] is not None else
              '#d62728' if r['name'] in chosen else '#1f77b4' for r in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2), 4.5))
    ax.bar(range(len(layers)), [r['delta'] for r in layers], color=colors)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([r['name'] for r in layers], rotation=90, fontsize=7)
    ax.axhline(0, color='black', linewidth=0.6)
    s = res['settings']
    what = ('increase of the ' + res['measure']) if not res['higher_is_better'] else \
        ('drop of ' + res['measure'])
    ax.set_ylabel(what)
    title = (f'{osp.basename(s["config"])}: layer alone at W{s["low_w_bits"]}A'
             f'{s["low_a_bits"]}, others W{s["high_bits"]}A{s["high_bits"]}')
    ax.set_title(title, fontsize=9)
    from matplotlib.patches import Patch
    handles = [Patch(color='#1f77b4', label='free')]
    if chosen:
        b = res['budgets'][0]
        handles.append(Patch(color='#d62728', label=f'kept high ({b["kind"]} {b["value"]})'))
    if any(r['pinned'] is not None for r in layers):
        handles.append(Patch(color='#7f7f7f', label='pinned by the config'))
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format='png')
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Per-layer bit-width sensitivity and budgeted '
                                'mixed precision (layer_bits) for a RepQ config')
    p.add_argument('config', help='a quantized config (repq dict or RepQModel)')
    p.add_argument('checkpoint', help='float checkpoint, or a QAT checkpoint of CONFIG at '
                   '--high-bits')
    p.add_argument('--low-bits', type=int, default=4, help='weight bits of a layer set low')
    p.add_argument('--low-a-bits', type=int, default=None,
                   help='activation bits of a layer set low (default: --low-bits)')
    p.add_argument('--high-bits', type=int, default=8,
                   help='weight and activation bits of the other layers / the chosen ones')
    p.add_argument('--num-batches', type=int, default=8,
                   help='calibration / loss batches')
    p.add_argument('--batch-size', type=int, default=None,
                   help='batch size of the subset (default: the data split\'s)')
    p.add_argument('--data', choices=['train', 'val'], default='train',
                   help='calibration subset: training split through the validation pipeline '
                   '(default) or the validation split')
    p.add_argument('--seed', type=int, default=0, help='seed of the subset draw')
    p.add_argument('--metric', choices=['loss', 'metric'], default='loss',
                   help='task loss on the subset, or the val_evaluator metric on the '
                   'val_dataloader')
    p.add_argument('--metric-key', default=None,
                   help='which metric with --metric metric (default: the first returned)')
    p.add_argument('--budget-bytes', type=int, nargs='+', default=[],
                   help='total weight bytes (one config per value)')
    p.add_argument('--budget-like', nargs='+', default=[],
                   help='the size of the config at uniform weight bits, e.g. w4a4')
    p.add_argument('--budget-high-layers', type=int, nargs='+', default=[],
                   help='at most K layers at --high-bits')
    p.add_argument('--out-dir', default=None, help='output folder')
    p.add_argument('--from-json', default=None,
                   help='reuse the sensitivities of an earlier sensitivity.json')
    p.add_argument('--device', default='cpu', help="torch device, e.g. 'cuda'")
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override settings of CONFIG (xxx=yyy), e.g. '
                   'train_dataloader.dataset.indices=2000')
    return p.parse_args(argv)


def _check_args(args) -> tuple[int, int, int]:
    low_w, high = args.low_bits, args.high_bits
    low_a = low_w if args.low_a_bits is None else args.low_a_bits
    for name, b in (('--low-bits', low_w), ('--low-a-bits', low_a), ('--high-bits', high)):
        if not 2 <= b <= 8:
            raise SensitivityError(f'{name} must be in 2..8, got {b}')
    if low_w >= high or low_a > high:
        raise SensitivityError(f'--low-bits ({low_w}) must be below and --low-a-bits '
                               f'({low_a}) at most --high-bits ({high})')
    if args.num_batches < 1:
        raise SensitivityError('--num-batches must be >= 1')
    if args.batch_size is not None and args.batch_size < 1:
        raise SensitivityError('--batch-size must be >= 1')
    for k in args.budget_high_layers:
        if k < 0:
            raise SensitivityError(f'--budget-high-layers must be >= 0, got {k}')
    for v in args.budget_like:
        parse_like(v)
    return low_w, low_a, high


def run(args) -> dict:
    """Everything ``main`` does; returns the result dict (also written as JSON)."""
    low_w, low_a, high = _check_args(args)
    config = osp.abspath(args.config)
    checkpoint = osp.abspath(args.checkpoint)
    if not osp.isfile(checkpoint):
        raise SensitivityError(f'checkpoint {checkpoint} does not exist')
    raw_cfg = Config.fromfile(config)
    cfg = Config.fromfile(config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cli.prepare_cfg(cfg)
    cli.fix_dataloader_workers(cfg)
    _, repq, cfg_init = repq_section(cfg)
    checked = check_repq_cfg(repq)
    if checked['method'] == 'fp' or checked['deploy']:
        raise SensitivityError(f"CONFIG has repq.method={checked['method']!r}, "
                               f"deploy={checked['deploy']}: give the QAT / PTQ config")
    init_default_scope(cfg.get('default_scope', None) or 'mmpretrain')
    kind = checkpoint_kind(checkpoint)
    out_dir = osp.abspath(args.out_dir or osp.join(
        'work_dirs', 'sensitivity', osp.splitext(osp.basename(config))[0]))
    settings = dict(config=config, checkpoint=checkpoint, checkpoint_kind=kind,
                    low_w_bits=low_w, low_a_bits=low_a, high_bits=high, metric=args.metric,
                    metric_key=args.metric_key, data=args.data, num_batches=args.num_batches,
                    batch_size=args.batch_size, seed=args.seed,
                    cfg_options=args.cfg_options and {k: str(v) for k, v in
                                                      args.cfg_options.items()})

    # which layers the config pins (first/last/layer_bits): bits equal at low and at high
    plan_low = bit_plan(build_model(cfg, dict(w_bits=low_w, a_bits=low_a)))
    plan_high = bit_plan(build_model(cfg, dict(w_bits=high, a_bits=high)))
    pinned = {n: b for n, b in plan_low.items() if plan_high[n][0] == b[0]}

    if args.from_json:
        with open(args.from_json) as f:
            old = json.load(f)
        keys = ('config', 'checkpoint', 'low_w_bits', 'low_a_bits', 'high_bits', 'metric',
                'metric_key', 'data', 'num_batches', 'batch_size', 'seed')
        diff = {k: (old['settings'].get(k), settings[k]) for k in keys
                if old['settings'].get(k) != settings[k]}
        if diff:
            raise SensitivityError(f'--from-json {args.from_json} was measured with other '
                                   f'settings (json, now): {diff}')
        if [r['name'] for r in old['layers']] != list(plan_low):
            raise SensitivityError(f'--from-json {args.from_json}: its layers are not those '
                                   'of the model CONFIG builds')
        baseline, rows = old['baseline'], [dict(name=r['name'], value=r['value'],
                                                delta=r['delta']) for r in old['layers']]
        measure_name, hib, data_desc = old['measure'], old['higher_is_better'], old['data']
        struct = build_model(cfg, dict(w_bits=high, a_bits=high, first_bits=None,
                                       last_bits=None, layer_bits=None))
    else:
        device = torch.device(args.device)
        loader, data_desc = calibration_loader(cfg, args.data, args.num_batches,
                                               args.batch_size, args.seed)
        if kind == 'float':
            model = build_model(cfg,
                                dict(w_bits=high, a_bits=high, first_bits=None,
                                     last_bits=None, layer_bits=None), checkpoint)
            model.to(device)
            calibrate_lsq(model, loader, args.num_batches)
        else:
            model = build_model(cfg)
            load_weights(model, checkpoint, SensitivityError)
            model.to(device)
            off = {n: b for n, b in bit_plan(model).items() if b[0] != high or
                   b[1] not in (None, high)}
            if off:
                raise SensitivityError(
                    f'the QAT checkpoint\'s model has layers not at --high-bits {high}: '
                    f'{dict(list(off.items())[:5])} ({len(off)} in all); give a checkpoint '
                    f'trained at W{high}A{high} everywhere, or a float checkpoint')
        struct = model
        low = sens.low_bit_quantizers(
            model, low_w, low_a, lambda m: calibrate_lsq(m, loader, args.num_batches),
            root=ROOT_NAME)
        measure = LossMeasure(model, loader) if args.metric == 'loss' else \
            MetricMeasure(cfg, args.metric_key)
        baseline, rows = sens.layer_sensitivity(
            model, low, measure, measure.higher_is_better, root=ROOT_NAME,
            log=lambda s: print(f'sensitivity: {s}', flush=True))
        measure_name, hib = measure.name, measure.higher_is_better
        if args.metric == 'metric':
            data_desc += '; metric on the whole val_dataloader'

    layers = sens.quantized_layers(struct.get_submodule(ROOT_NAME))
    if [layer.name for layer in layers] != list(plan_low):
        raise SensitivityError('the analysed model and the config have different layers: '
                               f'{[la.name for la in layers][:5]} vs {list(plan_low)[:5]}')
    other = sens.other_bytes(struct.get_submodule(ROOT_NAME))
    deltas = {r['name']: r['delta'] for r in rows}
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]['delta'], i))
    rank = {rows[i]['name']: k + 1 for k, i in enumerate(order)}
    table = []
    for layer, r in zip(layers, rows):
        table.append(dict(layer.to_dict(), **r, rank=rank[layer.name],
                          bytes_low=sens.layer_weight_bytes(layer, low_w),
                          bytes_high=sens.layer_weight_bytes(layer, high),
                          pinned=list(pinned[layer.name]) if layer.name in pinned else None))
    sizes = dict(
        all_low=sens.plan_weight_bytes(layers, {la.name: low_w for la in layers}, other),
        all_high=sens.plan_weight_bytes(layers, {la.name: high for la in layers}, other),
        config_low=plan_bytes(layers, plan_low, other),
        config_high=plan_bytes(layers, plan_high, other), other=other)

    budgets = [('bytes', b) for b in args.budget_bytes] + \
        [('like', v) for v in args.budget_like] + \
        [('high-layers', k) for k in args.budget_high_layers]
    base_layer_bits = dict(checked['layer_bits'] or {})
    init_for_mixed = checkpoint if kind == 'float' else cfg_init
    # every budget is checked before anything is written
    records = [choose(kind_b, value, layers, pinned, deltas, low_w, low_a, high, other)
               for kind_b, value in budgets]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    try:
        for rec in records:
            path = osp.join(out_dir, f'mixed_{rec["tag"]}.py')
            about = (f'Mixed precision chosen by tools/analysis_tools/sensitivity.py from '
                     f'{checkpoint} ({kind}): budget {rec["kind"]} {rec["value"]}; measure '
                     f'{measure_name} on {data_desc}. W{low_w}A{low_a} everywhere except the '
                     f'pinned layers and {len(rec["chosen"])} kept at W{high}A{high}; weight '
                     f'bytes {rec["bytes"]} (uniform W{low_w}: {sizes["config_low"]}, uniform '
                     f'W{high}: {sizes["config_high"]}).')
            header = ''.join(f'# {line}\n' for line in textwrap.wrap(about, 96,
                                                                      break_long_words=False))
            write_mixed_config(path, raw_cfg, config, rec, base_layer_bits, low_w, low_a,
                               high, init_for_mixed, header)
            written.append(path)
            verify_mixed_config(path, plan_for(layers, pinned, set(rec['chosen']), low_w,
                                               low_a, high), rec['bytes'])
    except BaseException:
        for path in written:          # nothing half-written: no config without its check
            if osp.exists(path):
                os.remove(path)
        raise

    res = dict(settings=settings, measure=measure_name, higher_is_better=hib,
               data=data_desc, baseline=baseline, layers=table, sizes=sizes,
               budgets=records)
    _atomic_write(osp.join(out_dir, 'sensitivity.json'), json.dumps(res, indent=1) + '\n')
    _atomic_write(osp.join(out_dir, 'sensitivity.md'), markdown(res))
    bar_chart(res, osp.join(out_dir, 'sensitivity.png'))
    res['out_dir'] = out_dir
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        res = run(args)
    except (SensitivityError, KeyError, ValueError) as e:
        print(f'sensitivity: error: {e}', file=sys.stderr)
        return 1
    s = res['settings']
    print(f'sensitivity: baseline {res["measure"]} {res["baseline"]:.6g}; most sensitive at '
          f'W{s["low_w_bits"]}A{s["low_a_bits"]}:')
    for r in sorted(res['layers'], key=lambda r: r['rank'])[:5]:
        print(f'  {r["rank"]:3d}. {r["name"]}: delta {r["delta"]:+.4g}')
    for b in res['budgets']:
        print(f'budget {b["kind"]} {b["value"]}: {len(b["chosen"])} layer(s) at '
              f'{s["high_bits"]} bits, {b["bytes"]} bytes (uniform W{s["low_w_bits"]}: '
              f'{res["sizes"]["config_low"]}, uniform W{s["high_bits"]}: '
              f'{res["sizes"]["config_high"]}); wrote {b["config"]}')
        print(f'  w_bits={s["low_w_bits"]}, a_bits={s["low_a_bits"]}, '
              f'layer_bits={b["layer_bits"]!r}')
    print(f'wrote {res["out_dir"]}/sensitivity.md, sensitivity.json, sensitivity.png')
    return 0


if __name__ == '__main__':
    sys.exit(main())
