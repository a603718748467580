"""ONNX export of a RepQ config + checkpoint (``tools/export_onnx.py``).

:func:`export_checkpoint` builds the model of a config (a QAT config with a ``repq`` dict, or
the ``deploy_config.py`` that ``tools/merge_quant.py`` writes), loads the checkpoint, merges
every rep block (:func:`~repq_mm.convert.merge_model`; optionally also writing the full
``merge_quant`` output folder), exports the integer QDQ model
(:func:`repq_mm.export.export_onnx`) and, optionally, the same merged model in float32 for
reference, and checks the ONNX model with onnxruntime against the PyTorch fake-quant merged
model on real images (in the graph as written and in onnxruntime's optimised graph, the
integer kernels). Files are written to a temporary name and moved into place only after the
check passed.

:func:`evaluate_onnx` runs an exported model through onnxruntime over the config's test set
with the config's evaluator (the model's own post-processing, :class:`OnnxPredictor`) next to
the PyTorch merged model (``tools/analysis_tools/onnx_eval.py``).
"""
from __future__ import annotations

import contextlib
import copy
import os
import os.path as osp
import time

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from torch import nn

from ..export import (ExportError, _int32_layers, compare_onnx, export_fp32_onnx,
                      export_onnx, snap_bias_to_int32, summary_lines)
from ..io import atomic_path
from .pipeline import EVAL_SPLITS, build_repq_model, eval_dataloader, load_qat_model  # noqa: F401


def build_merged_model(cfg: Config, checkpoint: str) -> tuple[nn.Module, bool]:
    """The merged (deploy-form) model of ``cfg`` with the weights of ``checkpoint``, in eval
    mode, and whether ``cfg`` was a deploy config (:func:`.pipeline.load_qat_model`; errors
    as :class:`~repq_mm.export.ExportError`)."""
    model, _, settings = load_qat_model(cfg, checkpoint, merge=True, error=ExportError)
    return model, settings['deploy']


def _pipeline(cfg, channels: int):
    """The config's test (else val) pipeline with an image loader in front."""
    from mmengine.dataset import Compose
    for key in EVAL_SPLITS:
        dl = cfg.get(key, None)
        if dl and dl.get('dataset', None) is not None:
            pipeline = list(dl['dataset'].get('pipeline', []))
            break
    else:
        pipeline = [dict(type='PackInputs')]
    pipeline = [t for t in pipeline if not str(t.get('type', '')).startswith('Load')]
    load = dict(type='LoadImageFromFile', color_type='grayscale' if channels == 1 else 'color')
    return Compose([load] + copy.deepcopy(pipeline))


@torch.no_grad()
def load_images(cfg, model: nn.Module, paths, channels: int, with_samples: bool = False):
    """Image files through the config's test pipeline and the model's data preprocessor:
    the normalised batch the exported network takes (and, ``with_samples``, the data
    samples with their image metas, for a detector's post-processing)."""
    pipe = _pipeline(cfg, channels)
    inputs, samples = [], []
    for p in paths:
        if not osp.isfile(p):
            raise ExportError(f'check image {p} does not exist')
        out = pipe(dict(img_path=p, img_id=len(inputs)))
        if out is None:
            raise ExportError(f'the test pipeline dropped {p}')
        inputs.append(out['inputs'])
        samples.append(out.get('data_samples', None))
    has_samples = all(d is not None for d in samples)
    data = model.data_preprocessor(dict(inputs=inputs, data_samples=samples if has_samples
                                        else None), False)
    batch = data['inputs'].float()
    return (batch, data.get('data_samples', None)) if with_samples else batch


def _restructure(template, flat: list):
    """``template`` (nested lists / tuples of tensors) with its tensors replaced in order."""
    it = iter(flat)

    def rec(t):
        if isinstance(t, torch.Tensor):
            return torch.as_tensor(next(it))
        if isinstance(t, (list, tuple)):
            return type(t)(rec(v) for v in t)
        return t
    return rec(template)


