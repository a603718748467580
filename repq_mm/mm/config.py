"""RepQ in OpenMMLab configs: the one config form every tool builds, and the check that
refuses the old form under every tool.

A RepQ config declares its model itself, the way mmrazor's quantization configs wrap
``_base_.model``, so mmpretrain's / mmdet's own ``tools/train.py`` and ``tools/test.py``
build it as it is::

    _base_ = 'mmpretrain::repvgg/repvgg-A0_8xb32_in1k.py'
    custom_imports = dict(imports=['repq_mm'], allow_failed_imports=False)
    model = dict(
        _delete_=True,                   # replace the base model instead of merging into it
        type='RepQModel',
        architecture=_base_.model,       # the original model config
        repq=dict(w_bits=4, a_bits=4, bn_mode='est', per_channel=True),
        init_checkpoint='path/or/url/to/fp.pth')
    custom_hooks = [dict(type='LSQCalibHook')]

Derived configs and ``--cfg-options`` change single keys: ``model.repq.w_bits=8``,
``model.init_checkpoint=fp.pth``, ``model.architecture.backbone.widen_factor=0.5``.

The old form, a top-level ``repq = dict(...)`` beside a plain ``model``, was only understood
by this project's tools (which rewrote it); every other tool silently builds the plain model
and trains it in full precision. :func:`check_config` refuses it, naming the form above.

Where the check runs. The stock tools call nothing of ours: they ``Config.fromfile`` the
config (which imports ``repq_mm`` through its ``custom_imports``, *inside* ``fromfile``,
between parsing the file and making the ``Config`` object), merge ``--cfg-options`` with
``Config.merge_from_dict`` and build the Runner. The only code of ours that runs is that
import, and it cannot see the config. So importing :mod:`repq_mm.mm` calls
:func:`install_config_check`, which makes mmengine's ``Config`` run :func:`check_config`
at the end of ``Config.__init__`` (every ``Config(...)``, hence every ``Config.fromfile``,
including the one that imported repq_mm) and of ``Config.merge_from_dict`` (so
``--cfg-options repq.w_bits=4``, the old option spelling, is refused too instead of being
ignored). A check where the Runner is built would miss the tools that build a model without
a Runner (inference APIs, analysis tools). The check looks at top-level keys only and raises
only for configs that use this project's names (a ``repq`` section, a ``RepQModel``, a
section spelled like ``repq`` in a config importing repq_mm): other configs are unaffected;
a refused ``merge_from_dict`` leaves the config as it was. A config that does not import
``repq_mm`` (in a process that never imports it) cannot be checked by anything of ours.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import logging

from mmengine.logging import print_log

from ..quant.config import closest

#: the config form, as the error messages show it
REPQ_MODEL_FORM = """\
model = dict(
    _delete_=True,                  # replace the base model, do not merge into it
    type='RepQModel',
    architecture=_base_.model,      # the original (plain) model config
    repq={repq},
    init_checkpoint={init_checkpoint})
custom_hooks = [dict(type='LSQCalibHook')]  # LSQ step-size initialisation"""

_FOREIGN_NAMES = ('branch_3x3', 'branch_1x1', 'branch_norm', 'branch_conv_list',
                  'branch_scale', 'rbr_dense', 'rbr_1x1', 'rbr_identity')
_WRAPPER_KEYS = ('type', '_scope_')
_warned: set = set()


