"""Turn any ``nn.Module`` into a RepQ model, and merge it back into plain convs (torch only).

* :func:`convert_to_repq`: every re-parameterized block (ours, or a *foreign* one read by an
  adapter from :data:`FOREIGN_BLOCKS`) becomes a :class:`~repq_mm.rep.RepBlock` in RepQ mode;
  every other ``nn.Conv2d`` / ``nn.Linear`` becomes a :class:`~repq_mm.quant.QConv2d` /
  :class:`~repq_mm.quant.QLinear`.
* :func:`merge_model`: every rep block becomes its ``to_deploy()`` form (one conv + act).
* :func:`find_rep_blocks`: the rep blocks a model holds, by module name.

Adapters reuse the foreign block's BN modules (same type, e.g. ``SyncBatchNorm``), its conv
``nn.Parameter`` objects (same values, ``requires_grad`` kept, so frozen stages stay frozen)
and its post-sum modules (SE, activation) as ``act``. Each adapted block is checked once
against the foreign forward on a small random input (eval mode), so a fork whose forward
differs from the known layout raises instead of silently changing the model. Module names
change (``branch_3x3.conv.weight`` -> ``branches.0.0.weight``): load foreign checkpoints
before converting.
"""
from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .quant import LSQQuantizer, QConfig, QConv2d, QLinear, check_bits
from .rep import ConvStage, IdentityStage, RepBlock
from .rep.base import install_est_refresh_schedule

__all__ = ['convert_to_repq', 'merge_model', 'find_rep_blocks', 'FOREIGN_BLOCKS',
           'ForeignRepBlock']


class ForeignRepBlock(RepBlock):
    """A generic :class:`RepBlock` read from a foreign block; ``source`` names it.

    Not registered in ``REP_BLOCKS``: it has no constructor of its own (see the readers).
    """

    def __init__(self, *args, source: str = '', **kwargs):
        super().__init__(*args, **kwargs)
        self.source = source

    def extra_repr(self) -> str:
        return f'source={self.source}'


class _AdaptError(ValueError):
    """A foreign block that looks like a rep block but cannot be read (reason only)."""


# --------------------------------------------------------------------------------------
# reading foreign modules
# --------------------------------------------------------------------------------------
def _is_deployed(m: nn.Module) -> bool:
    """Foreign blocks already switched to deploy: their conv is an ordinary conv."""
    return (hasattr(m, 'rbr_reparam') or hasattr(m, 'branch_reparam')
            or getattr(m, 'deploy', False) is True)


def _expect_children(m: nn.Module, allowed: set[str]) -> None:
    for name, child in m.named_children():
        if name not in allowed:
            raise _AdaptError(f'unexpected submodule {name!r} ({type(child).__name__}); '
                              f'known submodules: {sorted(allowed)}')
    params = [n for n, p in m._parameters.items() if p is not None]
    if params:
        raise _AdaptError(f'unexpected parameters {params} directly on the block '
                          '(e.g. a branch scale) cannot be represented')


def _check_conv(conv: nn.Module, where: str) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d) or isinstance(conv, QConv2d):
        raise _AdaptError(f'{where}: expected an nn.Conv2d, got {type(conv).__name__}')
    if conv.dilation != (1, 1):
        raise _AdaptError(f'{where}: dilation {conv.dilation} is not supported')
    if conv.padding_mode != 'zeros' or isinstance(conv.padding, str):
        raise _AdaptError(f'{where}: padding {conv.padding!r} / padding_mode '
                          f'{conv.padding_mode!r} not supported (need numeric zero padding)')
    return conv


def _check_bn(bn: nn.Module, where: str) -> _BatchNorm:
    if not isinstance(bn, _BatchNorm):
        raise _AdaptError(f'{where}: expected a BatchNorm, got {type(bn).__name__}')
    return bn