@torch.no_grad()
def compare_detections(model: nn.Module, batch: torch.Tensor, samples, onnx_outputs: list,
                       score_thr: float = 0.3) -> dict | None:
    """Run the detector head's own post-processing (``predict_by_feat``: decoding, NMS)
    on the PyTorch and on the onnxruntime head outputs and compare the detections with
    score >= ``score_thr``: their numbers, the smallest best-match IoU of a PyTorch box
    among the ONNX boxes, and the largest score difference of matched boxes. ``None`` for
    a model without a ``bbox_head.predict_by_feat``."""
    from mmdet.structures.bbox import bbox_overlaps
    det = getattr(model, 'architecture', model)
    head = getattr(det, 'bbox_head', None)
    if head is None or not hasattr(head, 'predict_by_feat') or samples is None:
        return None
    feats = det.extract_feat(batch)
    struct = head(feats)
    metas = [s.metainfo for s in samples]
    ref = head.predict_by_feat(*struct, batch_img_metas=metas, rescale=True)
    got = head.predict_by_feat(*_restructure(struct, onnx_outputs), batch_img_metas=metas,
                               rescale=True)
    n_ref = n_got = 0
    min_iou, max_score = 1.0, 0.0
    for r, g in zip(ref, got):
        r, g = r[r.scores >= score_thr], g[g.scores >= score_thr]
        n_ref, n_got = n_ref + len(r), n_got + len(g)
        if len(r) == 0:
            continue
        if len(g) == 0:
            min_iou = 0.0
            continue
        iou = bbox_overlaps(r.bboxes, g.bboxes)
        best, idx = iou.max(1)
        min_iou = min(min_iou, float(best.min()))
        max_score = max(max_score, float((r.scores - g.scores[idx]).abs().max()))
    return dict(score_thr=score_thr, torch=n_ref, onnx=n_got, min_iou=min_iou,
                max_score_diff=max_score)


def _worst_code(act_codes: dict) -> int:
    return max((c['max_diff'] for c in act_codes.values()), default=0)


def check_lines(res: dict) -> list[str]:
    """Human-readable lines for the ``check`` result of :func:`export_checkpoint`."""
    free = res['free']
    lines = [f'{res["batch"]} image(s), layer by layer (each layer fed the same integer '
             f'input in both engines): max |onnxruntime - PyTorch| = {res["max_abs"]:.3g} '
             f'(each output within one quantization step of its layer; largest such step '
             f'{res["one_step"]:.3g}); activation codes off by at most '
             f'{_worst_code(res["act_codes"])}. End to end (each engine on its own codes): '
             f'max abs diff {free["max_abs"]:.3g}, codes off by at most '
             f'{_worst_code(free["act_codes"])}; argmax agreement {res["argmax_agree"]}']
    dep = res.get('deployed')
    if dep is not None:
        k = dep['kernels']
        lines.append(f'onnxruntime-optimised graph ({k["integer"]} integer conv/linear '
                     f'kernels, {k["float"]} float; {dep["threads"]} thread(s)), layer by '
                     f'layer: max |onnxruntime - PyTorch| = {dep["max_abs"]:.3g}, activation '
                     f'codes off by at most {_worst_code(dep["act_codes"])}; outputs vs the '
                     f'graph as written: {dep["vs_graph"]:.3g}')
    if res.get('bias_effect') is not None:
        lines.append(f'int32 biases (used by the PyTorch reference too) move the outputs by '
                     f'at most {res["bias_effect"]:.3g} against float biases')
    d = res.get('detections')
    if d is not None:
        lines.append(f'detections with score >= {d["score_thr"]} after the head\'s '
                     f'post-processing: PyTorch {d["torch"]}, onnxruntime {d["onnx"]}; '
                     f'smallest best-match IoU {d["min_iou"]:.4f}, largest score difference '
                     f'{d["max_score_diff"]:.3g}')
    return lines


def check_failures(res: dict) -> list[str]:
    """What makes a :func:`~repq_mm.export.compare_onnx` result a failed export check
    (empty: passed): an output beyond one quantization step of its layer, or activation
    codes more than one step off, in the graph as written or in onnxruntime's optimised
    graph (``deployed``)."""
    bad = []
    for tag, r in (('graph as written', res), ('optimised graph', res.get('deployed'))):
        if r is None:
            continue
        bad += [f'{tag}: output {i}: {d:.3g} > {t:.3g}' for i, (d, t) in
                enumerate(zip(r['diffs'], res['tolerances'])) if t is not None and d > t]
        worst = _worst_code(r['act_codes'])
        if worst > 1:
            bad.append(f'{tag}: activation codes off by {worst}')
    return bad


def _channels(model: nn.Module, default: int = 3) -> int:
    dp = getattr(model, 'data_preprocessor', None)
    mean = getattr(dp, 'mean', None)
    return int(mean.numel()) if isinstance(mean, torch.Tensor) else default


