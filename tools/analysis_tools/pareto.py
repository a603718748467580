#!/usr/bin/env python
"""Accuracy against model weight size: the table and Pareto plot of finished runs.

    python tools/analysis_tools/pareto.py --out-dir DIR [--title TEXT] [--metric-name top-1]
        --point SERIES LABEL CONFIG RESULT [--point ...]

Every ``--point`` is one trained model: ``SERIES`` groups points into one line of the plot
(e.g. ``RepQ-BN``, ``LSQ``), ``LABEL`` names the point (e.g. ``W4A8``), ``CONFIG`` is the
quantized config it was trained with (the weight size is computed from it: the model is
built with its bit widths, :func:`repq_mm.sensitivity.model_weight_bytes` — packed integer
codes, float32 step sizes and biases, the rest of the model as stored) and ``RESULT`` the
accuracy: a ``result.json`` of ``tools/fmnist_experiments.py`` (``merged_acc``, the stock
test of the merged checkpoint, else ``acc``) or a number.

Writes ``pareto.md`` (table, sorted by series and size), ``pareto.json`` and ``pareto.png``
(accuracy against KiB: every point, and one line per series through its upper envelope, the
points no other point of the series beats) to ``--out-dir``; the table marks the points on
the front of all series together.
"""
from __future__ import annotations

import argparse
import json
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from mmengine.config import Config  # noqa: E402

import repq_mm  # noqa: E402,F401
from repq_mm.io import atomic_path  # noqa: E402
from repq_mm.mm.cli import prepare_cfg  # noqa: E402
from repq_mm.mm.pipeline import build_repq_model  # noqa: E402
from repq_mm.sensitivity import model_weight_bytes  # noqa: E402


def read_accuracy(result: str) -> float:
    """A number, or the accuracy in a ``result.json`` (``merged_acc`` first, then ``acc``)."""
    try:
        return float(result)
    except ValueError:
        pass
    if not osp.isfile(result):
        raise SystemExit(f'result {result!r} is neither a number nor an existing file')
    with open(result) as f:
        data = json.load(f)
    for key in ('merged_acc', 'acc'):
        if isinstance(data.get(key), (int, float)):
            return float(data[key])
    raise SystemExit(f'{result}: no merged_acc / acc in it (keys: {sorted(data)})')


def weight_bytes(config: str) -> int:
    """Total weight bytes of the model ``config`` builds, at its own bit widths."""
    if not osp.isfile(config):
        raise SystemExit(f'config {config} does not exist')
    cfg = prepare_cfg(Config.fromfile(config))
    model = build_repq_model(cfg, error=SystemExit)
    return model_weight_bytes(model.architecture)['total']


def pareto_front(points: list[dict]) -> set[int]:
    """Indices of the points no other point of the same list beats (smaller or equal size
    and higher accuracy, or smaller size and equal accuracy)."""
    front = set()
    for i, p in enumerate(points):
        if not any((q['bytes'] <= p['bytes'] and q['acc'] > p['acc']) or
                   (q['bytes'] < p['bytes'] and q['acc'] >= p['acc'])
                   for j, q in enumerate(points) if j != i):
            front.add(i)
    return front


def plot(points: list[dict], path: str, title: str, metric: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for series in dict.fromkeys(p['series'] for p in points):
        pts = sorted((p for p in points if p['series'] == series), key=lambda p: p['bytes'])
        xs, ys = [p['bytes'] / 1024 for p in pts], [p['acc'] for p in pts]
        front = sorted(pareto_front(pts), key=lambda i: xs[i])
        line, = ax.plot([xs[i] for i in front], [ys[i] for i in front], marker='o',
                        label=series)                    # the series' upper envelope
        ax.scatter(xs, ys, s=25, color=line.get_color())  # every point
        for p in pts:
            ax.annotate(p['label'], (p['bytes'] / 1024, p['acc']), textcoords='offset points',
                        xytext=(4, 4), fontsize=8, color=line.get_color())
    ax.set_xlabel('model weight size (KiB)')
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format='png')
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--point', nargs=4, action='append', required=True,
                    metavar=('SERIES', 'LABEL', 'CONFIG', 'RESULT'))
    ap.add_argument('--out-dir', required=True)
    ap.add_argument('--title', default='accuracy against weight size')
    ap.add_argument('--metric-name', default='top-1 (%)')
    args = ap.parse_args(argv)
    points = [dict(series=s, label=lab, config=c, result=r, acc=read_accuracy(r),
                   bytes=weight_bytes(c)) for s, lab, c, r in args.point]
    points.sort(key=lambda p: (p['series'], p['bytes']))
    front = pareto_front(points)
    lines = [f'| series | point | weight bytes | KiB | {args.metric_name} | on the front (all series) |',
             '|---|---|---:|---:|---:|---|']
    for i, p in enumerate(points):
        lines.append(f'| {p["series"]} | {p["label"]} | {p["bytes"]} | {p["bytes"] / 1024:.1f} '
                     f'| {p["acc"]:.2f} | {"yes" if i in front else ""} |')
    text = '\n'.join(lines)
    print(text)
    out = args.out_dir
    with atomic_path(osp.join(out, 'pareto.md')) as tmp, open(tmp, 'w') as f:
        f.write(text + '\n')
    with atomic_path(osp.join(out, 'pareto.json')) as tmp, open(tmp, 'w') as f:
        json.dump(dict(points=points, front=sorted(front)), f, indent=1)
    plot(points, osp.join(out, 'pareto.png'), args.title, args.metric_name)
    return 0


if __name__ == '__main__':
    sys.exit(main())
