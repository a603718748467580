"""Per-layer sensitivity and budgeted mixed precision (``repq_mm.sensitivity``,
``tools/analysis_tools/sensitivity.py``).

* weight-byte accounting against a hand count;
* the budgeted selection: exact on a hand-made example where greedy fails and against brute
  force, budget respected;
* a layer made sensitive on purpose (same float function, per-tensor range blown up) ranks
  first, where it ranked last before;
* the tool end to end on a tiny mmpretrain RepVGG and generated PNGs: ranking computed and
  deterministic, the budgets respected, the written configs build,
  train two iterations through ``tools/train.py``, merge through ``tools/merge_quant.py``,
  and every layer has the chosen bit widths, down to the integer codes of the deploy model.
"""
from __future__ import annotations

import doctest
import itertools
import json
import math
import os
import os.path as osp
import random

import pytest
import torch
from mmengine.model import BaseModel
from torch import nn

import repq_mm.sensitivity as sens
from repq_mm import convert_to_repq
from repq_mm.mm import calibrate_lsq
from repq_mm.rep import RepVGGBlock



def test_doctests():
    res = doctest.testmod(sens)
    assert res.attempted > 0 and res.failed == 0


# --------------------------------------------------------------------------------------
# bytes
# --------------------------------------------------------------------------------------
def test_weight_bytes_hand_count():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), RepVGGBlock(5, 16, stride=2, act=nn.ReLU()),
                        nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10))
    net = convert_to_repq(net, w_bits=4, a_bits=8, per_channel=True, first_bits=8,
                          layer_bits={'5': 3})
    layers = sens.quantized_layers(net)
    assert [(la.name, la.kind, la.elements, la.w_bits) for la in layers] == [
        ('0', 'QConv2d', 5 * 3 * 9, 8), ('1', 'RepVGGBlock', 16 * 5 * 9, 4),
        ('5', 'QLinear', 10 * 16, 3)]
    # codes + float32 (per-channel weight steps + bias + one activation step)
    conv = 135 + 4 * (5 + 5 + 1)                  # 8 bits x 135 elements
    block = 720 // 2 + 4 * (16 + 16 + 1)          # 4 bits x 720 (merged kernel + bias)
    fc = 160 * 3 // 8 + 4 * (10 + 10 + 1)         # 3 bits x 160
    bn = 4 * 16 * 4                               # weight, bias, running mean / var
    got = sens.model_weight_bytes(net)
    assert got['layers'] == {'0': conv, '1': block, '5': fc}
    assert got['other'] == bn and got['total'] == conv + block + fc + bn
    # a bit count that does not fill the last byte: ceil(3 * 135 / 8) = 51
    assert sens.layer_weight_bytes(layers[0], 3) == 51 + 4 * 11
    assert sens.plan_weight_bytes(layers, {'0': 3, '1': 4, '5': 3}, bn) == \
        51 + 4 * 11 + block + fc + bn
    with pytest.raises(KeyError, match='5'):
        sens.plan_weight_bytes(layers, {'0': 3, '1': 4})
    # a rep block left in float (skipped): merged kernel + bias in float32
    skipped = convert_to_repq(nn.Sequential(RepVGGBlock(4, 8), nn.Flatten(), nn.Linear(8, 2)),
                              skip=['0'])
    assert sens.other_bytes(skipped) == 4 * (8 * 4 * 9 + 8)


# --------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------
def _best_brute(costs, values, cap):
    best = (0.0, 0, ())
    for r in range(len(costs) + 1):
        for s in itertools.combinations(range(len(costs)), r):
            c = sum(costs[i] for i in s)
            v = sum(values[i] for i in s)
            if c <= cap and (v > best[0] + 1e-12 or abs(v - best[0]) <= 1e-12 and c < best[1]):
                best = (v, c, s)
    return best


