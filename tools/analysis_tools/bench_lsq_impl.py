#!/usr/bin/env python
"""LSQ implementations, forward + backward: ``fast`` (the default, one autograd node with
dense float ops), PyTorch's ``fused`` learnable fake-quant kernels and the autograd
``reference``; interleaved, median of the fastest repeat block.

    OMP_NUM_THREADS=2 python tools/analysis_tools/bench_lsq_impl.py [--threads 2] [--device cpu]
"""
import argparse
import os.path as osp
import statistics
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402

from repq_mm.quant.lsq import lsq_fake_quant  # noqa: E402


def bench(x, s, qn, qp, ch_axis, impl, reps, device):
    ts = []
    for _ in range(reps):
        xx = x.detach().requires_grad_(True)
        ss = s.detach().requires_grad_(True)
        if device == 'cuda':
            torch.cuda.synchronize()
        t = time.perf_counter()
        y = lsq_fake_quant(xx, ss, qn, qp, 0.01, ch_axis, impl)
        y.backward(torch.ones_like(y))
        if device == 'cuda':
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--repeats', type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = args.device
    cases = {
        'weight, per channel, 1280x192x3x3, 8 bit': (
            torch.randn(1280, 192, 3, 3, device=dev),
            torch.rand(1280, device=dev) * 0.05 + 0.01, 128, 127, 0),
        'activation, per tensor, 32x48x32x32, 8 bit unsigned': (
            torch.rand(32, 48, 32, 32, device=dev), torch.tensor([0.02], device=dev),
            0, 255, None),
    }
    print(f'torch {torch.__version__}, device {dev}, threads {args.threads}')
    impls = ('fast', 'fused', 'reference')
    print('| tensor | ' + ' | '.join(f'{i} (ms)' for i in impls) + ' | fused / fast |')
    print('|---|' + '---:|' * (len(impls) + 1))
    for name, (x, s, qn, qp, ax) in cases.items():
        r = {impl: [] for impl in impls}
        for _ in range(3):
            for impl in r:
                r[impl].append(bench(x, s, qn, qp, ax, impl, args.repeats, dev))
        best = {k: min(v) for k, v in r.items()}
        print(f'| {name} | ' + ' | '.join(f'{best[i]:.1f}' for i in impls) +
              f' | {best["fused"] / best["fast"]:.1f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