class RepQConfigError(KeyError, ValueError):
    """A config that would not build what it says (a ``KeyError`` and a ``ValueError``, so
    callers catching either see it; printed as its plain message, not as a key)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ''


def type_name(typ) -> str | None:
    """``'RepQModel'`` for ``'RepQModel'``, ``'mmpretrain.RepQModel'`` or the class itself
    (lazy-import configs); the bare name of any other type; ``None`` when there is none."""
    if isinstance(typ, str):
        return typ.split('.')[-1]
    if isinstance(typ, type):
        return typ.__name__
    return None


def is_repq_model(model) -> bool:
    """Whether a model config (dict) is a ``RepQModel``."""
    return isinstance(model, dict) and type_name(model.get('type', None)) == 'RepQModel'


def _imports_repq_mm(cfg) -> bool:
    ci = cfg.get('custom_imports', None)
    if not isinstance(ci, dict):
        return False
    imports = ci.get('imports', None) or []
    imports = [imports] if isinstance(imports, str) else imports
    return any(isinstance(i, str) and (i == 'repq_mm' or i.startswith('repq_mm.'))
               for i in imports)


def _form(repq=None) -> str:
    """:data:`REPQ_MODEL_FORM` with the given settings (``init_checkpoint`` moved out)."""
    settings = dict(repq) if isinstance(repq, dict) else {}
    ck = settings.pop('init_checkpoint', None)
    return REPQ_MODEL_FORM.format(
        repq='dict(' + ', '.join(f'{k}={v!r}' for k, v in settings.items()) + ')',
        init_checkpoint=repr(ck))


def _bare_repq_error(cfg, repq, model) -> RepQConfigError:
    where = f' ({cfg.filename})' if getattr(cfg, 'filename', None) else ''
    if is_repq_model(model):
        return RepQConfigError(
            f'the config{where} has a top-level `repq` section beside its RepQModel: '
            'nothing reads a top-level `repq` (the model is configured by model.repq and '
            'model.init_checkpoint). Remove it and put its settings into `model.repq` '
            '(options: --cfg-options model.repq.w_bits=4 model.init_checkpoint=fp.pth).')
    what = type_name(model.get('type', None)) if isinstance(model, dict) else None
    beside = f'beside a plain {what} model' if what else 'and no RepQModel'
    return RepQConfigError(
        f'the config{where} has a top-level `repq` section {beside}. No tool reads a '
        "top-level `repq`: mmpretrain's / mmdet's tools/train.py would build the plain model "
        'and train it in full precision. '
        'Declare the RepQ model in the config itself:\n\n' + _form(repq) + '\n\n(options '
        'then are --cfg-options model.repq.w_bits=4 model.init_checkpoint=fp.pth)')


def _check_section_name(cfg) -> None:
    """A config without ``repq`` but with a dict-valued top-level key spelled almost like it
    (``reqp``, ``rep_q``) would silently train in full precision: refuse it."""
    keys = [k for k in cfg.keys() if isinstance(cfg.get(k), dict)]
    close = difflib.get_close_matches('repq', keys, n=1, cutoff=0.75)
    if close:
        raise RepQConfigError(
            f'the config has a top-level {close[0]!r} section: did you mean \'repq\'? A RepQ '
            "model is declared as the config's model (without it the model is not "
            'quantized):\n' + _form(cfg.get(close[0])))


def _check_model_keys(model) -> None:
    """Keys of a ``RepQModel`` config that ``RepQModel`` does not take (``reqp``,
    ``init_ckpt``): named with the closest valid one before anything is built."""
    from .model import RepQModel
    params = [p for p in inspect.signature(RepQModel.__init__).parameters if p != 'self']
    unknown = [k for k in model if k not in params and k not in _WRAPPER_KEYS]
    if unknown:
        hints = [f'{k!r}{closest(k, params)}' for k in unknown]
        raise RepQConfigError(f'model (RepQModel) has unknown key(s) {"; ".join(hints)}. '
                              f'Valid keys: {params}')


def _warn_renamed_param_keys(cfg, model) -> None:
    """Conversion renames rep-block modules (``branch_3x3.norm`` -> ``branches.0.0.bn``), so
    ``paramwise_cfg.custom_keys`` written for the original names silently stop matching."""
    repq = model.get('repq', None) or {}
    if not isinstance(repq, dict) or repq.get('method', 'repq') == 'fp':
        return
    ow = cfg.get('optim_wrapper', None) or {}
    pw = ow.get('paramwise_cfg', None) if isinstance(ow, dict) else None
    keys = (pw.get('custom_keys', None) if isinstance(pw, dict) else None) or {}
    stale = tuple(k for k in keys if any(n in k for n in _FOREIGN_NAMES))
    if stale and stale not in _warned:
        _warned.add(stale)
        print_log(f'optim_wrapper.paramwise_cfg.custom_keys {list(stale)} name modules of the '
                  'original rep blocks, which RepQ conversion replaces (their BNs become '
                  '`branches.<i>.0.bn`): these keys match nothing in the RepQ model. Use e.g. '
                  'norm_decay_mult=0.0 or keys on the new names.', logger='current',
                  level=logging.WARNING)


def check_config(cfg) -> None:
    """Refuse what would make a RepQ config train something else than it says, with a
    :class:`RepQConfigError` (a ``KeyError`` and a ``ValueError``) that says how to write it:

    * a top-level ``repq`` section (the old form, or ``--cfg-options repq.x=...``): no tool
      reads it; the error shows the RepQModel form with the given settings;
    * in a config that imports ``repq_mm`` and has no RepQModel, a top-level section spelled
      almost like ``repq`` (``reqp``, ``rep_q``: "did you mean 'repq'?");
    * a ``RepQModel`` config with keys ``RepQModel`` does not take (naming the closest valid
      key).

    Warns when ``optim_wrapper.paramwise_cfg.custom_keys`` name modules that RepQ conversion
    replaces. Runs by itself on every mmengine ``Config`` once repq_mm is imported (see
    :func:`install_config_check`); the ``repq`` settings themselves are validated when the
    model is built (:func:`~repq_mm.mm.model.check_repq_cfg`).

    Examples:
        >>> from mmengine.config import Config
        >>> import repq_mm  # noqa: F401  (installs the check)
        >>> Config(dict(model=dict(type='ImageClassifier'), repq=dict(w_bits=4)))
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        repq_mm.mm.config.RepQConfigError: the config has a top-level `repq` section beside a...
        >>> cfg = Config(dict(model=dict(type='RepQModel', architecture=dict(type='X'),
        ...                              repq=dict(w_bits=4))))
        >>> cfg.merge_from_dict({'model.repq.w_bits': 8})          # the new keys: fine
        >>> cfg.merge_from_dict({'repq.w_bits': 8})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        repq_mm.mm.config.RepQConfigError: the config has a top-level `repq` section beside its...
    """
    repq = cfg.get('repq', None)
    model = cfg.get('model', None)
    if repq is not None:
        raise _bare_repq_error(cfg, repq, model)
    if is_repq_model(model):
        _check_model_keys(model)
        _warn_renamed_param_keys(cfg, model)
    elif _imports_repq_mm(cfg):
        _check_section_name(cfg)


_INSTALLED = '_repq_config_check'


def install_config_check() -> bool:
    """Make mmengine's ``Config`` run :func:`check_config` at the end of ``__init__`` and
    of ``merge_from_dict`` (idempotent; what importing :mod:`repq_mm.mm` does). Returns
    whether it installed it now."""
    from mmengine.config import Config
    if getattr(Config.__init__, _INSTALLED, False):
        return False
    init, merge = Config.__init__, Config.merge_from_dict

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        check_config(self)

    @functools.wraps(merge)
    def merge_from_dict(self, *args, **kwargs):
        before = object.__getattribute__(self, '_cfg_dict')
        merge(self, *args, **kwargs)          # replaces _cfg_dict by a merged copy
        try:
            check_config(self)
        except RepQConfigError:
            object.__setattr__(self, '_cfg_dict', before)   # a refused merge changes nothing
            raise

    for fn in (__init__, merge_from_dict):
        setattr(fn, _INSTALLED, True)
    Config.__init__ = __init__
    Config.merge_from_dict = merge_from_dict
    return True