def test_select_by_bytes_exact():
    # greedy by value per byte takes the 40-byte layer first and then nothing fits
    costs, values = [40, 25, 25, 10], [8.0, 4.5, 4.5, 0.1]
    assert sens.select_by_bytes(costs, values, 50) == [1, 2]
    assert sens.select_by_bytes(costs, values, 60) == [1, 2, 3]
    assert sens.select_by_bytes(costs, values, 9) == []
    assert sens.select_by_bytes(costs, [1.0, -2.0, 0.0, 0.5], 1000) == [0, 3]   # <= 0: no
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 9)
        costs = [rng.choice([0, 3, 6, 9, 12, 50]) + rng.randint(0, 4) for _ in range(n)]
        values = [round(rng.uniform(-0.2, 1.0), 3) for _ in range(n)]
        cap = rng.randint(0, sum(costs) + 1)
        got = sens.select_by_bytes(costs, values, cap)
        assert sum(costs[i] for i in got) <= cap
        assert all(values[i] > 0 for i in got)
        best = _best_brute(costs, values, cap)
        assert sum(values[i] for i in got) == pytest.approx(best[0], abs=1e-9)
    for bad in (([1], [1.0], -1), ([-1], [1.0], 5), ([1], [math.nan], 5), ([1, 2], [1.0], 5)):
        with pytest.raises(ValueError):
            sens.select_by_bytes(*bad)
    assert sens.select_top_k([0.3, 0.9, -0.1, 0.9, 0.2], 3) == [0, 1, 3]
    assert sens.select_top_k([0.3, -0.1], 5) == [0]


# --------------------------------------------------------------------------------------
# a layer made sensitive on purpose ranks first
# --------------------------------------------------------------------------------------
def _toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


class _Net(BaseModel):
    """The toy as an mmengine model (what ``calibrate_lsq`` runs)."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, inputs, data_samples=None, mode='tensor'):
        return self.body(inputs)


def _deltas(fp: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Output error (vs the float model) when each layer alone has its weights at 4 bits
    (activations stay at 8), the others at W8A8; per-channel weights, MSE init, PTQ
    calibration with ``calibrate_lsq`` on ``x``."""
    with torch.no_grad():
        ref = fp(x)
    q = _Net(convert_to_repq(fp, w_bits=8, a_bits=8, per_channel=True, init='mse',
                             inplace=False)).eval()

    def calibrate(m):
        calibrate_lsq(m, [dict(inputs=x)], 1)

    calibrate(q)
    low = sens.low_bit_quantizers(q, 4, 8, calibrate)
    assert all(wq.bits == 4 and aq.bits == 8 and wq.is_initialized and aq.is_initialized
               for wq, aq in low.values())
    @torch.no_grad()
    def measure(m):
        return float(((m(x) - ref) ** 2).mean())

    base, rows = sens.layer_sensitivity(q, low, measure)
    assert base >= 0 and [r['name'] for r in rows] == [f'body.{i}' for i in (0, 2, 4, 6, 10)]
    # the model is unchanged afterwards: its own quantizers, at 8 bits
    assert all(la.w_bits == 8 and la.a_bits == 8 for la in sens.quantized_layers(q))
    return {r['name']: r['delta'] for r in rows}


def test_sensitive_layer_ranks_first():
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    fp = _toy().eval()
    before = _deltas(fp, x)
    # the least sensitive conv that has a conv before it
    target = min(('body.2', 'body.4', 'body.6'), key=lambda n: before[n])
    assert max(before, key=before.get) != target
    i = int(target.split('.')[1])
    # scale half the output channels of the conv before it by 30 and divide its matching
    # input channels by 30: ReLU is positively homogeneous, so the float function is the
    # same, but one 4-bit step per output channel cannot serve both halves of its inputs
    # (8 bits can); the conv before has per-channel steps, so its error does not change
    with torch.no_grad():
        fp.get_submodule(str(i - 2)).weight[:4] *= 30
        fp.get_submodule(str(i - 2)).bias[:4] *= 30
        fp.get_submodule(str(i)).weight[:, :4] /= 30
        assert torch.allclose(fp(x), _toy().eval()(x), rtol=1e-4, atol=1e-5)
    after = _deltas(fp, x)
    ranked = sorted(after, key=after.get, reverse=True)
    assert ranked[0] == target, (before, after)
    assert after[target] > 5 * after[ranked[1]]


# --------------------------------------------------------------------------------------
# the tool, end to end (mmpretrain, generated PNGs)
# --------------------------------------------------------------------------------------
from helpers import ARCH, DATA_PREPROCESSOR, load_tool, make_pngs  # noqa: E402,F401
from helpers import write_config as helpers_write_config  # noqa: E402
LAYERS = ['backbone.stem', 'backbone.stage_1.0', 'backbone.stage_2.0', 'backbone.stage_3.0',
          'backbone.stage_4.0', 'head.fc']
REPQ = dict(method='repq', w_bits=4, a_bits=4, per_channel=True, init='mse', first_bits=8)