def _conv_bn(m: nn.Module, where: str) -> tuple[nn.Conv2d, _BatchNorm | None]:
    """``(conv, bn)`` of a branch that is a plain conv, or a conv followed by a BN
    (``nn.Sequential`` named conv/bn, conv/norm or 0/1, mmcv ``ConvModule`` without act)."""
    if isinstance(m, nn.Conv2d):
        return _check_conv(m, where), None
    if getattr(m, 'order', ('conv', 'norm', 'act')) != ('conv', 'norm', 'act'):
        raise _AdaptError(f'{where}: ConvModule order {m.order} is not conv -> norm')
    children = [(n, c) for n, c in m.named_children() if not isinstance(c, nn.Identity)]
    if len(children) != 2 or [n for n, p in m._parameters.items() if p is not None]:
        raise _AdaptError(f'{where}: expected exactly a conv and a BN, got '
                          f'{[f"{n}: {type(c).__name__}" for n, c in children]}')
    (_, conv), (_, bn) = children
    conv = _check_conv(conv, f'{where} (first submodule)')
    bn = _check_bn(bn, f'{where} (second submodule)')
    if bn.num_features != conv.out_channels:
        raise _AdaptError(f'{where}: BN has {bn.num_features} channels, conv '
                          f'{conv.out_channels}')
    return conv, bn


def _identity(m: nn.Module, where: str) -> tuple[None, _BatchNorm | None]:
    """An identity branch: a BN on the input, or ``nn.Identity`` (QARepVGG)."""
    return None, (None if isinstance(m, nn.Identity) else _check_bn(m, where))


def _post(*mods: nn.Module | None) -> nn.Module | None:
    """The modules applied after the branch sum, in order (``None`` / Identity dropped)."""
    mods = [m for m in mods if m is not None and not isinstance(m, nn.Identity)]
    return None if not mods else mods[0] if len(mods) == 1 else nn.Sequential(*mods)


def _build(branches: list, act: nn.Module | None, post_bn: nn.Module | None = None,
           source: str = '') -> ForeignRepBlock:
    """A :class:`ForeignRepBlock` from ``[(conv or None for identity, bn or None), ...]``.

    The block geometry (kernel, stride, padding, groups) is that of the largest conv; the
    conv parameters and the BN modules are reused as they are.
    """
    convs = [c for c, _ in branches if c is not None]
    main = max(convs, key=lambda c: c.kernel_size[0] * c.kernel_size[1])
    w = main.weight
    blk = ForeignRepBlock(main.in_channels, main.out_channels, main.kernel_size, main.stride,
                          main.padding, main.groups, act, source=source)
    for conv, bn in branches:
        if conv is None:
            stage = IdentityStage(main.in_channels, main.groups).to(w.device, w.dtype)
        else:
            stage = ConvStage(conv.in_channels, conv.out_channels, conv.kernel_size,
                              conv.stride, conv.padding, conv.groups, bias=conv.bias is not None,
                              weight=conv.weight.detach())
            stage.weight = conv.weight      # the very same Parameter (value, requires_grad)
            if conv.bias is not None:
                stage.bias = conv.bias
        stage.bn = bn
        blk.add_branch(stage)
    blk.post_bn = post_bn
    try:
        blk.check()
    except ValueError as e:
        raise _AdaptError(f'branches cannot be merged into one conv: {e}') from None
    return blk


def _read_mmpretrain_repvgg(m: nn.Module) -> ForeignRepBlock:
    """mmpretrain ``RepVGGBlock``: ``act(se(branch_3x3(x) + branch_1x1(x) + branch_norm(x)))``
    (``se`` only when ``se_cfg`` is set)."""
    _expect_children(m, {'branch_3x3', 'branch_1x1', 'branch_norm', 'se_layer', 'act'})
    branches = [_conv_bn(m.branch_3x3, 'branch_3x3')]
    if getattr(m, 'branch_1x1', None) is not None:
        branches.append(_conv_bn(m.branch_1x1, 'branch_1x1'))
    if getattr(m, 'branch_norm', None) is not None:
        branches.append(_identity(m.branch_norm, 'branch_norm'))
    se = getattr(m, 'se_layer', None) if getattr(m, 'se_cfg', None) is not None else None
    return _build(branches, _post(se, getattr(m, 'act', None)),
                  source=f'mmpretrain.{type(m).__name__}')