def export_checkpoint(cfg: Config, checkpoint: str, out: str, input_shape=None,
                      fp32_out: str | None = None, check_images=(), merged_dir=None,
                      overwrite: bool = False, opset: int = 17,
                      check_batch: torch.Tensor | None = None,
                      int32_bias: bool | None = None, form: str = 'fused',
                      weight_dtype: str = 'auto', check_deployed: bool = True,
                      threads: int = 1) -> dict:
    """Export ``checkpoint`` of ``cfg`` as an integer ONNX model to ``out``.

    Args:
        cfg: the config, through :func:`~repq_mm.mm.cli.prepare_cfg`.
        checkpoint: a QAT checkpoint of ``cfg``, or ``merged.pth`` with a deploy config.
        out: the ONNX file.
        input_shape: ``(N, C, H, W)`` of the example input; default: the shape of the
            preprocessed check images, else ``(1, C, 224, 224)`` with ``C`` from the data
            preprocessor. The batch dimension is dynamic.
        fp32_out: also write the same merged model, quantizers disabled, in float32.
        check_images: image files run through the test pipeline and compared
            (onnxruntime vs PyTorch). ``check_batch``: a ready, preprocessed batch instead.
        merged_dir: also write the ``tools/merge_quant.py`` output folder there (QAT
            configs only; refused when it holds another model unless ``overwrite``).
        int32_bias, form, weight_dtype: the graph form (:func:`repq_mm.export.export_onnx`;
            default: the ``'fused'`` form onnxruntime runs as integer kernels).
        check_deployed: the check also runs onnxruntime's optimised graph (the integer
            kernels; ``threads`` threads) layer by layer.

    Returns the export info with ``check`` (see :func:`repq_mm.export.compare_onnx`) and
    ``fp32`` (size info) when asked. Raises :class:`ExportError` (nothing written) for bad
    input or when the check finds a difference beyond one quantization step (in the graph
    as written or, with ``check_deployed``, in onnxruntime's integer kernels).
    """
    model, was_deploy = build_merged_model(cfg, checkpoint)
    channels = _channels(model)
    batch, samples = check_batch, None
    if check_images:
        batch, samples = load_images(cfg, model, check_images, channels, with_samples=True)
    if input_shape is None:
        input_shape = (1, *batch.shape[1:]) if batch is not None else (1, channels, 224, 224)
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 4 or min(input_shape) < 1:
        raise ExportError(f'--input-shape must be 4 positive ints N C H W, got {input_shape}')
    if batch is not None and tuple(batch.shape[1:]) != input_shape[1:]:
        raise ExportError(f'check images give inputs of shape {tuple(batch.shape[1:])}, the '
                          f'export input shape is {input_shape[1:]}')
    if merged_dir is not None:
        if was_deploy:
            raise ExportError('--merged-dir needs a QAT config and checkpoint (this is '
                              'already a deploy config)')
        from .deploy import MergeError, merge_checkpoint
        try:
            merge_checkpoint(cfg, checkpoint, merged_dir, overwrite=overwrite)
        except MergeError as e:
            raise ExportError(f'merge into {merged_dir}: {e}') from None

    example = torch.zeros(input_shape)
    new_dirs = [d for d in {osp.dirname(osp.abspath(p)) for p in (out, fp32_out) if p}
                if not osp.exists(d)]
    written = False
    try:
        with contextlib.ExitStack() as files:      # all files move into place together
            tmp_out = files.enter_context(atomic_path(out))
            info = export_onnx(model, example, tmp_out, opset=opset,
                               metadata={'repq_mm.source_checkpoint': osp.abspath(checkpoint),
                                         'repq_mm.input_shape': list(input_shape)},
                               int32_bias=int32_bias, form=form, weight_dtype=weight_dtype)
            for line in summary_lines(info):
                print_log(line, logger='current')
            if fp32_out:
                tmp_fp32 = files.enter_context(atomic_path(fp32_out))
                info['fp32'] = export_fp32_onnx(model, example, tmp_fp32, opset=opset)
            if batch is not None:
                res = compare_onnx(model, tmp_out, batch, optimized=check_deployed,
                                   threads=threads)
                ref_model = model
                snapped = _int32_layers(info['quantizers'])
                if snapped:             # the model the file computes
                    ref_model = copy.deepcopy(model)
                    snap_bias_to_int32(ref_model, snapped)
                res['detections'] = compare_detections(ref_model, batch, samples,
                                                       res.pop('onnx_outputs'))
                info['check'] = res
                for line in check_lines(res):
                    print_log('ONNX check: ' + line, logger='current')
                bad = check_failures(res)
                if bad:
                    raise ExportError('the ONNX model differs from the PyTorch model by '
                                      f'more than one quantization step: {"; ".join(bad)}')
        written = True
    finally:
        if not written:          # failed: remove the folders made for the outputs
            for d in new_dirs:
                if osp.isdir(d) and not os.listdir(d):
                    os.rmdir(d)
    info['path'] = osp.abspath(out)
    if fp32_out:
        info['fp32']['path'] = osp.abspath(fp32_out)
    return info



