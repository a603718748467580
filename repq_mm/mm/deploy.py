"""From a QAT checkpoint to a deploy checkpoint (``tools/merge_quant.py``).

:func:`merge_checkpoint` builds the QAT model of a config, loads a checkpoint into it,
merges every rep block into one conv (:func:`~repq_mm.convert.merge_model`), checks on real
batches that the merged model computes what the QAT model computes in eval mode, and writes

* ``deploy_config.py``: the config with ``model.repq.deploy=True`` and ``load_from`` set to
  ``merged.pth`` (the stock mmpretrain ``tools/test.py`` evaluates it as it is);
* ``merged.pth``: ``{'meta': {...}, 'state_dict': <deploy model>}``, loadable with
  ``torch.load(weights_only=True)``;
* ``int_weights.pth``: integer weight codes (int8) and step sizes of every quantized
  conv / linear (``weight == codes * scale``), activation step sizes and layer geometry.

Everything is written to a temporary folder next to ``out_dir`` and moved into place at the
end, so an interrupted run leaves nothing half-written.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import os.path as osp

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from torch import nn

from ..convert import merge_model
from ..io import atomic_dir, flatten_tensors
from ..quant import QConv2d, QLinear
from .checkpoint import safe_load
from .model import check_repq_cfg
from .pipeline import (build_repq_model, eval_dataloader, load_qat_model, repq_model_cfg,
                       repq_settings)

FILES = ('deploy_config.py', 'merged.pth', 'int_weights.pth')


class MergeError(RuntimeError):
    """A merge that must not produce output (mismatch, refused output folder, bad input)."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def export_int_weights(model: nn.Module) -> dict:
    """``{name: record}`` for every ``QConv2d`` / ``QLinear`` with a weight quantizer:
    ``codes`` (int8), ``scale`` (weight step, per tensor or per output channel), ``bias``,
    bit widths, activation step / signedness and the layer geometry. Verifies
    ``codes * scale == weight``."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, (QConv2d, QLinear)) or m.w_quant is None:
            continue
        w = m.weight.detach()
        codes, scale = m.w_quant.quantize_to_codes(w)
        sb = scale.reshape([-1] + [1] * (w.dim() - 1)) if m.w_quant.per_channel else scale
        err = (codes.float() * sb - w).abs().max().item() if w.numel() else 0.0
        if err > 1e-5 * max(float(sb.max()), 1e-12):
            raise MergeError(f'{name}: weight is not on its integer grid (max |codes*scale - '
                             f'weight| = {err:.3g}); merge it with repq_mm.merge_model first')
        rec = dict(kind='conv' if isinstance(m, QConv2d) else 'linear',
                   codes=codes.cpu(), scale=scale.cpu().float(),
                   w_bits=m.w_quant.bits, per_channel=bool(m.w_quant.per_channel),
                   bias=None if m.bias is None else m.bias.detach().cpu().float(),
                   weight_shape=tuple(w.shape))
        if isinstance(m, QConv2d):
            rec.update(stride=tuple(m.stride), padding=tuple(m.padding),
                       dilation=tuple(m.dilation), groups=m.groups)
        a = m.a_quant
        if a is not None and a.is_initialized:
            rec.update(a_scale=a.scale().detach().cpu().float(), a_bits=a.bits,
                       a_signed=bool(a.is_signed), a_qrange=tuple(a.qrange))
        out[name] = rec
    return out


@torch.no_grad()
def compare(qat: nn.Module, deploy: nn.Module, dataloader, num_batches: int) -> dict:
    """Run ``num_batches`` batches through both models (eval, ``mode='tensor'``).

    Returns ``max_abs``, ``rel`` (max abs diff / max |QAT output|), ``argmax_agree`` (share
    of samples whose top-1 class agrees, 2-D outputs only) and ``batches``.
    """
    qat.eval()
    deploy.eval()
    max_abs, ref_max, agree, total, done = 0.0, 0.0, 0, 0, 0
    for batch in dataloader:
        data = qat.data_preprocessor(batch, False)
        a = flatten_tensors(qat(**data, mode='tensor'))
        b = flatten_tensors(deploy(**data, mode='tensor'))
        if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
            raise MergeError('the deploy model returns outputs of other shapes than the QAT '
                             'model')
        for x, y in zip(a, b):
            max_abs = max(max_abs, (x.float() - y.float()).abs().max().item())
            ref_max = max(ref_max, x.float().abs().max().item())
            if x.dim() == 2:
                agree += int((x.argmax(1) == y.argmax(1)).sum())
                total += x.shape[0]
        done += 1
        if done >= num_batches:
            break
    return dict(max_abs=max_abs, rel=max_abs / max(ref_max, 1e-12),
                argmax_agree=agree / total if total else None, batches=done)


def _check_out_dir(out_dir: str, fingerprint: str, overwrite: bool) -> None:
    if not osp.exists(out_dir):
        return
    if not osp.isdir(out_dir):
        raise MergeError(f'{out_dir} exists and is not a folder')
    if not os.listdir(out_dir) or overwrite:
        return
    merged = osp.join(out_dir, 'merged.pth')
    old = None
    if osp.isfile(merged):
        try:
            old = safe_load(merged).get('meta', {}).get('fingerprint')
        except Exception:  # unreadable: a different (or broken) model
            old = None
    if old != fingerprint:
        raise MergeError(f'{out_dir} already holds a different model (or other files); pass '
                         '--overwrite to replace it')


def merge_checkpoint(cfg: Config, checkpoint: str, out_dir: str, overwrite: bool = False,
                     check_batches: int = 1, tol: float = 1e-4) -> dict:
    """Merge a QAT checkpoint of ``cfg`` (a config whose model is a ``RepQModel``) into a
    deploy checkpoint under ``out_dir``.

    Raises :class:`MergeError` when the output folder holds another model (and not
    ``overwrite``), or when the merged model disagrees with the QAT model beyond ``tol``
    (relative to the largest QAT output). Returns the comparison and the written paths.
    """
    model_cfg = repq_model_cfg(cfg, MergeError)
    repq = repq_settings(cfg)
    if check_repq_cfg(repq)['deploy']:
        raise MergeError('the config is already a deploy config (repq.deploy=True)')
    if check_batches < 1:
        raise MergeError('--check-batches must be >= 1')
    checkpoint = osp.abspath(checkpoint)
    if not osp.isfile(checkpoint):
        raise MergeError(f'checkpoint {checkpoint} does not exist')
    out_dir = osp.abspath(out_dir)
    fingerprint = hashlib.sha256(
        (_sha256(checkpoint) + json.dumps(repq, sort_keys=True, default=str)
         + cfg.pretty_text).encode()).hexdigest()
    _check_out_dir(out_dir, fingerprint, overwrite)
    # the QAT model with the checkpoint's weights (init_checkpoint is not needed)
    qat, ck, _ = load_qat_model(cfg, checkpoint, error=MergeError)
    deploy = merge_model(qat, inplace=False).eval()   # weights on the integer grid

    # the deploy config, and the model it builds must take the merged weights exactly
    deploy_model_cfg = copy.deepcopy(model_cfg)
    deploy_model_cfg['repq'] = {**repq, 'deploy': True}
    deploy_model_cfg['init_checkpoint'] = None
    rebuilt = build_repq_model(cfg, dict(deploy=True), MergeError)
    state = deploy.state_dict()
    rebuilt.load_state_dict(state, strict=True)
    rebuilt.eval()

    source, loader = eval_dataloader(cfg, MergeError)
    res = compare(qat, deploy, loader, check_batches)
    res2 = compare(qat, rebuilt, loader, check_batches)
    res['rebuilt_rel'] = res2['rel']
    res['source'] = source
    agree = 'n/a' if res['argmax_agree'] is None else f'{100 * res["argmax_agree"]:.2f}%'
    print_log(f'merge check on {res["batches"]} {source} batch(es): max abs diff '
              f'{res["max_abs"]:.3g} (relative {res["rel"]:.3g}), argmax agreement {agree}; '
              f'deploy config rebuilt: relative {res2["rel"]:.3g}', logger='current')
    if not (res['rel'] <= tol and res2['rel'] <= tol):
        raise MergeError(f'the merged model disagrees with the QAT model: relative max abs '
                         f'diff {max(res["rel"], res2["rel"]):.3g} > {tol:g}')

    ints = export_int_weights(deploy)
    meta = dict(repq_mm_version=_version(), source_checkpoint=checkpoint,
                fingerprint=fingerprint, repq={**repq, 'deploy': True},
                check=dict(max_abs=res['max_abs'], rel=res['rel'],
                           argmax_agree=res['argmax_agree'], batches=res['batches']))
    src_meta = ck.get('meta', {}) if isinstance(ck, dict) else {}
    for key in ('dataset_meta', 'epoch', 'iter'):
        if key in src_meta:
            try:
                json.dumps(src_meta[key])
                meta[key] = src_meta[key]
            except (TypeError, ValueError):
                pass

    out_cfg = Config(copy.deepcopy(cfg.to_dict()))
    out_cfg.model = deploy_model_cfg
    out_cfg.load_from = osp.join(out_dir, 'merged.pth')
    out_cfg.resume = False

    with atomic_dir(out_dir) as tmp:
        out_cfg.dump(osp.join(tmp, 'deploy_config.py'))
        torch.save({'meta': meta, 'state_dict': state}, osp.join(tmp, 'merged.pth'))
        torch.save({'meta': {k: meta[k] for k in ('repq_mm_version', 'source_checkpoint',
                                                  'fingerprint', 'repq')},
                    'layers': ints}, osp.join(tmp, 'int_weights.pth'))
        # everything must load back with weights_only=True
        for f in ('merged.pth', 'int_weights.pth'):
            torch.load(osp.join(tmp, f), map_location='cpu', weights_only=True)
    res.update(files={f: osp.join(out_dir, f) for f in FILES}, int_layers=len(ints))
    print_log(f'wrote {out_dir}: {", ".join(FILES)} ({len(ints)} quantized layer(s))',
              logger='current')
    return res


def _version() -> str:
    from .. import __version__
    return __version__

