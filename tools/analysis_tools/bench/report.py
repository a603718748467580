"""The benchmark's results: targets, ``results.md`` / ``results.json`` / ``results.png``.

``res`` is the dict :func:`benchmark.main` returns (``meta``, ``config``, ``train``,
``train_compiled``, ``infer``, ``merge``, ``targets``, ``profile``, ``notes``).
"""
from __future__ import annotations

import json
from pathlib import Path

from .measure import MIB
from .variants import INFER_VARIANTS, MERGE_OPS, TRAIN_VARIANTS

#: eager targets: (variant, reference variant, limit, label)
EAGER_TARGETS = (
    ('repq_est', 'fp_multibranch', 0.5, 'RepQ-BNEst / FP multi-branch'),
    ('repq_est', 'lsq', 1.3, 'RepQ-BNEst / LSQ baseline'),
    ('repq_bn', 'fp_multibranch', 1.5, 'RepQ-BN / FP multi-branch'),
    ('repq_estk', 'repq_est', 1.15, 'RepQ-BNEst kron / RepQ-BNEst diag'),
)
#: compiled targets (issue 11): (variant, reference variant, reference compiled?, limit,
#: label); the variant is always the compiled one
COMPILED_TARGETS = (
    ('repq_est', 'lsq', True, 1.15, 'compiled RepQ-BNEst / compiled LSQ baseline'),
    ('repq_est', 'fp_multibranch', False, 1.0,
     'compiled RepQ-BNEst / eager FP multi-branch'),
    ('repq_bn', 'fp_multibranch', True, 1.5, 'compiled RepQ-BN / compiled FP multi-branch'),
)


def _median(rows: dict, name: str):
    return rows.get(name, {}).get('median')


def train_targets(res: dict) -> list[dict]:
    """The training-step ratios against their targets (medians of this run): the eager ones,
    and with ``--compile`` the compiled ones."""
    tr, tc = res.get('train', {}), res.get('train_compiled', {})
    out = []
    for v, ref, limit, label in EAGER_TARGETS:
        other = _median(tr, ref)
        if v in tr and other:
            val = tr[v]['median'] / other
            out.append(dict(name=label, value=val, limit=limit, met=val <= limit))
    for v, ref, ref_compiled, limit, label in COMPILED_TARGETS:
        other = _median(tc if ref_compiled else tr, ref)
        if v in tc and other:
            val = tc[v]['median'] / other
            out.append(dict(name=label, value=val, limit=limit, met=val <= limit))
    return out


def _fmt_ms(v):
    return f'{v * 1e3:.2f}' if v is not None else '-'


def _ratio(a, b):
    return f'{a / b:.2f}' if a is not None and b else '-'


