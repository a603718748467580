"""Helpers shared by tools/fmnist_experiments.py and tools/det_experiments.py: run a tool
as a logged subprocess with progress, reuse finished steps, find the stock test tools."""
import argparse
import importlib.util
import json
import os
import os.path as osp
import re
import statistics
import subprocess
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PROGRESS_RE = re.compile(r'(Epoch|Iter)\((train|val|test)\)\s*\[(.*?)\]\s*\[(\d+)/(\d+)\]')


def bits_spec(text: str) -> tuple:
    """``'8'`` -> (8, 8), ``'4a8'`` or ``'w4a8'`` -> (4, 8): weight and activation bits."""
    m = re.fullmatch(r'w?(\d+)(?:a(\d+))?', text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(
            f'bits {text!r}: expected a width (8, 4) or weight/activation widths (4a8, w4a8)')
    w = int(m.group(1))
    return w, int(m.group(2) or w)


def bits_name(bits: tuple) -> str:
    return f'w{bits[0]}a{bits[1]}'


def mean_std(values, digits: int = 2) -> str:
    """``'–'`` for no value, the value for one, else ``mean ± std`` (sample std)."""
    if not values:
        return '–'
    if len(values) == 1:
        return f'{values[0]:.{digits}f}'
    return f'{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}'


def add_lsq_impl_arg(ap) -> None:
    """``--lsq-impl``: the LSQ implementation of the quantized runs (``model.repq.impl``)."""
    ap.add_argument('--lsq-impl', choices=['fast', 'fused', 'reference'],
                    help="LSQ implementation of the quantized runs (default: the repq default, "
                         "'fast'; the README's tables used 'fused')")


def lsq_impl_opts(args) -> list:
    """``model.repq.impl=...`` cfg option for the quantized runs when ``--lsq-impl`` is given."""
    return [f'model.repq.impl={args.lsq_impl}'] if args.lsq_impl else []


def stock_test_tool(package: str) -> str:
    """``tools/test.py`` shipped inside an OpenMMLab package (``mmpretrain`` / ``mmdet``)."""
    spec = importlib.util.find_spec(package)
    path = osp.join(spec.submodule_search_locations[0], '.mim', 'tools', 'test.py')
    if not osp.isfile(path):
        raise FileNotFoundError(f'stock {package} tools/test.py not found at {path}')
    return path


def run(cmd, log_path, label, threads, every=30.0):
    """Run a command in ROOT, log its output, print progress every ``every`` seconds;
    return the output. Exits with the log tail when the command fails."""
    os.makedirs(osp.dirname(log_path), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS='ignore')
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # no spinning when runs share the cores
    t0 = time.time()
    print(f'  [{time.strftime("%H:%M:%S")}] {label} ...', flush=True)
    out = []
    with open(log_path, 'w', buffering=1) as log, subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True) as p:
        log.write(' '.join(cmd) + '\n')
        last = 0.0
        for line in p.stdout:
            log.write(line)
            out.append(line)
            m = PROGRESS_RE.search(line)
            if m and time.time() - last > every:
                last = time.time()
                print(f'      {m.group(2)} epoch {m.group(3)} iter {m.group(4)}/{m.group(5)} '
                      f'({time.time() - t0:.0f} s)', flush=True)
    if p.returncode:
        tail = ''.join(out[-30:])
        raise SystemExit(f'{label} failed (exit {p.returncode}); log: {log_path}\n{tail}')
    print(f'      done in {time.time() - t0:.0f} s', flush=True)
    return ''.join(out)


def cfg_opts(opts):
    return ['--cfg-options', *opts] if opts else []


def last_checkpoint(work_dir: str) -> str:
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def train(cmd, wd, label, threads):
    """Run a training command unless a previous run of it finished (``train_done``);
    return the last checkpoint."""
    done = osp.join(wd, 'train_done')
    if osp.isfile(done):
        print(f'  {label}: reusing the finished training in {wd}')
    else:
        run(cmd, osp.join(wd, 'train.log'), label, threads)
        open(done, 'w').close()
    return last_checkpoint(wd)


def cached(work_dir, force):
    """The saved ``result.json`` of a finished step (``None`` if absent or ``force``)."""
    path = osp.join(work_dir, 'result.json')
    if not force and osp.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def save(work_dir, result):
    with open(osp.join(work_dir, 'result.json'), 'w') as f:
        json.dump(result, f, indent=1)
    return result
