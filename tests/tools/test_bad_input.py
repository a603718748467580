"""Bad input gets a clear error naming the problem and leaves nothing half-done.

* bit widths outside 2..8 / not ints, everywhere they enter (``QConfig``, ``repq`` dicts,
  ``merge_quant``; ``LSQQuantizer`` / ``check_bits`` / ``convert_to_repq`` are covered in
  ``test_lsq.py`` / ``test_convert.py``);
* ``convert_to_repq``: ``skip`` entries that name nothing (e.g. a layer type), a block or
  layer that cannot be converted after others could: the model is left as it was;
* ``tools/merge_quant.py``: truncated / corrupted checkpoints, checkpoints of another
  architecture, bad ``repq`` sections: exit status 1, a message naming the problem, OUT_DIR
  untouched (a folder holding another model is refused unless ``--overwrite``);
* configs: misspelled ``repq`` keys or section name, ``repq`` without ``model``;
* non-finite inputs / step sizes: named at LSQ initialisation, in calibration and by
  ``NonFiniteCheckHook``.
About 15 s.
"""
from __future__ import annotations

import hashlib
import os
import os.path as osp
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from repq_mm import convert_to_repq
from repq_mm.quant import QConfig
from repq_mm.rep import RepVGGBlock


BAD_BITS = [0, 1, 9, 33, -4, 2.5, 8.0, '8', None, True]


# --------------------------------------------------------------------------------------
# bit widths
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize('field', ['w_bits', 'a_bits'])
@pytest.mark.parametrize('bits', BAD_BITS)
def test_qconfig_bits(field, bits):
    with pytest.raises(ValueError, match=re.escape(repr(bits))):
        QConfig(**{field: bits})
    with pytest.raises(ValueError, match='bit width'):
        QConfig.from_dict({field: bits})
    with pytest.raises(ValueError, match='bit width'):
        RepVGGBlock(4, 4).enable_repq(QConfig(**{field: bits}))


@pytest.mark.parametrize('field', ['w_bits', 'a_bits', 'first_bits', 'last_bits'])
@pytest.mark.parametrize('bits', BAD_BITS)
def test_repq_cfg_bits(field, bits):
    pytest.importorskip('mmengine')
    from repq_mm.mm import check_repq_cfg
    if bits is None and field in ('first_bits', 'last_bits'):
        assert check_repq_cfg({field: None})[field] is None     # None: as the rest
        return
    with pytest.raises(ValueError, match=rf'repq\.{field}.*{re.escape(repr(bits))}'):
        check_repq_cfg({field: bits})


def test_repq_cfg_layer_bits():
    pytest.importorskip('mmengine')
    from repq_mm.mm import check_repq_cfg
    assert check_repq_cfg({'layer_bits': {'head.fc': 8}})['layer_bits'] == {'head.fc': 8}
    with pytest.raises(ValueError, match=r"repq\.layer_bits\['head.fc'\].*33"):
        check_repq_cfg({'layer_bits': {'head.fc': 33}})
    with pytest.raises(ValueError, match=r'repq\.layer_bits must be a dict'):
        check_repq_cfg({'layer_bits': 8})


def test_good_bits_accepted():
    for b in range(2, 9):
        cfg = QConfig(w_bits=b, a_bits=b)
        wq, aq = cfg.weight_quantizer(4), cfg.act_quantizer()
        assert wq.bits == aq.bits == b
        assert wq.qrange == (2 ** (b - 1), 2 ** (b - 1) - 1)
        aq.set_step(torch.ones(1), signed=False)
        assert aq.qrange == (0, 2 ** b - 1)
        wq.set_step(torch.ones(1))
        codes, _ = wq.quantize_to_codes(torch.linspace(-300, 300, 64).reshape(4, 16))
        assert int(codes.min()) == -2 ** (b - 1) and int(codes.max()) == 2 ** (b - 1) - 1


# --------------------------------------------------------------------------------------
# convert_to_repq
# --------------------------------------------------------------------------------------
from helpers import snapshot as _snapshot  # noqa: E402
from helpers import unchanged as _unchanged  # noqa: E402


@pytest.mark.parametrize('skip, match', [
    (['RepVGGBlock'], "skip entry 'RepVGGBlock' matches no module"),
    (['nn.Conv2d'], 'not layer types'),
    (['head.*'], "matches no module of the model: .*top-level modules: \\['0', '1', '2'\\]"),
    ([3], 'non-empty strings'),
    ([''], 'non-empty strings'),
])
def test_skip_naming_nothing(skip, match):
    net = nn.Sequential(nn.Conv2d(3, 4, 1), RepVGGBlock(4, 4), nn.Conv2d(4, 4, 1))
    snap = _snapshot(net)
    with pytest.raises(ValueError, match=match):
        convert_to_repq(net, skip=skip)
    assert _unchanged(net, snap)
    convert_to_repq(net, skip=['1', '2*'])          # names / patterns that exist: fine


