"""``tools/analysis_tools/bnest_fidelity.py`` end to end on a tiny mmpretrain RepVGG and
generated PNGs: one row per BN inside a rep block with both estimators' errors, the summary
per estimator and branch kind, and the numbers themselves: the ``kron`` estimator is exact
for 1x1 / identity branches (up to float rounding) where the paper's ``diag`` is not, and
every row matches :func:`repq_mm.rep.fidelity.bnest_errors` on the block's real input."""
from __future__ import annotations

import os.path as osp
import re

import pytest
import torch

from helpers import ARCH, DATA_PREPROCESSOR, load_tool, make_pngs, write_config


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    pytest.importorskip('mmpretrain')
    pytest.importorskip('cv2')
    from mmengine.registry import MODELS, init_default_scope
    tmp = tmp_path_factory.mktemp('fidelity')
    data_root = make_pngs(tmp / 'pngs', (('train', 2), ('val', 4)))
    cfg = write_config(tmp / 'fp.py', data_root, batch_sizes=(4, 6))
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    fp = MODELS.build(dict(ARCH, data_preprocessor=dict(DATA_PREPROCESSOR,
                                                        type='ClsDataPreprocessor')))
    fp.init_weights()
    fp.train()
    with torch.no_grad():         # running statistics of real feature maps, not (0, 1)
        for i in range(3):
            fp(torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1)
    ckpt = str(tmp / 'fp.pth')
    torch.save({'state_dict': fp.state_dict()}, ckpt)
    return tmp, cfg, ckpt


def _rows(text):
    """``[(block, bn, kernel, [floats...])]`` of the Markdown table."""
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if len(cells) > 3 and re.fullmatch(r'\d+x\d+', cells[2]):
            out.append((cells[0], cells[1], cells[2], [float(c) for c in cells[3:]]))
    return out


def test_fidelity_tool_both_estimators(setup):
    tmp, cfg, ckpt = setup
    tool = load_tool('bnest_fidelity', 'tools/analysis_tools/bnest_fidelity.py')
    out = str(tmp / 'out' / 'fid.md')
    assert tool.main([cfg, ckpt, '--batches', '1', '--out', out]) == 0
    text = open(out, encoding='utf-8').read()
    model = tool.build(tool.Config.fromfile(cfg), ckpt)
    from repq_mm.rep import RepBlock
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, RepBlock)}
    n_bns = sum(len(m.bns()) for m in blocks.values())
    rows = _rows(text)
    assert len(rows) == n_bns > 0 and {r[0] for r in rows} == set(blocks)
    assert text.startswith(f'{n_bns} BNs in {len(blocks)} rep blocks, 1 val batches')
    assert re.search(r'^- diag: all \(\d+\): variance', text, re.M)
    assert re.search(r'^- kron: all \(\d+\): variance', text, re.M)
    one = [r for r in rows if r[2] == '1x1']
    kxk = [r for r in rows if r[2] != '1x1']
    assert one and kxk
    # columns: diag mean, diag var, kron mean, kron var
    assert max(r[3][3] for r in one) <= 1e-3 and max(r[3][2] for r in one) <= 1e-3
    assert max(r[3][1] for r in one) > 10 * max(max(r[3][3] for r in one), 1e-4)
    assert all(v >= 0 for r in rows for v in r[3])
    # the rows are bnest_errors on the block inputs of the same batch
    from mmengine.runner import Runner
    from repq_mm.rep.fidelity import bnest_errors
    got = {}

    def record(name):
        def hook(mod, args):
            got[name] = {e: bnest_errors(mod, args[0], e) for e in ('diag', 'kron')}
        return hook
    hooks = [m.register_forward_pre_hook(record(n)) for n, m in blocks.items()]
    cfgo = tool.Config.fromfile(cfg)
    with torch.no_grad():
        model.test_step(next(iter(Runner.build_dataloader(cfgo.val_dataloader))))
    for h in hooks:
        h.remove()
    for blk, bn, _, vals in rows:
        d = {r['bn']: r for r in got[blk]['diag']}[bn]
        k = {r['bn']: r for r in got[blk]['kron']}[bn]
        assert vals == pytest.approx([round(d['mean_err'], 3), round(d['var_err'], 3),
                                      round(k['mean_err'], 3), round(k['var_err'], 3)],
                                     abs=1.01e-3)


def test_fidelity_tool_refuses_unknown_estimator(setup):
    tmp, cfg, ckpt = setup
    tool = load_tool('bnest_fidelity', 'tools/analysis_tools/bnest_fidelity.py')
    with pytest.raises(SystemExit):
        tool.main([cfg, ckpt, '--est-stats', 'full', '--out', str(tmp / 'nothing.md')])
    assert not osp.exists(str(tmp / 'nothing.md'))