def _compiled_table(res: dict) -> list[str]:
    tr, tc, c = res.get('train', {}), res['train_compiled'], res['config']['compile']
    fp_e, fp_c, lsq_c = (_median(tr, 'fp_multibranch'), _median(tc, 'fp_multibranch'),
                         _median(tc, 'lsq'))
    out = [f'## Training step, eager vs compiled (torch.compile mode `{c["mode"]}`, backend '
           f'`{c["backend"]}`)', '',
           'The whole step (zero_grad, forward, loss, backward, SGD step) compiled, as '
           "mmengine's `compile=True` compiles `model.train_step`; eager and compiled copies "
           'timed in the same interleaved rounds. Compile: the first call (trace + compile + '
           'run), and the time the compiling warm-up calls took above a plain call (calls '
           'until two in a row compile nothing and run within 1.5x of the fastest).', '',
           '| variant | eager median ms | compiled median ms | compiled IQR ms | speed-up | '
           'x compiled FP multi-branch | x compiled LSQ | x eager FP multi-branch | '
           'first call s | compile s | warm-up calls | graphs / breaks |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for k, r in tc.items():
        ci = r['compile']
        eager = _median(tr, k)
        out.append('| ' + ' | '.join([
            f'{TRAIN_VARIANTS[k]} (`{k}`)', _fmt_ms(eager), _fmt_ms(r['median']),
            f'{_fmt_ms(r["q1"])}-{_fmt_ms(r["q3"])}', _ratio(eager, r['median']),
            _ratio(r['median'], fp_c), _ratio(r['median'], lsq_c), _ratio(r['median'], fp_e),
            f'{ci["first_call_s"]:.1f}', f'{ci["compile_s"]:.1f}',
            f'{len(ci["calls_s"])}' + ('' if ci['settled'] else ' (not settled)'),
            f'{ci["graphs"]} / {ci["graph_breaks"]}']) + ' |')
    mem = {k: r['mem']['delta_bytes'] for k, r in tc.items() if 'mem' in r}
    if mem:
        out += ['', 'Compiled step memory (peak delta MiB): ' + ', '.join(
            f'`{k}` {v / MIB:.1f}' for k, v in mem.items())]
    out.append('')
    return out


def render_markdown(res: dict) -> str:
    m, c = res['meta'], res['config']
    out = ['# RepQ benchmark', '',
           f'- command: `{m["command"]}`',
           f'- model: {c["model_desc"]}; input {c["batch_size"]}x{c["in_channels"]}x'
           f'{c["input_size"]}x{c["input_size"]}; device {c["device"]}; '
           f'W{c["w_bits"]}A{c["a_bits"]} per_channel={c["per_channel"]}',
           f'- machine: {m["platform"]}; CPU {m["cpu_model"]} ({m["logical_cpus"]} logical, '
           f'affinity {m["cpu_affinity"]}); GPU {m["gpu"]}',
           f'- torch {m["torch"]} (threads {m["torch_threads"]}, interop '
           f'{m["torch_interop_threads"]}); env ' +
           ', '.join(f'{k}={v}' for k, v in m['env'].items() if v is not None),
           f'- variants built with repq_mm.convert_to_repq / merge_model; mmpretrain: '
           f'{m["mmpretrain"]}',
           f'- timing: {c["warmup"]} warm-up + {c["repeats"]} interleaved repeats (rotating '
           f'order), {c["inner"]} step(s) per sample; load average start/end '
           f'{m.get("loadavg_start")} / {m.get("loadavg_end")}', '']
    tr = res.get('train', {})
    if tr:
        ref = tr.get('fp_multibranch', {}).get('median')
        lsq = tr.get('lsq', {}).get('median')
        mref = tr.get('fp_multibranch', {}).get('mem', {}).get('delta_bytes')
        out += ['## Training step (forward + backward + SGD step)', '',
                '| variant | median ms | IQR ms | min-max ms | x FP multi-branch | x LSQ | '
                'peak mem delta MiB | x FP mem |',
                '|---|---:|---:|---:|---:|---:|---:|---:|']
        for k, r in tr.items():
            mem = r.get('mem', {}).get('delta_bytes')
            cells = [f'{TRAIN_VARIANTS[k]} (`{k}`)', _fmt_ms(r['median']),
                     f'{_fmt_ms(r["q1"])}-{_fmt_ms(r["q3"])}',
                     f'{_fmt_ms(r["min"])}-{_fmt_ms(r["max"])}',
                     f'{r["median"] / ref:.2f}' if ref else '-',
                     f'{r["median"] / lsq:.2f}' if lsq else '-',
                     f'{mem / MIB:.1f}' if mem is not None else '-',
                     f'{mem / mref:.2f}' if mem is not None and mref and mref >= MIB else '-']
            out.append('| ' + ' | '.join(cells) + ' |')
        methods = {r['mem']['method'] for r in tr.values() if 'mem' in r}
        if methods:
            out += ['', f'Memory: {"; ".join(sorted(methods))} (peak during one step minus the '
                    'allocation before it: activations, gradients, temporaries).']
        out.append('')
    if res.get('train_compiled'):
        out += _compiled_table(res)
    inf = res.get('infer', {})
    if inf:
        ref = inf.get('fp_train_form', {}).get('median')
        dep = inf.get('fp_deploy', {}).get('median')
        out += ['## Inference (eval, no_grad)', '',
                '| variant | median ms / batch | IQR ms | throughput img/s | '
                'x train-form throughput | x FP deploy throughput |',
                '|---|---:|---:|---:|---:|---:|']
        for k, r in inf.items():
            out.append(f'| {INFER_VARIANTS[k]} (`{k}`) | {_fmt_ms(r["median"])} | '
                       f'{_fmt_ms(r["q1"])}-{_fmt_ms(r["q3"])} | {r["throughput"]:.1f} | '
                       f'{(ref / r["median"]) if ref else float("nan"):.2f} | '
                       f'{(dep / r["median"]) if dep else float("nan"):.2f} |')
        out.append('')
    if res.get('targets'):
        out += ['## Targets (medians)', '']
        for t in res['targets']:
            out.append(f'- {t["name"]}: {t["value"]:.2f} (target <= {t["limit"]}) -> '
                       f'{"met" if t["met"] else "NOT met"}')
        out.append('')
    mg = res.get('merge', {})
    if mg:
        out += ['## Merge time', '', '| operation | median ms | IQR ms |', '|---|---:|---:|']
        for k, r in mg.items():
            out.append(f'| {MERGE_OPS[k]} (`{k}`) | {_fmt_ms(r["median"])} | '
                       f'{_fmt_ms(r["q1"])}-{_fmt_ms(r["q3"])} |')
        out.append('')
    for note in res.get('notes', []):
        out.append(f'> {note}')
    if res.get('notes'):
        out.append('')
    from .profile import format_attribution
    for key in ('profile', 'profile_compiled'):
        for name, att in res.get(key, {}).items():
            out += [format_attribution(name, att), '']
    return '\n'.join(out)


_COLORS = ['#888888', '#bbbbbb', '#4c72b0', '#dd8452', '#55a868', '#c44e52', '#8172b3',
           '#937860', '#da8bc3']


def plot(res: dict, path: Path) -> str | None:
    """Bar charts (training step time, its memory, inference throughput); with compiled
    rows the training panel shows eager and compiled side by side. Returns a note when
    matplotlib is missing (nothing written), else ``None``."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f'matplotlib unavailable ({type(e).__name__}: {e}); PNG skipped'
    panels = []
    tr, inf, tc = res.get('train', {}), res.get('infer', {}), res.get('train_compiled', {})
    if tr:
        panels.append(('training step (ms, median, IQR bars)', tr, 'median', 1e3))
        if any('mem' in r for r in tr.values()):
            panels.append(('training step peak memory delta (MiB)', tr, 'mem', 1 / MIB))
    if inf:
        panels.append(('inference throughput (img/s)', inf, 'throughput', 1.0))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (title, data, key, scale) in zip(axes, panels):
        names = list(data)
        series = [(data, 0.0, 0.8, None)]
        if key == 'median' and tc:
            series = [(data, -0.2, 0.4, 'eager'), (tc, 0.2, 0.4, 'compiled')]
            title = 'training step (ms, median, IQR bars): eager | compiled (hatched)'
        for rows, off, width, label in series:
            have = [n for n in names if n in rows]
            pos = [names.index(n) + off for n in have]
            if key == 'median':
                vals = [rows[n]['median'] * scale for n in have]
                err = [[(rows[n]['median'] - rows[n]['q1']) * scale for n in have],
                       [(rows[n]['q3'] - rows[n]['median']) * scale for n in have]]
            elif key == 'mem':
                vals = [rows[n].get('mem', {}).get('delta_bytes', 0) * scale for n in have]
                err = None
            else:
                vals = [rows[n]['throughput'] for n in have]
                err = None
            ax.bar(pos, vals, width=width, yerr=err, capsize=3,
                   color=[_COLORS[names.index(n) % len(_COLORS)] for n in have],
                   hatch='//' if label == 'compiled' else None, edgecolor='black'
                   if label == 'compiled' else None)
            for i, v in zip(pos, vals):
                ax.text(i, v, f'{v:.0f}' if v >= 10 else f'{v:.2f}', ha='center',
                        va='bottom', fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha='right', fontsize=8)
        ax.set_title(title, fontsize=9)
    c, m = res['config'], res['meta']
    fig.suptitle(f'{c["model_desc"][:110]} | {c["batch_size"]}x{c["input_size"]}^2 | '
                 f'{c["device"]} | threads {m["torch_threads"]} | torch {m["torch"]}',
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(res: dict, out_dir: Path, log) -> None:
    """``results.md``, ``results.json`` and ``results.png`` in ``out_dir``; logs the
    Markdown."""
    md = render_markdown(res)
    (out_dir / 'results.md').write_text(md + '\n')
    (out_dir / 'results.json').write_text(json.dumps(res, indent=1, default=str) + '\n')
    note = plot(res, out_dir / 'results.png')
    if note:
        log(note)
    log(md)
    log(f'written: {out_dir / "results.md"}, {out_dir / "results.json"}'
        + ('' if note else f', {out_dir / "results.png"}'))