# --------------------------------------------------------------------------------------
# non-finite values
# --------------------------------------------------------------------------------------
def test_nonfinite_at_initialisation_names_the_quantizer():
    net = convert_to_repq(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(),
                                        RepVGGBlock(4, 4, act=nn.ReLU())), w_bits=4, a_bits=4)
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float('nan')
    with pytest.raises(FloatingPointError, match=r"LSQ quantizer 0\.a_quant .*non-finite"):
        net(x)
    net = convert_to_repq(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(),
                                        RepVGGBlock(4, 4, act=nn.ReLU())), w_bits=4, a_bits=4)
    with torch.no_grad():
        net[2].branches[0][0].weight[0, 0, 0, 0] = float('inf')
    with pytest.raises(FloatingPointError, match=r'LSQ quantizer 2\.w_quant'):
        net(torch.randn(2, 3, 8, 8))


def _tiny_repq_model():
    pytest.importorskip('mmengine')
    from mmengine.model import BaseModel

    from repq_mm.mm import RepQModel

    class Net(BaseModel):
        def __init__(self):
            super().__init__()
            self.blk = RepVGGBlock(3, 4, act=nn.ReLU())
            self.fc = nn.Linear(4, 2)

        def forward(self, inputs, data_samples=None, mode='tensor'):
            return self.fc(self.blk(inputs).mean((2, 3)))

    torch.manual_seed(0)
    return RepQModel(Net(), repq=dict(w_bits=4, a_bits=4))


def test_nonfinite_in_calibration_names_the_layer():
    from repq_mm.mm import calibrate_lsq
    model = _tiny_repq_model()
    good = torch.rand(2, 3, 6, 6)
    bad = good.clone()
    bad[1, 2, 3, 3] = float('inf')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError,
                       match=r'input of architecture\.blk\.a_quant \(batch 2\)'):
        calibrate_lsq(model, [dict(inputs=good), dict(inputs=bad)], 2)
    after = model.state_dict()
    # activation steps not initialised from a broken batch; modes restored
    assert not int(after['architecture.blk.a_quant.initialized'])
    assert torch.equal(before['architecture.fc.a_quant.step'],
                       after['architecture.fc.a_quant.step'])
    assert model.training


def test_nonfinite_check_hook():
    pytest.importorskip('mmengine')
    from mmengine.registry import HOOKS

    from repq_mm.mm import NonFiniteCheckHook, calibrate_lsq
    assert HOOKS.get('NonFiniteCheckHook') is NonFiniteCheckHook
    with pytest.raises(ValueError, match='interval'):
        NonFiniteCheckHook(interval=0)
    model = _tiny_repq_model()
    calibrate_lsq(model, [dict(inputs=torch.rand(2, 3, 6, 6))], 1)
    hook = NonFiniteCheckHook(interval=1)
    runner = SimpleNamespace(model=model, iter=6)
    hook.before_train(runner)
    hook.after_train_iter(runner, 0, None, dict(loss=torch.tensor(0.5)))      # fine
    with pytest.raises(FloatingPointError,
                       match=r"iteration 7: loss\(es\) \['loss'\]; all step sizes"):
        hook.after_train_iter(runner, 0, None, dict(loss=torch.tensor(float('nan'))))
    with torch.no_grad():
        model.architecture.fc.a_quant.step.fill_(float('nan'))
        model.architecture.fc.weight[0, 0] = float('inf')
    with pytest.raises(FloatingPointError,
                       match=r'LSQ step size of architecture\.fc\.a_quant = \[nan\]; '
                             r'parameter architecture\.fc\.weight'):
        hook.after_train_iter(runner, 0, None, dict(loss=torch.tensor(0.5)))
    # interval: iteration 7 is not checked with interval 2
    NonFiniteCheckHook(interval=2).after_train_iter(runner, 0, None, {})


