"""The RepQ training / inference benchmark behind ``tools/analysis_tools/benchmark.py``.

* :mod:`.variants`: the model factory and the training variants (all made with
  ``repq_mm.convert_to_repq`` / ``merge_model``);
* :mod:`.measure`: the training step (eager, and ``torch.compile`` of the whole step as
  mmengine's ``compile=True`` does), interleaved timing, step memory, the machine;
* :mod:`.profile`: ``torch.profiler`` attribution of one step, eager or compiled;
* :mod:`.report`: targets, ``results.md`` / ``results.json`` / ``results.png``;
* :mod:`.sections`: the benchmark's sections (train, infer, merge, profile).
"""
from .measure import Trainer, compile_step, interleaved, loss_fn, summarize, timed
from .report import render_markdown, train_targets
from .variants import (DEFAULT_TRAIN, DETECTORS, INFER_VARIANTS, MERGE_OPS, TRAIN_VARIANTS,
                       build_model, make_inputs, make_variant)

__all__ = ['DEFAULT_TRAIN', 'DETECTORS', 'INFER_VARIANTS', 'MERGE_OPS', 'TRAIN_VARIANTS',
           'Trainer', 'build_model', 'compile_step', 'interleaved', 'loss_fn', 'make_inputs',
           'make_variant', 'render_markdown', 'summarize', 'timed', 'train_targets']