# --------------------------------------------------------------------------------------
# accuracy of the deployed model
# --------------------------------------------------------------------------------------
def _test_loader(cfg, max_samples: int | None):
    """The evaluation data (:func:`.pipeline.eval_dataloader`), optionally the first
    ``max_samples`` samples only."""
    if max_samples is not None and max_samples < 1:
        raise ExportError(f'--max-samples must be >= 1, got {max_samples}')
    return eval_dataloader(cfg, ExportError, max_samples)[1]


def _evaluator(cfg, dataset):
    from mmengine.evaluator import Evaluator
    ev_cfg = copy.deepcopy(cfg.get('test_evaluator', None) or cfg.get('val_evaluator', None))
    if ev_cfg is None:
        raise ExportError('the config has no test_evaluator / val_evaluator')
    ev = Evaluator(ev_cfg)
    ev.dataset_meta = getattr(dataset, 'metainfo', None)
    return ev


class OnnxPredictor:
    """Predictions (the framework's data samples) of an exported model from onnxruntime
    outputs, through the PyTorch model's own post-processing:

    * classifiers with a ``head._get_predictions`` (mmpretrain ``ClsHead``): the logits go
      through it (softmax scores, labels);
    * detectors with ``bbox_head.predict_by_feat`` (mmdet): the per-level head tensors go
      through it (decoding, score threshold, NMS of the config's ``test_cfg``), then
      ``add_pred_to_datasample``, as ``SingleStageDetector.predict`` does.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.arch = getattr(model, 'architecture', model)
        head = getattr(self.arch, 'bbox_head', None)
        if head is not None and hasattr(head, 'predict_by_feat'):
            self.kind = 'det'
        elif hasattr(getattr(self.arch, 'head', None), '_get_predictions'):
            self.kind = 'cls'
        else:
            raise ExportError(f'no known post-processing for {type(self.arch).__name__}: '
                              'need an mmpretrain ClsHead (head._get_predictions) or an '
                              'mmdet bbox_head.predict_by_feat')
        self.template = None

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, samples, outputs: list):
        if self.kind == 'cls':
            if len(outputs) != 1:
                raise ExportError(f'a classifier ONNX model with {len(outputs)} outputs')
            return self.arch.head._get_predictions(torch.from_numpy(outputs[0]), samples)
        det = self.arch
        if self.template is None:       # the nesting of the head outputs (lists per level)
            self.template = det.bbox_head(det.extract_feat(inputs[:1]))
        struct = _restructure(self.template, outputs)
        metas = [s.metainfo for s in samples]
        results = det.bbox_head.predict_by_feat(*struct, batch_img_metas=metas, rescale=True)
        return det.add_pred_to_datasample(samples, results)


@torch.no_grad()
def evaluate_onnx(cfg: Config, checkpoint: str, onnx_path: str,
                  max_samples: int | None = None, threads: int = 2, optimize: bool = True,
                  precise_u8s8: bool = False, log=None) -> dict:
    """Evaluate an exported model through onnxruntime on the config's test set (all of it,
    or the first ``max_samples``) with the config's evaluator, next to the PyTorch merged
    model of ``checkpoint`` on the same batches.

    Every batch goes through the config's test pipeline and the model's data
    preprocessor once; the preprocessed tensor is fed to onnxruntime (``optimize``:
    ``ORT_ENABLE_ALL``, the integer kernels; ``threads`` intra-op threads) and to the
    PyTorch merged fake-quant model (``mode='predict'``). The onnxruntime outputs go through
    the model's own post-processing (:class:`OnnxPredictor`). Returns
    ``dict(onnx={metric: value}, torch={...}, diff={...}, samples, agreement)``
    (``agreement``: share of samples with the same top-1 label, classifiers only), and the
    same for the PyTorch model with its biases on the file's int32 grid
    (``torch_int32_bias``, ``agreement_int32_bias``; the layers stored with int32 biases,
    :func:`~repq_mm.export.snap_bias_to_int32`; ``None`` when the file has none): the model
    the file computes, up to float summation order (a BatchNormalization folded into a
    conv's int32 bias has no PyTorch counterpart and is not snapped).
    """
    import onnx

    from ..export import ort_session, read_quantizer_records
    model, _ = build_merged_model(cfg, checkpoint)
    snapped = None
    layers = _int32_layers(read_quantizer_records(onnx_path)) if osp.isfile(onnx_path) else []
    if layers:           # the PyTorch model on the file's int32 biases, where it has them
        snapped = copy.deepcopy(model)
        snap_bias_to_int32(snapped, layers)
    if not osp.isfile(onnx_path):
        raise ExportError(f'ONNX model {onnx_path} does not exist')
    sess = ort_session(onnx_path, optimize, threads, precise_u8s8=precise_u8s8)
    in_meta = sess.get_inputs()
    if len(in_meta) != 1:
        raise ExportError(f'{onnx_path}: {len(in_meta)} inputs; one image tensor expected')
    want = list(in_meta[0].shape)[1:]
    n_out = len(onnx.load(onnx_path, load_external_data=False).graph.output)
    loader = _test_loader(cfg, max_samples)
    ev_onnx, ev_torch = _evaluator(cfg, loader.dataset), _evaluator(cfg, loader.dataset)
    ev_snap = _evaluator(cfg, loader.dataset) if snapped is not None else None
    predictor = OnnxPredictor(model)
    n = same = same_snap = 0
    t0 = time.perf_counter()
    for i, data_batch in enumerate(loader):
        data = model.data_preprocessor(data_batch, False)
        inputs, samples = data['inputs'].float(), data['data_samples']
        got = [int(v) for v in inputs.shape[1:]]
        if len(got) != len(want) or any(isinstance(w, int) and w != g
                                         for w, g in zip(want, got)):
            raise ExportError(f'the test pipeline gives inputs of shape '
                              f'{tuple(inputs.shape[1:])}; {onnx_path} takes {tuple(want)}')
        outs = sess.run(None, {in_meta[0].name: inputs.numpy()})
        if len(outs) != n_out:
            raise ExportError(f'{onnx_path}: {len(outs)} outputs, {n_out} declared')
        p_onnx = predictor(inputs, copy.deepcopy(samples), outs)
        p_torch = model(inputs, copy.deepcopy(samples), mode='predict')
        p_snap = None if snapped is None else \
            snapped(inputs, copy.deepcopy(samples), mode='predict')
        if predictor.kind == 'cls':
            same += sum(int(a.pred_label.item() == b.pred_label.item())
                        for a, b in zip(p_onnx, p_torch))
            if p_snap is not None:
                same_snap += sum(int(a.pred_label.item() == b.pred_label.item())
                                 for a, b in zip(p_onnx, p_snap))
        ev_onnx.process(data_samples=p_onnx, data_batch=data_batch)
        ev_torch.process(data_samples=p_torch, data_batch=data_batch)
        if p_snap is not None:
            ev_snap.process(data_samples=p_snap, data_batch=data_batch)
        n += inputs.shape[0]
        if log and (i + 1) % 20 == 0:
            log(f'{n} samples, {time.perf_counter() - t0:.0f} s')
    m_onnx, m_torch = ev_onnx.evaluate(n), ev_torch.evaluate(n)
    m_snap = ev_snap.evaluate(n) if ev_snap is not None else None
    diff = {k: float(m_onnx[k]) - float(m_torch[k]) for k in m_onnx
            if k in m_torch and isinstance(m_onnx[k], (int, float))}
    cls = predictor.kind == 'cls' and n
    return dict(onnx=m_onnx, torch=m_torch, diff=diff, samples=n,
                torch_int32_bias=m_snap, int32_bias_layers=len(layers),
                agreement=same / n if cls else None,
                agreement_int32_bias=same_snap / n if cls and snapped is not None else None,
                kind=predictor.kind, onnx_path=osp.abspath(onnx_path),
                optimized=optimize, threads=threads, seconds=time.perf_counter() - t0)