# --------------------------------------------------------------------------------------
# configs and merge_quant
# --------------------------------------------------------------------------------------
def test_config_sections():
    pytest.importorskip('mmengine')
    from mmengine.config import Config

    from repq_mm.mm import check_config, check_repq_cfg
    imp = dict(custom_imports=dict(imports=['repq_mm'], allow_failed_imports=False))
    with pytest.raises(KeyError, match="did you mean 'repq'"):
        Config(dict(model=dict(type='ImageClassifier'), reqp=dict(w_bits=4), **imp))
    with pytest.raises(KeyError, match="did you mean 'repq'"):
        Config(dict(model=dict(type='ImageClassifier'), rep_q=dict(w_bits=4), **imp))
    with pytest.raises(ValueError, match=r'top-level `repq` section and no RepQModel'):
        Config(dict(repq=dict(w_bits=4)))
    with pytest.raises(ValueError,
                       match=r"(?s)beside a plain ImageClassifier.*type='RepQModel'"):
        Config(dict(model=dict(type='ImageClassifier'), repq=dict(w_bits=4)))
    with pytest.raises(KeyError, match=r"'init_ckpt' \(did you mean 'init_checkpoint'\?\)"):
        Config(dict(model=dict(type='RepQModel', architecture=dict(type='X'),
                               init_ckpt='fp.pth')))
    with pytest.raises(ValueError, match='repq must be a dict'):
        check_repq_cfg([('w_bits', 4)])
    with pytest.raises(KeyError, match="'bnmode' \\(did you mean 'bn_mode'\\?\\)"):
        check_repq_cfg(dict(bnmode='est'))
    cfg = Config(dict(model=dict(type='ImageClassifier'), train_cfg=dict(max_iters=1), **imp))
    assert check_config(cfg) is None                      # no repq at all: left alone
    # a config that does not import repq_mm may have any other top-level section
    assert Config(dict(model=dict(type='ImageClassifier'), repo=dict(url='x'))).repo.url == 'x'


def _tree_hash(d):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(d)):
        dirs.sort()
        for f in sorted(files):
            h.update(f.encode())
            with open(osp.join(root, f), 'rb') as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_merge_quant_bad_input(tmp_path, capsys, data_root):
    from helpers import ARCH, DATA_PREPROCESSOR, merge_tool, write_config
    from helpers import build as _build
    from helpers import loader as _loader

    from repq_mm.mm import calibrate_lsq
    root = data_root
    repq = dict(w_bits=4, a_bits=4)
    cfg = write_config(tmp_path / 'cfg.py', root, repq)

    def checkpoint(name, arch=ARCH, seed=0):
        torch.manual_seed(seed)
        model = _build(dict(type='RepQModel', architecture=arch, repq=repq,
                            data_preprocessor=DATA_PREPROCESSOR))
        calibrate_lsq(model, _loader(root), 1)
        path = str(tmp_path / name)
        torch.save({'state_dict': model.state_dict()}, path)
        return path

    good, other = checkpoint('good.pth'), checkpoint('other.pth', seed=1)
    out = str(tmp_path / 'deploy')
    assert merge_tool.main([cfg, good, out]) == 0
    held = _tree_hash(out)
    listing = sorted(os.listdir(tmp_path))

    def refused(args, message):
        capsys.readouterr()
        assert merge_tool.main(args) == 1
        err = capsys.readouterr().err
        assert re.search(message, err, re.S), err
        assert _tree_hash(out) == held                                 # untouched
        assert sorted(os.listdir(tmp_path)) == listing                 # nothing new

    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(open(good, 'rb').read()[:4096])
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint at all' * 10)
    wide = dict(ARCH, backbone=dict(ARCH['backbone'], arch=dict(
        ARCH['backbone']['arch'], width_factor=[0.5] * 4)),
        head=dict(ARCH['head'], in_channels=256))
    wide_ck = checkpoint('wide.pth', arch=wide)
    listing = sorted(os.listdir(tmp_path))
    for bad, msg in ((str(truncated), 'cannot read checkpoint .*truncated.pth'),
                     (str(garbage), 'cannot read checkpoint .*garbage.pth'),
                     (wide_ck, 'does not fit the model of the config .*size mismatch'),
                     (str(tmp_path / 'missing.pth'), 'missing.pth does not exist')):
        refused([cfg, bad, out, '--overwrite'], msg)       # even with --overwrite
        refused([cfg, bad, str(tmp_path / 'new_out')], msg)
    # another model in OUT_DIR: refused without --overwrite, replaced with it
    refused([cfg, other, out], 'already holds a different model.*--overwrite')
    for bad_repq, msg in ((dict(w_bit=4), "did you mean 'w_bits'"),
                          (dict(w_bits=33), r'repq\.w_bits: bit width must be in 2\.\.8'),
                          (dict(a_bits=4.0), r'repq\.a_bits')):
        bad_cfg = write_config(tmp_path / 'bad_cfg.py', root, bad_repq)
        listing = sorted(os.listdir(tmp_path))
        refused([bad_cfg, good, out, '--overwrite'], msg)
    # the old form (a top-level repq beside the plain model): refused, showing the new one
    bare = write_config(tmp_path / 'bad_cfg.py', root, extra=f'repq = {repq!r}\n')
    refused([bare, good, out, '--overwrite'],
            r"top-level `repq` section beside a plain ImageClassifier.*type='RepQModel'")
    assert merge_tool.main([cfg, other, out, '--overwrite']) == 0
    assert _tree_hash(out) != held



