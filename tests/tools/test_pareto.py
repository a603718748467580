"""``tools/analysis_tools/pareto.py``: weight sizes from the configs (equal to
``model_weight_bytes`` of the built models, smaller at fewer bits), accuracies from
``result.json`` files or numbers, the Pareto front per series, the table / JSON / PNG
written; bad input named."""
from __future__ import annotations

import json
import os.path as osp

import pytest

from helpers import build, load_tool, write_config


@pytest.fixture(scope='module')
def tool():
    pytest.importorskip('mmpretrain')
    pytest.importorskip('matplotlib')
    return load_tool('pareto', 'tools/analysis_tools/pareto.py')


def test_pareto_points_and_front(tool, tmp_path):
    from repq_mm.sensitivity import model_weight_bytes
    data = str(tmp_path / 'data')           # configs are only built, never run
    cfgs = {b: write_config(tmp_path / f'w{b}.py', data, dict(w_bits=b, a_bits=b))
            for b in (8, 4, 2)}
    res = tmp_path / 'result.json'
    res.write_text(json.dumps({'acc': 80.0, 'merged_acc': 81.5}))
    out = tmp_path / 'out'
    args = ['--out-dir', str(out), '--point', 'RepQ', 'W8A8', cfgs[8], '90',
            '--point', 'RepQ', 'W4A4', cfgs[4], str(res),
            '--point', 'RepQ', 'W2A2', cfgs[2], '82',       # smaller and better than W4A4
            '--point', 'LSQ', 'W4A4', cfgs[4], '70']
    assert tool.main(args) == 0
    js = json.loads((out / 'pareto.json').read_text())
    pts = {(p['series'], p['label']): p for p in js['points']}
    from mmengine.config import Config

    from repq_mm.mm.pipeline import build_repq_model
    from repq_mm.sensitivity import quantized_layers
    for b in (8, 4, 2):
        model = build_repq_model(Config.fromfile(cfgs[b]))   # with its data preprocessor
        assert pts[('RepQ', f'W{b}A{b}')]['bytes'] == \
            model_weight_bytes(model.architecture)['total']
    # 8 -> 4 bits: half a byte less per quantized weight element (packed codes)
    elems = [la.elements for la in quantized_layers(build(
        Config.fromfile(cfgs[8]).model).architecture)]
    assert pts[('RepQ', 'W8A8')]['bytes'] - pts[('RepQ', 'W4A4')]['bytes'] == \
        sum(e - (e + 1) // 2 for e in elems)
    assert pts[('RepQ', 'W8A8')]['bytes'] > pts[('RepQ', 'W4A4')]['bytes'] > \
        pts[('RepQ', 'W2A2')]['bytes']
    assert pts[('RepQ', 'W4A4')]['acc'] == 81.5              # merged_acc first
    front = {(js['points'][i]['series'], js['points'][i]['label']) for i in js['front']}
    assert front == {('RepQ', 'W8A8'), ('RepQ', 'W2A2')}
    md = (out / 'pareto.md').read_text()
    assert md.count('\n') == 6 and '| RepQ | W2A2 |' in md
    assert (out / 'pareto.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_pareto_bad_input(tool, tmp_path):
    data = str(tmp_path / 'data')
    cfg = write_config(tmp_path / 'w8.py', data, dict(w_bits=8, a_bits=8))
    with pytest.raises(SystemExit, match='neither a number nor an existing file'):
        tool.main(['--out-dir', str(tmp_path / 'o'), '--point', 'A', 'x', cfg, 'nope.json'])
    bad = tmp_path / 'r.json'
    bad.write_text('{"top1": 3}')
    with pytest.raises(SystemExit, match='no merged_acc / acc'):
        tool.main(['--out-dir', str(tmp_path / 'o'), '--point', 'A', 'x', cfg, str(bad)])
    with pytest.raises(SystemExit, match='does not exist'):
        tool.main(['--out-dir', str(tmp_path / 'o'), '--point', 'A', 'x', 'no.py', '1'])
    assert not osp.exists(tmp_path / 'o')