def _read_mmpretrain_mobileone(m: nn.Module) -> ForeignRepBlock:
    """mmpretrain ``MobileOneBlock``:
    ``act(se(branch_norm(x) + branch_scale(x) + sum(branch_conv_list(x))))``."""
    _expect_children(m, {'branch_conv_list', 'branch_scale', 'branch_norm', 'se', 'act'})
    branches = [_conv_bn(b, f'branch_conv_list.{i}') for i, b in enumerate(m.branch_conv_list)]
    if not branches:
        raise _AdaptError('branch_conv_list is empty')
    if getattr(m, 'branch_scale', None) is not None:
        branches.append(_conv_bn(m.branch_scale, 'branch_scale'))
    if getattr(m, 'branch_norm', None) is not None:
        branches.append(_identity(m.branch_norm, 'branch_norm'))
    return _build(branches, _post(getattr(m, 'se', None), getattr(m, 'act', None)),
                  source=f'mmpretrain.{type(m).__name__}')


def _read_yolo_repvgg(m: nn.Module) -> ForeignRepBlock:
    """YOLOv6 ``RepVGGBlock`` / ``QARepVGGBlock`` and YOLOv7 ``RepConv``:
    ``act(bn(se(rbr_dense(x) + rbr_1x1(x) + rbr_identity(x))))`` where ``act`` is
    ``nonlinearity`` (YOLOv6) or ``act`` (YOLOv7) and ``bn`` exists only in QARepVGG."""
    _expect_children(m, {'rbr_dense', 'rbr_1x1', 'rbr_identity', 'se', 'nonlinearity', 'act',
                         'bn'})
    act, nonlin = getattr(m, 'act', None), getattr(m, 'nonlinearity', None)
    if act is not None and nonlin is not None:
        raise _AdaptError('has both `act` and `nonlinearity`: which one forward applies is '
                          'ambiguous')
    branches = [_conv_bn(m.rbr_dense, 'rbr_dense')]
    if getattr(m, 'rbr_1x1', None) is not None:
        branches.append(_conv_bn(m.rbr_1x1, 'rbr_1x1'))
    if getattr(m, 'rbr_identity', None) is not None:
        branches.append(_identity(m.rbr_identity, 'rbr_identity'))
    se = _post(getattr(m, 'se', None))
    post_bn = getattr(m, 'bn', None)
    if post_bn is not None:
        _check_bn(post_bn, 'bn')
        if se is not None:
            raise _AdaptError('a BN after a non-identity `se` cannot be folded')
    return _build(branches, _post(se, act if act is not None else nonlin), post_bn,
                  source=f'yolo.{type(m).__name__}')


#: family -> (matcher, reader). A matcher sees a module that is not deployed; a reader
#: returns a ForeignRepBlock or raises _AdaptError with the reason.
FOREIGN_BLOCKS: dict[str, tuple[Callable[[nn.Module], bool],
                                Callable[[nn.Module], ForeignRepBlock]]] = {
    'mmpretrain.RepVGGBlock': (lambda m: hasattr(m, 'branch_3x3'), _read_mmpretrain_repvgg),
    'mmpretrain.MobileOneBlock': (lambda m: hasattr(m, 'branch_conv_list'),
                                  _read_mmpretrain_mobileone),
    'yolo.RepVGGBlock': (lambda m: hasattr(m, 'rbr_dense'), _read_yolo_repvgg),
}

#: attributes that mark a module as a (foreign) rep block
_REP_MARKERS = ('branch_3x3', 'branch_1x1', 'branch_conv_list', 'branch_scale', 'rbr_dense',
                'rbr_1x1', 'rbr_identity')


def _family(m: nn.Module, name: str) -> str | None:
    """``'ours'``, a key of :data:`FOREIGN_BLOCKS`, or ``None``; raises for look-alikes."""
    if isinstance(m, RepBlock):
        return 'ours'
    if not any(hasattr(m, a) for a in _REP_MARKERS) or _is_deployed(m):
        return None
    for family, (matches, _) in FOREIGN_BLOCKS.items():
        if matches(m):
            return family
    markers = [a for a in _REP_MARKERS if hasattr(m, a)]
    raise ValueError(f'module {name or "<root>"!r} ({type(m).__name__}) looks like a '
                     f're-parameterized block (has {markers}) but matches no known family '
                     f'{sorted(FOREIGN_BLOCKS)}')