@pytest.fixture(scope='module')
def tools():
    pytest.importorskip('mmpretrain')
    return dict(sens=load_tool('sens', 'tools/analysis_tools/sensitivity.py'),
                train=load_tool('sens_train', 'tools/train.py'),
                merge=load_tool('sens_merge', 'tools/merge_quant.py'))


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """3 classes of 32x32 PNGs (colour-coded, noisy): 8 per class train, 4 per class val."""
    pytest.importorskip('cv2')
    return make_pngs(tmp_path_factory.mktemp('sens_pngs'), (('train', 8), ('val', 4)))


def write_config(path, data_root, repq):
    """The shared tiny RepVGG classifier config (``helpers.write_config``), its model
    ``dict(type='RepQModel', ...)``: batches of 4 / 6, 2 iterations, one calibration batch."""
    return helpers_write_config(path, data_root, repq, [dict(type='LSQCalibHook', num_batches=1)],
                                max_iters=2, ckpt_interval=2, batch_sizes=(4, 6),
                                weight_decay=0.0)


@pytest.fixture(scope='module')
def fp_checkpoint(tools, data_root, tmp_path_factory):
    """A float classifier trained for 30 SGD steps on the training PNGs."""
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import Runner
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    fp = MODELS.build(dict(ARCH, data_preprocessor=dict(DATA_PREPROCESSOR,
                                                        type='ClsDataPreprocessor')))
    fp.init_weights()
    loader = Runner.build_dataloader(dict(
        batch_size=8, num_workers=0,
        dataset=dict(type='CustomDataset', data_root=osp.join(data_root, 'train'),
                     pipeline=[dict(type='LoadImageFromFile'), dict(type='PackInputs')]),
        sampler=dict(type='DefaultSampler', shuffle=True)), seed=0)
    batches = list(loader)
    opt = torch.optim.SGD(fp.parameters(), lr=0.05, momentum=0.9)
    fp.train()
    for step in range(30):
        loss, _ = fp.parse_losses(fp(**fp.data_preprocessor(batches[step % len(batches)],
                                                            True), mode='loss'))
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = str(tmp_path_factory.mktemp('sens_fp') / 'fp.pth')
    torch.save({'state_dict': fp.state_dict()}, path)
    return path


def _plan(model):
    return {la.name: (la.w_bits, la.a_bits)
            for la in sens.quantized_layers(model.get_submodule('architecture'))}


@pytest.fixture(scope='module')
def analysed(tools, data_root, fp_checkpoint, tmp_path_factory):
    """One run of the tool on a float checkpoint (W3A4 low, 8 high, two budgets)."""
    tmp = tmp_path_factory.mktemp('sens_run')
    cfg = write_config(tmp / 'w4a4.py', data_root, REPQ)
    args = [cfg, fp_checkpoint, '--low-bits', '3', '--low-a-bits', '4', '--num-batches', '2',
            '--budget-like', 'w4a4', '--budget-high-layers', '2']
    assert tools['sens'].main(args + ['--out-dir', str(tmp / 'a')]) == 0
    with open(tmp / 'a' / 'sensitivity.json') as f:
        res = json.load(f)
    return dict(cfg=cfg, args=args, res=res, out=str(tmp / 'a'), tmp=tmp)