# --------------------------------------------------------------------------------------
# the settings schema (repq_mm.settings.RepQConfig): one owner of defaults and checks
# --------------------------------------------------------------------------------------
def test_schema_did_you_mean_and_values():
    from repq_mm.settings import REPQ_DEFAULTS, RepQConfig
    assert RepQConfig().to_dict() == REPQ_DEFAULTS
    assert set(REPQ_DEFAULTS) >= {f for f in QConfig.keys()}       # every layer setting
    with pytest.raises(KeyError, match=r"'est_stat' \(did you mean 'est_stats'\?\)"):
        RepQConfig.from_dict(dict(est_stat='kron'))
    for bad, match in ((dict(est_stats='kronecker'), r"repq\.est_stats .*did you mean 'kron'"),
                       (dict(impl='fastest'), r"repq\.impl .*did you mean 'fast'"),
                       (dict(init='mes'), r"repq\.init .*did you mean 'mse'"),
                       (dict(per_channel=1), r'repq\.per_channel must be True or False'),
                       (dict(est_refresh=-1), r'repq\.est_refresh must be an int >= 0'),
                       (dict(method='lsqq'), r"repq\.method .*did you mean 'lsq'")):
        with pytest.raises(ValueError, match=match):
            RepQConfig.from_dict(bad)
    # the per-layer part checks the same way, under its own name
    with pytest.raises(ValueError, match=r"qconfig\.bn_mode .*did you mean 'est'"):
        QConfig.from_dict(dict(bn_mode='estt'))


def test_convert_settings_no_silent_override():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), RepVGGBlock(4, 4))
    with pytest.raises(ValueError, match=r"\['w_bits'\] given both in qcfg and as keywords"):
        convert_to_repq(net, QConfig(w_bits=3), w_bits=4, inplace=False)
    with pytest.raises(TypeError, match="'method' is a RepQModel setting"):
        convert_to_repq(net, method='lsq', inplace=False)
    with pytest.raises(KeyError, match=r"'bnmode' \(did you mean 'bn_mode'\?\)"):
        convert_to_repq(net, bnmode='est', inplace=False)
    # the same value both ways, a dict qcfg, est_stats: all reach the blocks
    q = convert_to_repq(net, dict(w_bits=3, bn_mode='est', est_stats='kron'), w_bits=3,
                        inplace=False)
    assert q[1].w_quant.bits == 3 and q[1].bn_mode == 'est' and q[1].est_stats == 'kron'


def test_est_stats_from_the_repq_dict():
    pytest.importorskip('mmpretrain')
    from mmengine.registry import MODELS, init_default_scope

    import repq_mm.mm  # noqa: F401
    init_default_scope('mmpretrain')
    arch = dict(type='ImageClassifier',
                backbone=dict(type='RepVGG', arch=dict(num_blocks=[1, 1, 1, 1],
                                                       width_factor=[0.25] * 4,
                                                       group_layer_map=None, se_cfg=None)),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(type='LinearClsHead', num_classes=3, in_channels=128))
    model = MODELS.build(dict(type='RepQModel', architecture=arch,
                              repq=dict(bn_mode='est', est_stats='kron')))
    blocks = [m for m in model.modules() if hasattr(m, 'est_stats')]
    assert blocks and all(b.est_stats == 'kron' for b in blocks)


def test_configuration_doc_lists_every_key():
    """docs/configuration.md's key table names exactly the schema's keys."""
    import os.path as osp

    from helpers import ROOT
    from repq_mm.settings import RepQConfig
    text = open(osp.join(ROOT, 'docs', 'configuration.md'), encoding='utf-8').read()
    table = text.split('| key | default | meaning |', 1)[1].split('\n\n', 1)[0]
    documented = set(re.findall(r'`(\w+)`', ''.join(
        ln.split('|')[1] for ln in table.splitlines() if ln.startswith('| `'))))
    assert documented == set(RepQConfig.keys())