@torch.no_grad()
def _verify(foreign: nn.Module, blk: RepBlock) -> None:
    """Check once, in eval mode on a small random input, that ``blk`` computes what
    ``foreign`` computes (float32 tensors on a real device only)."""
    p = blk.branches[0][0].weight
    if p.dtype != torch.float32 or p.device.type == 'meta':
        return
    size = max(blk.kernel_size) + 4
    gen = torch.Generator().manual_seed(0)          # leave the global RNG untouched
    x = torch.randn(2, blk.in_channels, size, size, generator=gen).to(p.device)
    modes = [(m, m.training) for m in (*foreign.modules(), *blk.modules())]
    try:
        foreign.eval()
        blk.eval()
        ref, out = foreign(x), blk(x)
    except Exception as e:  # noqa: BLE001 (reported with the module path by the caller)
        raise _AdaptError(f'checking the adapted block against the original forward '
                          f'failed: {type(e).__name__}: {e}') from e
    finally:
        for m, mode in modes:
            m.training = mode
    tol = 1e-4 * max(1.0, float(ref.abs().max()))
    if ref.shape != out.shape or not torch.allclose(out, ref, rtol=1e-4, atol=tol,
                                                    equal_nan=True):
        diff = (out - ref).abs().max().item() if ref.shape == out.shape else 'shape mismatch'
        raise _AdaptError(f'the adapted block does not reproduce the forward of '
                          f'{type(foreign).__name__} (max abs diff {diff}): its forward '
                          f'differs from the known layout of {blk.source}')


def _adapt(name: str, m: nn.Module, family: str) -> ForeignRepBlock:
    try:
        blk = FOREIGN_BLOCKS[family][1](m)
        reused = {id(mod) for mod in m.modules()}
        for mod in blk.modules():           # reused BN / act keep their own mode
            if id(mod) not in reused:
                mod.training = m.training
        _verify(m, blk)
    except _AdaptError as e:
        raise ValueError(f'cannot convert {name or "<root>"!r} ({type(m).__name__}, read as '
                         f'{family}): {e}') from None
    return blk


# --------------------------------------------------------------------------------------
# walking and replacing
# --------------------------------------------------------------------------------------
def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + '.') or fnmatch.fnmatchcase(name, p)
               for p in skip)


def _walk(module: nn.Module, name: str, skip: tuple[str, ...]
          ) -> Iterator[tuple[str, nn.Module, str | None]]:
    """``(name, module, family)`` in registration order, every path of shared modules.

    Does not descend into skipped modules, into rep blocks (except a RepBlock's ``act``:
    an SE there holds plain convs) or into ``nn.MultiheadAttention`` (it reads its
    ``out_proj`` weight directly, so replacing that Linear would change nothing).
    """
    if name and _skipped(name, skip):
        return
    family = _family(module, name)
    yield name, module, family
    if family is not None and family != 'ours' or isinstance(module, nn.MultiheadAttention):
        return
    children = [('act', module.act)] if family == 'ours' else module.named_children()
    for n, child in children:
        yield from _walk(child, f'{name}.{n}' if name else n, skip)