def test_tool_ranking(tools, analysed):
    res, out = analysed['res'], analysed['out']
    assert sorted(os.listdir(out)) == ['mixed_top2.py', 'mixed_w4a4-size.py', 'sensitivity.json',
                                       'sensitivity.md', 'sensitivity.png']
    rows = res['layers']
    assert [r['name'] for r in rows] == LAYERS
    assert res['settings']['checkpoint_kind'] == 'float' and res['measure'] == 'loss'
    assert res['data'].startswith('8 samples of the training split, validation pipeline')
    # ranks: by delta, every layer once; delta = loss with the layer low - baseline
    assert sorted(r['rank'] for r in rows) == list(range(1, len(rows) + 1))
    ranked = sorted(rows, key=lambda r: r['rank'])
    assert all(a['delta'] >= b['delta'] for a, b in zip(ranked, ranked[1:]))
    for r in rows:
        assert math.isfinite(r['value'])
        assert r['delta'] == pytest.approx(r['value'] - res['baseline'], abs=1e-12)
    assert any(r['delta'] != 0 for r in rows)
    # first_bits=8 pins the stem; the rest is free
    assert [r['pinned'] for r in rows] == [[8, 8]] + [None] * 5
    with open(osp.join(out, 'sensitivity.md')) as f:
        md = f.read()
    assert md.count('| `backbone.') == 5 and '| `head.fc` |' in md
    with open(osp.join(out, 'sensitivity.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    umask = os.umask(0)
    os.umask(umask)
    assert all(os.stat(osp.join(out, f)).st_mode & 0o777 == 0o666 & ~umask
               for f in os.listdir(out))               # not mkstemp's private mode
    # deterministic: a second run gives the same numbers and choices
    again = str(analysed['tmp'] / 'b')
    assert tools['sens'].main(analysed['args'] + ['--out-dir', again]) == 0
    with open(osp.join(again, 'sensitivity.json')) as f:
        res2 = json.load(f)
    assert [(r['name'], r['value'], r['delta']) for r in res2['layers']] == \
        [(r['name'], r['value'], r['delta']) for r in rows]
    assert res2['baseline'] == res['baseline']
    assert [b['chosen'] for b in res2['budgets']] == [b['chosen'] for b in res['budgets']]


def test_tool_budgets(tools, analysed, data_root, fp_checkpoint):
    from mmengine.config import Config
    res = analysed['res']
    rows = {r['name']: r for r in res['layers']}
    free = [n for n in LAYERS if rows[n]['pinned'] is None]
    like, top = res['budgets']
    assert (like['kind'], like['value'], top['kind'], top['value']) == \
        ('like', 'w4a4', 'high-layers', 2)
    # the budget is the size of the config at uniform W4 (stem pinned at 8), built for real
    tool = tools['sens']
    cfg = Config.fromfile(analysed['cfg'])
    tool.cli.prepare_cfg(cfg)
    w4 = tool.build_model(cfg)
    assert like['budget_bytes'] == \
        sens.model_weight_bytes(w4.get_submodule('architecture'))['total']
    # exact: no subset of the free layers that fits keeps more summed delta
    base = res['sizes']['config_low']
    costs = {n: rows[n]['bytes_high'] - rows[n]['bytes_low'] for n in free}
    best = _best_brute([costs[n] for n in free], [rows[n]['delta'] for n in free],
                       like['budget_bytes'] - base)
    assert sorted(like['chosen']) == sorted(free[i] for i in best[2])
    assert like['bytes'] == base + sum(costs[n] for n in like['chosen']) <= \
        like['budget_bytes']
    assert res['sizes']['config_low'] < like['budget_bytes'] < res['sizes']['config_high']
    positive = sorted((n for n in free if rows[n]['delta'] > 0), key=lambda n: -rows[n]['delta'])
    assert sorted(top['chosen']) == sorted(positive[:2])
    # the written config: inherits the given one, sets the bits, loads the float weights
    with open(top['config']) as f:
        text = f.read()
    assert f"_base_ = [{osp.abspath(analysed['cfg'])!r}]" in text
    assert '\nmodel = dict(\n    repq=dict(' in text and '\nrepq = dict' not in text
    assert top['layer_bits'] == {n: 8 for n in top['chosen']}
    mixed = Config.fromfile(top['config'])
    assert mixed.model.type == 'RepQModel'
    r = mixed.model.repq
    assert r.w_bits == 3 and r.a_bits == 4 and r.first_bits == 8
    assert mixed.model.init_checkpoint == fp_checkpoint
    # --from-json: another budget without measuring again; too small a budget: refused
    out = str(analysed['tmp'] / 'c')
    js = osp.join(analysed['out'], 'sensitivity.json')
    budget = base + min(costs.values())
    assert tool.main(analysed['args'][:8] + ['--budget-bytes', str(budget), '--from-json', js,
                                             '--out-dir', out]) == 0
    with open(osp.join(out, 'sensitivity.json')) as f:
        res3 = json.load(f)
    assert [r['delta'] for r in res3['layers']] == [r['delta'] for r in res['layers']]
    assert res3['budgets'][0]['bytes'] <= budget
    out_bad = str(analysed['tmp'] / 'bad')
    assert tool.main(analysed['args'][:8] + ['--budget-high-layers', '1', '--budget-bytes',
                                             str(base - 1), '--from-json', js,
                                             '--out-dir', out_bad]) == 1
    assert not osp.exists(out_bad)                # nothing written, not even the top-1 config
    assert tool.main(analysed['args'][:8] + ['--high-bits', '8', '--low-bits', '4',
                                             '--from-json', js, '--out-dir', out]) == 1


def test_mixed_config_trains_and_merges(tools, analysed, capsys):
    top = analysed['res']['budgets'][1]
    tmp = analysed['tmp']
    wd = str(tmp / 'wd_mixed')
    runner = tools['train'].main([top['config'], '--work-dir', wd, '--no-pin-memory',
                                  '--no-persistent-workers'])
    assert runner.iter == 2
    expect = {n: (8, 8) if n == 'backbone.stem' or n in top['chosen'] else (3, 4)
              for n in LAYERS}
    assert _plan(runner.model) == expect
    ckpt = osp.join(wd, 'iter_2.pth')
    out = str(tmp / 'deploy_mixed')
    assert tools['merge'].main([top['config'], ckpt, out]) == 0
    ints = torch.load(osp.join(out, 'int_weights.pth'), map_location='cpu',
                      weights_only=True)['layers']
    # deploy names: under `architecture.`; a merged block with an act is Sequential(conv, act)
    names = {n: n[len('architecture.'):] for n in ints}
    names = {n: m[:-2] if m.endswith('.0') and m[:-2] in expect else m for n, m in names.items()}
    got = {names[n]: (r['w_bits'], r['a_bits']) for n, r in ints.items()}
    assert got == expect
    for n, r in ints.items():
        lo = -2 ** (r['w_bits'] - 1)
        assert lo <= int(r['codes'].min()) and int(r['codes'].max()) <= -lo - 1
    # a QAT checkpoint that is not at --high-bits everywhere is refused, naming why
    capsys.readouterr()
    assert tools['sens'].main([top['config'], ckpt, '--num-batches', '1',
                               '--out-dir', str(tmp / 'qat_bad')]) == 1
    assert 'not at --high-bits 8' in capsys.readouterr().err


def test_model_form_and_qat_checkpoint(tools, data_root, fp_checkpoint, tmp_path, capsys):
    from mmengine.config import Config
    cfg = write_config(tmp_path / 'form.py', data_root, dict(REPQ, init_checkpoint=None))
    out = str(tmp_path / 'o')
    assert tools['sens'].main([cfg, fp_checkpoint, '--num-batches', '1',
                               '--budget-high-layers', '1', '--out-dir', out]) == 0
    with open(osp.join(out, 'sensitivity.json')) as f:
        res = json.load(f)
    (b,) = res['budgets']
    with open(b['config']) as f:
        text = f.read()
    assert '\nmodel = dict(\n    repq=dict(' in text
    assert '\nrepq = dict' not in text
    mixed = Config.fromfile(b['config'])
    assert mixed.model.type == 'RepQModel' and mixed.model.repq.w_bits == 4
    assert mixed.model.init_checkpoint == fp_checkpoint
    assert dict(mixed.model.repq.layer_bits) == {n: 8 for n in b['chosen']}
    # a QAT checkpoint at W8A8 everywhere: analysed as trained
    w8 = ['model.repq.w_bits=8', 'model.repq.a_bits=8',
          f'model.init_checkpoint={fp_checkpoint}']
    cfg8 = write_config(tmp_path / 'w8a8.py', data_root, REPQ)
    wd = str(tmp_path / 'wd8')
    tools['train'].main([cfg8, '--work-dir', wd, '--no-pin-memory', '--no-persistent-workers',
                         '--cfg-options'] + w8)
    out8 = str(tmp_path / 'o8')
    # ... measured by the evaluator's metric, calibrated on the validation split
    assert tools['sens'].main([cfg8, osp.join(wd, 'iter_2.pth'), '--num-batches', '1',
                               '--metric', 'metric', '--data', 'val',
                               '--budget-high-layers', '1', '--out-dir', out8,
                               '--cfg-options'] + w8) == 0
    with open(osp.join(out8, 'sensitivity.json')) as f:
        res8 = json.load(f)
    assert res8['settings']['checkpoint_kind'] == 'qat'
    assert res8['measure'] == 'accuracy/top1' and res8['higher_is_better']
    assert 'of the validation split' in res8['data']
    assert [r['name'] for r in res8['layers']] == LAYERS
    for r in res8['layers']:
        assert r['delta'] == pytest.approx(res8['baseline'] - r['value'], abs=1e-9)
        assert 0 <= r['value'] <= 100
    with open(res8['budgets'][0]['config']) as f:    # init_checkpoint from --cfg-options
        assert f'init_checkpoint={fp_checkpoint!r}' in f.read()
    # a float config (no repq) is refused, naming why
    plain = tmp_path / 'fp.py'
    text = open(cfg8).read()
    model_line = next(ln for ln in text.splitlines() if ln.startswith('model = '))
    plain.write_text(text.replace(model_line, f'model = {ARCH!r}'))
    capsys.readouterr()
    assert tools['sens'].main([str(plain), fp_checkpoint, '--out-dir', str(tmp_path / 'x')]) == 1
    assert 'not a quantized config' in capsys.readouterr().err
