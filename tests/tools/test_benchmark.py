"""Smoke test of tools/analysis_tools/benchmark.py (the ``bench`` package next to it) and the
pure-torch RepVGGNet.

Tiny sizes (a width-reduced RepVGGNet or one block, input 8-16, batch 2, 1 warm-up, 2
repeats, 1 thread): checks that the Markdown and JSON outputs name every variant with finite
positive times, that ``--compile`` adds compiled rows (backend ``aot_eager``: dynamo's graph
capture and AOTAutograd's forward / backward split without inductor's C++ compile, which
tests/rep/test_compile.py covers) with compile times and the target ratios, and that
RepVGGNet's train form and its deployed form agree in eval mode.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT as HELPERS_ROOT

from repq_mm.models import RepVGGNet
from repq_mm.rep import RepVGGBlock

ROOT = Path(HELPERS_ROOT)
TINY = ['--model', 'A0', '--width-multiplier', '0.125,0.25', '--num-blocks', '1,2,1,1',
        '--num-classes', '10', '--input-size', '16', '--batch-size', '2', '--warmup', '1',
        '--repeats', '2', '--threads', '1', '--quiet']


def _tool():
    spec = importlib.util.spec_from_file_location(
        'repq_benchmark', ROOT / 'tools' / 'analysis_tools' / 'benchmark.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loss_fn_bounded_for_detector_outputs():
    """The benchmark's loss: cross entropy for logits; for detector outputs the smooth-L1
    distance to zero, finite with a gradient bounded by 1 / numel however large the outputs
    (the repeated steps on one batch must not diverge)."""
    tool = _tool()
    outs = (torch.full((2, 4, 5, 5), 1e4, requires_grad=True),
            torch.randn(2, 3, 7, 7, requires_grad=True))
    loss = tool.loss_fn(outs, torch.zeros(2, dtype=torch.long))
    loss.backward()
    assert torch.isfinite(loss)
    assert outs[0].grad.abs().max().item() == pytest.approx(1 / outs[0].numel())
    logits, target = torch.randn(2, 10), torch.tensor([1, 3])
    assert torch.equal(tool.loss_fn(logits, target),
                       torch.nn.functional.cross_entropy(logits, target))


def _check_stats(rec):
    for k in ('median', 'q1', 'q3', 'min', 'max'):
        assert math.isfinite(rec[k]) and rec[k] > 0, (k, rec)
    assert rec['min'] <= rec['q1'] <= rec['median'] <= rec['q3'] <= rec['max']


def test_benchmark_main_outputs(tmp_path):
    tool = _tool()
    threads = torch.get_num_threads()
    try:
        res = tool.main(TINY + ['--out-dir', str(tmp_path), '--memory', 'off', '--profile',
                                '--profile-variant', 'repq_est'])
    finally:
        torch.set_num_threads(threads)
    md = (tmp_path / 'results.md').read_text()
    js = json.loads((tmp_path / 'results.json').read_text())
    assert js['meta']['command'] and js['meta']['torch'] == torch.__version__
    assert js['meta']['torch_threads'] == 1
    for v in tool.DEFAULT_TRAIN:
        assert f'`{v}`' in md
        _check_stats(js['train'][v])
        assert len(js['train'][v]['samples']) == 2
        assert math.isfinite(js['train'][v]['final_loss'])
    for v in ('fp_train_form', 'fp_deploy', 'repq_eval', 'q_deploy'):
        assert f'`{v}`' in md
        _check_stats(js['infer'][v])
        assert js['infer'][v]['throughput'] > 0
    assert js['infer']['fp_deploy']['max_rel_err_vs_train_form'] < 1e-4
    for v in ('to_deploy_fp', 'merge_model_fp', 'to_deploy_repq'):
        assert f'`{v}`' in md
        _check_stats(js['merge'][v])
    att = js['profile']['repq_est']
    assert att['wall_ms'] > 0 and att['categories_ms']
    assert any(it['ctx'] == 'lsq::act' for it in att['items'])
    # the network conv's backward is the conv's, not the weight quantizer's that ran just
    # before it (a view at the end of Q_w shares the conv node's sequence number)
    conv_bwd = [it for it in att['items'] if it['op'] == 'ConvolutionBackward0']
    assert conv_bwd and all(it['category'] == 'conv (network)' for it in conv_bwd), conv_bwd
    assert (tmp_path / 'profile_repq_est.txt').exists()
    assert res['train'].keys() == js['train'].keys()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / 'results.png').stat().st_size > 0


def test_benchmark_block_model(tmp_path):
    tool = _tool()
    threads = torch.get_num_threads()
    try:
        res = tool.main(['--model', 'block', '--channels', '8', '--input-size', '16',
                         '--batch-size', '2', '--warmup', '1', '--repeats', '2', '--threads',
                         '1', '--skip-merge', '--skip-infer', '--quiet',
                         '--variants', 'repq_est_noquant', '--out-dir', str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert list(res['train']) == ['repq_est_noquant']
    for rec in res['train'].values():
        _check_stats(rec)
        # peak-RSS delta of one step, measured in a subprocess per variant
        mem = rec.get('mem')
        assert mem is not None and mem['peak_bytes'] > 0 and mem['delta_bytes'] >= 0
    assert '`repq_est_noquant`' in (tmp_path / 'results.md').read_text()


COMPILE_VARIANTS = ('fp_multibranch', 'lsq', 'repq_bn', 'repq_est', 'repq_estc8')


def test_benchmark_compile(tmp_path):
    """--compile: every variant eager and compiled in one run, compile times, the ratio
    columns and targets of the compiled steps, and the profile of the compiled step."""
    tool = _tool()
    threads = torch.get_num_threads()
    torch._dynamo.reset()
    try:
        res = tool.main(['--model', 'block', '--channels', '8', '--input-size', '8',
                         '--batch-size', '2', '--warmup', '1', '--repeats', '2', '--threads',
                         '1', '--skip-merge', '--skip-infer', '--memory', 'off', '--quiet',
                         '--variants', ','.join(COMPILE_VARIANTS), '--compile',
                         '--compile-backend', 'aot_eager', '--profile', '--profile-variant',
                         'repq_est', '--out-dir', str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    js = json.loads((tmp_path / 'results.json').read_text())
    md = (tmp_path / 'results.md').read_text()
    assert js['config']['compile'] == {'mode': 'default', 'backend': 'aot_eager'}
    assert list(js['train']) == list(js['train_compiled']) == list(COMPILE_VARIANTS)
    for v in COMPILE_VARIANTS:
        for rows in (js['train'], js['train_compiled']):
            _check_stats(rows[v])
            assert len(rows[v]['samples']) == 2 and math.isfinite(rows[v]['final_loss'])
        ci = js['train_compiled'][v]['compile']
        assert ci['first_call_s'] > 0 and ci['compile_s'] >= 0 and ci['graphs'] >= 1
        assert ci['compiling_calls'][0] == 0           # the first call compiles
        assert len(ci['calls_s']) >= 3
    # the est_refresh=8 refresh step is its own graph: warm-up covers one period
    assert len(js['train_compiled']['repq_estc8']['compile']['calls_s']) >= 9
    header = next(ln for ln in md.splitlines() if ln.startswith('| variant | eager median'))
    for col in ('compiled median ms', 'speed-up', 'x compiled FP multi-branch',
                'x compiled LSQ', 'x eager FP multi-branch', 'first call s', 'compile s'):
        assert col in header
    section = md.split('eager vs compiled')[1].split('\n## ')[0]
    rows = {ln.split('`')[1]: ln for ln in section.splitlines()
            if ln.startswith('| ') and '`' in ln}
    assert set(rows) == set(COMPILE_VARIANTS)
    tc, tr = js['train_compiled'], js['train']
    expected = {
        'compiled RepQ-BNEst / compiled LSQ baseline':
            tc['repq_est']['median'] / tc['lsq']['median'],
        'compiled RepQ-BNEst / eager FP multi-branch':
            tc['repq_est']['median'] / tr['fp_multibranch']['median'],
        'compiled RepQ-BN / compiled FP multi-branch':
            tc['repq_bn']['median'] / tc['fp_multibranch']['median']}
    got = {t['name']: t for t in js['targets']}
    for name, val in expected.items():
        assert got[name]['value'] == pytest.approx(val) and math.isfinite(val)
        assert f'- {name}: {val:.2f}' in md
    # the eager table and eager targets are still there
    assert '## Training step (forward + backward + SGD step)' in md
    assert 'RepQ-BNEst / LSQ baseline' in got
    att = js['profile_compiled']['repq_est']
    assert att['compiled'] and att['wall_ms'] > 0
    kinds = {it['phase'] for it in att['items']}
    assert {'forward graph', 'backward graph'} <= kinds, kinds
    assert set(att['phases_ms']) >= {'CompiledFunction', 'CompiledFunctionBackward'}
    assert (tmp_path / 'profile_repq_est_compiled.txt').exists()
    assert 'repq_est' in js['profile']                 # the eager profile as before


@pytest.mark.parametrize('argv, msg', [
    (['--compile', 'fastest'], 'invalid choice'),
    (['--compile', '--compile-backend', 'no_such_backend'], 'unknown --compile-backend'),
    (['--compile-backend', 'eager'], '--compile-backend needs --compile'),
    (['--no-convert'], 'unrecognized arguments'),
])
def test_benchmark_bad_compile_args(argv, msg, capsys):
    tool = _tool()
    with pytest.raises(SystemExit):
        tool.parse_args(argv)
    assert msg in capsys.readouterr().err


def test_benchmark_reexports():
    """Other tools import the model factory and the variants from the entry script."""
    tool = _tool()
    from repq_mm import QConfig
    from repq_mm.rep import RepVGGBlock as Block
    args = tool.parse_args(['--model', 'block', '--channels', '4'])
    base, desc = tool.build_model(args)
    assert isinstance(base, Block) and desc.startswith('RepVGGBlock(4, 4')
    lsq = tool.make_variant('lsq', base, QConfig(w_bits=4, a_bits=4))
    assert type(lsq).__name__ == 'Sequential' and lsq[0].w_quant.bits == 4
    with pytest.raises(ValueError, match='unknown variant'):
        tool.make_variant('nope', base, QConfig())


def test_benchmark_detector(tmp_path):
    """--model yolov6: the YOLOv6-style detector (mmdet) in every training variant, deploy
    equal to the train form, merge timings."""
    pytest.importorskip('mmdet')
    tool = _tool()
    threads = torch.get_num_threads()
    try:
        res = tool.main(['--model', 'yolov6', '--input-size', '64', '--batch-size', '1',
                         '--warmup', '1', '--repeats', '1', '--threads', '1', '--quiet',
                         '--memory', 'off', '--out-dir', str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert 'detector' in res['config']['model_desc']
    assert set(res['train']) == {'fp_multibranch', 'fp_merged', 'lsq', 'repq_bn', 'repq_est'}
    assert res['infer']['fp_deploy']['max_rel_err_vs_train_form'] < 1e-4
    assert res['merge']


def test_mmpretrain_spec_skips_cleanly(tmp_path, monkeypatch):
    tool = _tool()
    monkeypatch.setitem(sys.modules, 'mmpretrain', None)     # as if not installed
    res = tool.main(['--model', 'mmpretrain:A0', '--quiet', '--out-dir', str(tmp_path)])
    assert res['skipped'] and 'not importable' in res['notes'][0]
    assert (tmp_path / 'results.json').exists()


@pytest.mark.parametrize('arch', ['A0', 'B0'])
def test_repvggnet_train_form_matches_deploy(arch):
    torch.manual_seed(0)
    net = RepVGGNet(arch, num_classes=7, width_multiplier=(0.125, 0.25),
                    num_blocks=(1, 2, 2, 1))
    # non-trivial BN statistics so the fold is exercised
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    deployed = net.deploy()
    assert not any(isinstance(m, RepVGGBlock) for m in deployed.modules())
    with torch.no_grad():
        a, b = net(x), deployed(x)
    assert a.shape == (2, 7)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_repvggnet_a0_layout():
    net = RepVGGNet('A0')
    assert [len(s) for s in net.stages] == [2, 4, 14, 1]
    assert net.stem.out_channels == 48 and net.out_channels == 1280
    assert [s[0].out_channels for s in net.stages] == [48, 96, 192, 1280]
    # 9.11M parameters in training form, as mmpretrain reports for RepVGG-A0
    assert abs(sum(p.numel() for p in net.parameters()) / 1e6 - 9.11) < 0.01
    # identity branches exactly where in == out and stride 1
    assert len(net.stem.branches) == 2 and len(net.stages[0][0].branches) == 2
    assert len(net.stages[0][1].branches) == 3