def _replace(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent, _, attr = name.rpartition('.')
    setattr(root.get_submodule(parent) if parent else root, attr, new)
    return root


def _unique(items: Iterable[tuple[str, nn.Module]]) -> list[tuple[nn.Module, list[str]]]:
    """Group paths by module (a shared module is replaced by one shared new module)."""
    out: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, m in items:
        out.setdefault(id(m), (m, []))[1].append(name)
    return list(out.values())


def _adapt_foreign(model: nn.Module, skip: tuple[str, ...],
                   undo: list | None = None) -> nn.Module:
    """Replace every foreign rep block by its adapted form. All blocks are read first, so a
    block that cannot be read leaves ``model`` unchanged; ``undo`` (when given) receives
    ``(name, original)`` for :func:`_rollback`."""
    found = [(n, m, f) for n, m, f in _walk(model, '', skip) if f not in (None, 'ours')]
    families = {id(m): f for _, m, f in found}
    adapted = [(m, names, _adapt(names[0], m, families[id(m)]))
               for m, names in _unique((n, m) for n, m, _ in found)]
    for m, names, blk in adapted:
        for name in names:
            model = _replace(model, name, blk)
            if undo is not None:
                undo.append((name, m))
    return model


def _rollback(model: nn.Module, undo: list) -> nn.Module:
    for name, original in reversed(undo):
        model = _replace(model, name, original)
    return model


def _check_skip(model: nn.Module, skip: tuple[str, ...]) -> None:
    """Every ``skip`` entry must be a string naming (or matching) a module of ``model``."""
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    for p in skip:
        if not isinstance(p, str) or not p:
            raise ValueError(f'skip entries must be module names or fnmatch patterns '
                             f'(non-empty strings), got {p!r}')
        if not any(_skipped(n, (p,)) for n in names):
            top = [n for n, _ in model.named_children()]
            raise ValueError(f'skip entry {p!r} matches no module of the model: skip takes '
                             f"module names or fnmatch patterns (e.g. 'backbone.stem', "
                             f"'head.*'), not layer types; top-level modules: {top[:12]}")


def check_layer_bits(layer_bits) -> dict[str, int]:
    """Validate a ``layer_bits`` mapping (see :func:`convert_to_repq`); returns a copy."""
    if layer_bits is None:
        return {}
    if not isinstance(layer_bits, dict):
        raise ValueError(f'layer_bits must be a dict {{module name or pattern: bits}}, got '
                         f'{type(layer_bits).__name__}: {layer_bits!r}')
    for p, bits in layer_bits.items():
        if not isinstance(p, str) or not p:
            raise ValueError(f'layer_bits keys must be module names or fnmatch patterns '
                             f'(non-empty strings), got {p!r}')
        try:
            check_bits(bits)
        except ValueError as e:
            raise ValueError(f'layer_bits[{p!r}]: {e}') from None
    return dict(layer_bits)


def _unmatched_layer_bits(layer_bits: dict[str, int], names: list[str]) -> None:
    for p in layer_bits:
        if not any(_skipped(n, (p,)) for n in names):
            have = (f'quantized layers include {names[:3]} ... {names[-3:]}' if names else
                    'the model has no layer left to quantize')
            raise ValueError(f'layer_bits entry {p!r} matches no quantized layer; {have}')


def find_rep_blocks(model: nn.Module, skip: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """The re-parameterized blocks of ``model`` as ``(name, module)``, in registration order:
    our :class:`RepBlock` s and not yet deployed foreign blocks (:data:`FOREIGN_BLOCKS`).

    Raises ``ValueError`` for a module that looks like a rep block (``rbr_dense``,
    ``branch_3x3``, ...) but matches no known family.

    Example:
        >>> from repq_mm.rep import RepVGGBlock
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), RepVGGBlock(8, 8))
        >>> [(name, type(m).__name__) for name, m in find_rep_blocks(net)]
        [('1', 'RepVGGBlock')]
    """
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    return [(n, m) for n, m, f in _walk(model, '', skip) if f is not None]


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
_WRAPPER_MODULES = ('mmcv.cnn.bricks.wrappers',)   # Conv2d/Linear that only add empty-input handling


def _plain_kind(m: nn.Module, name: str) -> type | None:
    """``QConv2d`` / ``QLinear`` for a plain conv / linear that can be quantized."""
    for base, qcls in ((nn.Conv2d, QConv2d), (nn.Linear, QLinear)):
        if not isinstance(m, base) or isinstance(m, qcls):
            continue
        cls = type(m)
        if cls.forward is base.forward or cls.__module__ in _WRAPPER_MODULES:
            return qcls
        warnings.warn(f'{name!r}: {cls.__name__} overrides forward(); left unquantized')
    return None


def _quantized_copy(m: nn.Module, qcls: type, qcfg: QConfig, name: str) -> nn.Module:
    try:
        q = qcls.from_float(m, qcfg)
    except ValueError as e:
        raise ValueError(f'cannot quantize {name or "<root>"!r}: {e}') from None
    q.weight.requires_grad_(m.weight.requires_grad)
    if m.bias is not None:
        q.bias.requires_grad_(m.bias.requires_grad)
    return q.train(m.training)


def convert_to_repq(model: nn.Module, w_bits: int = 8, a_bits: int = 8,
                    bn_mode: str = 'exact', per_channel: bool = False,
                    first_bits: int | None = None, last_bits: int | None = None,
                    act_signed: bool | str = 'auto', symmetric: bool = False,
                    impl: str = 'fast', quantize: bool = True, quantize_plain: bool = True,
                    skip: Iterable[str] = (), inplace: bool = True,
                    qcfg: QConfig | None = None, est_refresh: int = 0,
                    init: str = 'lsq', layer_bits: dict[str, int] | None = None) -> nn.Module:
    """Convert ``model`` for RepQ quantization-aware training.

    1. Foreign rep blocks (:data:`FOREIGN_BLOCKS`: mmpretrain ``RepVGGBlock`` /
       ``MobileOneBlock``, YOLOv6 ``RepVGGBlock`` / ``QARepVGGBlock``, YOLOv7 ``RepConv``)
       are read into a :class:`ForeignRepBlock` (same parameters and BN modules).
    2. Every rep block gets ``enable_repq(qcfg, quantize)``: forward
       ``act(conv(Q_a(x), Q_w(M), B))`` with the merged kernel ``M``.
    3. With ``quantize`` and ``quantize_plain``, every other ``nn.Conv2d`` / ``nn.Linear``
       (including those in a rep block's ``act``, e.g. SE) becomes ``QConv2d`` / ``QLinear``.

    With ``quantize=False`` the converted model computes what ``model`` computes, in eval
    and in train mode (running statistics included, ``bn_mode='exact'``), to float rounding.

    Args:
        model: any module (a rep block or conv at the root is replaced too).
        w_bits, a_bits: weight / activation bit widths (2..8).
        bn_mode: ``'exact'`` (RepQ-BN) or ``'est'`` (RepQ-BNEst).
        per_channel, act_signed, symmetric, impl, est_refresh, init: see
            :class:`~repq_mm.quant.QConfig`.
        first_bits, last_bits: bit width (weights and activations) of the first and the
            last quantized layer in registration order (``None``: as the rest). When one
            layer is both, ``last_bits`` wins.
        layer_bits: ``{name or fnmatch pattern: bits}`` for any quantized layer (weights
            and activations; a pattern also matches the layers below a named module, as in
            ``skip``), applied after ``first_bits`` / ``last_bits``; later entries win.
            Every entry must match at least one quantized layer. E.g. a detector's
            per-level output convs: ``{'bbox_head.rtm_cls': 8, 'bbox_head.rtm_reg': 8}``.
        quantize: add quantizers; ``False`` only switches rep blocks to the merged forward.
        quantize_plain: also quantize plain convs / linears.
        skip: module names or ``fnmatch`` patterns left untouched, with their children.
        inplace: modify ``model`` (``False``: work on a deep copy).
        qcfg: a full :class:`QConfig`; when given it replaces ``w_bits``, ``a_bits``,
            ``bn_mode``, ``per_channel``, ``act_signed``, ``symmetric``, ``impl``,
            ``est_refresh`` and ``init``.

    Returns:
        The converted model (the same object when ``inplace`` unless the root was replaced).

    Raises:
        ValueError: a bad bit width (naming the value), or a module that looks like a rep
            block but cannot be read (naming its path and the reason).

    Example:
        >>> from repq_mm.rep import RepVGGBlock
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), RepVGGBlock(8, 8, act=nn.ReLU()),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        >>> qnet = convert_to_repq(net, w_bits=4, a_bits=4, first_bits=8, last_bits=8,
        ...                        inplace=False)
        >>> [type(m).__name__ for m in qnet if not isinstance(m, (nn.AdaptiveAvgPool2d,
        ...                                                        nn.Flatten))]
        ['QConv2d', 'RepVGGBlock', 'QLinear']
        >>> qnet[0].w_quant.bits, qnet[1].w_quant.bits, qnet[4].a_quant.bits
        (8, 4, 8)
        >>> qnet(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 10])
    """
    for arg, bits in (('w_bits', w_bits), ('a_bits', a_bits), ('first_bits', first_bits),
                      ('last_bits', last_bits)):
        if bits is not None or arg in ('w_bits', 'a_bits'):
            try:
                check_bits(bits)
            except ValueError as e:
                raise ValueError(f'{arg}: {e}') from None
    layer_bits = check_layer_bits(layer_bits)
    if qcfg is None:
        qcfg = QConfig(w_bits=w_bits, a_bits=a_bits, per_channel=per_channel, bn_mode=bn_mode,
                       act_signed=act_signed, symmetric=symmetric, impl=impl,
                       est_refresh=est_refresh, init=init)
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    _check_skip(model, skip)
    if not inplace:
        model = copy.deepcopy(model)
    # nothing is changed unless everything can be converted: foreign blocks are all read
    # before any is replaced, quantized copies all built before any is put in place
    undo: list = []
    model = _adapt_foreign(model, skip, undo)

    plain = quantize and quantize_plain
    targets = []                              # (name, module, QConv2d/QLinear or None)
    for name, m, family in _walk(model, '', skip):
        if family is not None:
            if not (m.w_quant is not None or m.a_quant is not None):   # not converted yet
                targets.append((name, m, None))
        elif plain and (qcls := _plain_kind(m, name)) is not None:
            targets.append((name, m, qcls))
    kinds = {id(m): qcls for _, m, qcls in targets}
    groups = _unique((n, m) for n, m, _ in targets)
    plan = []
    try:
        if quantize:
            _unmatched_layer_bits(layer_bits, [n for _, names in groups for n in names])
        for i, (m, names) in enumerate(groups):
            cfg = qcfg
            for bits, here in ((first_bits, i == 0), (last_bits, i == len(groups) - 1),
                               *((b, any(_skipped(n, (p,)) for n in names))
                                 for p, b in layer_bits.items())):
                if bits is not None and here:
                    cfg = cfg.replace(w_bits=bits, a_bits=bits)
            if kinds[id(m)] is None:
                try:
                    m.check_repq()
                except ValueError as e:
                    raise ValueError(f'cannot convert {names[0] or "<root>"!r}: {e}') from None
            q = None if kinds[id(m)] is None else _quantized_copy(m, kinds[id(m)], cfg,
                                                                   names[0])
            plan.append((m, names, cfg, q))
    except BaseException:
        _rollback(model, undo)
        raise
    for m, names, cfg, q in plan:
        if q is None:
            m.enable_repq(cfg, quantize)
            continue
        for name in names:
            model = _replace(model, name, q)
    for name, mod in model.named_modules():     # names for error messages
        if isinstance(mod, LSQQuantizer):
            mod.name = name
    install_est_refresh_schedule(model)
    return model


def merge_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every rep block (foreign ones are read first) by its ``to_deploy()`` form:
    one ``nn.Conv2d`` (full precision) or ``QConv2d`` (quantized, weight already on the
    integer grid), followed by the block's ``act``; the weights of the other quantized
    ``QConv2d`` / ``QLinear`` layers are put on their grid too (:func:`snap_to_grid`), so
    every quantized weight of the result is ``codes * scale``.

    In eval mode the result computes what ``model`` computes (to float rounding; for a RepQ
    model exactly its quantized eval output). On a full-precision model this gives the
    single-branch network of the paper's LSQ baseline:
    ``convert_to_repq(merge_model(fp_model))``.

    Args:
        model: any module.
        inplace: modify ``model`` (default: work on a deep copy).

    Example:
        >>> from repq_mm.rep import RepVGGBlock
        >>> net = nn.Sequential(RepVGGBlock(4, 8), RepVGGBlock(8, 8, act=nn.ReLU())).eval()
        >>> merged = merge_model(net)
        >>> merged
        Sequential(
          (0): Conv2d(4, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
          (1): Sequential(
            (0): Conv2d(8, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
            (1): ReLU()
          )
        )
        >>> x = torch.randn(2, 4, 8, 8)
        >>> torch.allclose(net(x), merged(x), atol=1e-5)
        True
    """
    if not inplace:
        model = copy.deepcopy(model)
    model = _adapt_foreign(model, ())
    for blk, names in _unique(find_rep_blocks(model)):
        deployed = blk.to_deploy()
        deployed.training = blk.training          # the new conv / Sequential; act keeps its own
        if isinstance(deployed, nn.Sequential):
            deployed[0].training = blk.training
        for name in names:
            model = _replace(model, name, deployed)
    snap_to_grid(model)
    return model


@torch.no_grad()
def snap_to_grid(model: nn.Module) -> int:
    """``weight <- Q_w(weight)`` for every ``QConv2d`` / ``QLinear`` whose weight quantizer
    is enabled and initialised (what their forward uses anyway, so outputs do not change).
    Returns the number of layers."""
    n = 0
    for m in model.modules():
        q = getattr(m, 'w_quant', None)
        if isinstance(m, (QConv2d, QLinear)) and q is not None and q.enabled and \
                q.is_initialized:
            m.weight.copy_(q(m.weight))
            n += 1
    return n
