"""Synchronised batch statistics over ranks (``SyncBatchNorm`` inside rep blocks).

Two gloo processes on the CPU, uneven local batches (3 and 5 samples). For channel
mean / std ratios 1, 100 and 1e4 and float32 / float16 / bfloat16 inputs,
``channel_var_mean(sync=True)`` and its gradients must equal the single-process statistics
of the concatenated batch (float32: variance relative error <= 1e-5), never inf / NaN; and a
RepVGG block converted to ``SyncBatchNorm`` must compute, in RepQ-BN and RepQ-BNEst, on each
rank the rows of what one process computes on the whole batch (outputs, running statistics,
the sum of the ranks' parameter gradients). About 15 s.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from repq_mm.quant import QConfig
from repq_mm.rep import RepVGGBlock
from repq_mm.rep.stats import channel_var_mean

WORLD = 2
SPLIT = (3, 5)                      # samples per rank: uneven counts
RATIOS = (1.0, 100.0, 1e4)          # channel mean / std
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _data(ratio, dtype):
    gen = torch.Generator().manual_seed(int(ratio) % 1000 + 7)
    std = torch.tensor([1.0, 0.01, 3.0, 0.5]).reshape(1, 4, 1, 1)
    x = torch.randn(sum(SPLIT), 4, 6, 6, generator=gen) * std + ratio * std
    return x.to(dtype)


def _coeffs(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4, generator=gen), torch.randn(4, generator=gen)


#: block inputs (channel mean, std) and the output tolerance: float32 rounding of the input
#: (half a step of 30 is 1e-6) relative to its std 0.01 bounds the agreement at (30, 0.01)
BLOCK_DATA = ((30.0, 0.01), (100.0, 1.0))
BLOCK_TOL = {30.0: 1e-3, 100.0: 1e-5, 64.0: 1e-12}


def _block_input(mean, std):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(sum(SPLIT), 4, 6, 6, generator=gen) * std + mean


def _block(bn_mode):
    torch.manual_seed(0)
    blk = RepVGGBlock(4, 4, act=nn.ReLU())
    with torch.no_grad():
        for bn in blk.bns():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
    blk = nn.SyncBatchNorm.convert_sync_batchnorm(blk)
    return blk.train().enable_repq(QConfig(bn_mode=bn_mode), quantize=False)


def _slice(rank):
    start = sum(SPLIT[:rank])
    return slice(start, start + SPLIT[rank])


def _worker(rank, init_file, out_dir):
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=WORLD)
    res = {}
    for ratio in RATIOS:
        for dtype in DTYPES:
            x = _data(ratio, dtype)[_slice(rank)].clone().requires_grad_()
            var, mean, n = channel_var_mean(x, sync=True)
            a, b = _coeffs(rank)
            (a * mean + b * var).sum().backward()
            res[(ratio, str(dtype))] = (var.detach(), mean.detach(), n, x.grad.clone())
    for mode in ('exact', 'est'):
        for mean, std in BLOCK_DATA + ((64.0, 1.0),):
            blk = _block(mode)
            x = _block_input(mean, std)[_slice(rank)].clone()
            if mean == 64.0:                       # the same data in float64: exactness
                blk, x = blk.double(), _block_input(100.0, std).double()[_slice(rank)]
            y = blk(x)
            (y * y).sum().backward()
            res[(mode, mean)] = (y.detach(), [(bn.running_mean.clone(),
                                               bn.running_var.clone()) for bn in blk.bns()],
                                 {k: p.grad.clone() for k, p in blk.named_parameters()})
    torch.save(res, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp('sync')
    mp.start_processes(_worker, args=(str(d / 'init'), str(d)), nprocs=WORLD, join=True,
                       start_method='spawn')
    return [torch.load(d / f'rank{r}.pt', weights_only=False) for r in range(WORLD)]


def _reference(ratio, dtype):
    """Statistics and gradients of the concatenated batch in float64, one process."""
    x = _data(ratio, dtype).double().requires_grad_()
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    loss = 0
    for r in range(WORLD):
        a, b = _coeffs(r)
        loss = loss + (a.double() * mean + b.double() * var).sum()
    loss.backward()
    return var.detach(), mean.detach(), x.grad


@pytest.mark.parametrize('dtype', DTYPES, ids=[str(d)[6:] for d in DTYPES])
@pytest.mark.parametrize('ratio', RATIOS)
def test_sync_statistics_equal_concatenated_batch(ranks, ratio, dtype):
    var_ref, mean_ref, grad_ref = _reference(ratio, dtype)
    std_ref = var_ref.sqrt()
    for r, res in enumerate(ranks):
        var, mean, n, grad = res[(ratio, str(dtype))]
        assert n == sum(SPLIT) * 36
        assert var.dtype == mean.dtype == torch.float32
        assert torch.isfinite(var).all() and torch.isfinite(mean).all()
        assert torch.isfinite(grad).all() and grad.dtype == dtype
        # float32 statistics of the same (rounded) input: float32 rounding only
        assert ((var.double() - var_ref).abs() <= 1e-5 * var_ref + 1e-30).all(), \
            (ratio, dtype, var, var_ref)
        assert ((mean.double() - mean_ref).abs() <= 1e-6 * mean_ref.abs() + 1e-5 * std_ref
                ).all(), (mean, mean_ref)
        g = grad_ref[_slice(r)]
        tol = 1e-4 if dtype == torch.float32 else 1e-2        # the gradient's own dtype
        assert ((grad.double() - g).abs() <= tol * g.abs().max()).all(), (ratio, dtype)


@pytest.mark.parametrize('mean,std', BLOCK_DATA + ((64.0, 1.0),))
@pytest.mark.parametrize('mode', ['exact', 'est'])
def test_sync_block_equals_one_process(ranks, mode, mean, std):
    """RepQ-BN / RepQ-BNEst block with SyncBatchNorm on 2 ranks == 1 process on the whole
    batch. The old E[y^2] - mean^2 combination was 55% (RepQ-BN) / 28% (RepQ-BNEst) off at
    (30, 0.01) and 1.5e-4 at (100, 1)."""
    blk = _block(mode)
    x = _block_input(mean, std)
    if mean == 64.0:
        blk, x = blk.double(), _block_input(100.0, std).double()
    y = blk(x)
    (y * y).sum().backward()
    for r, res in enumerate(ranks):
        y_r, running, _ = res[(mode, mean)]
        ref = y[_slice(r)].detach()
        err = ((y_r - ref).abs().max() / ref.abs().max()).item()
        assert err <= BLOCK_TOL[mean], (mode, mean, err)
        for (rm, rv), bn in zip(running, blk.bns()):
            assert torch.allclose(rm, bn.running_mean, rtol=1e-5, atol=1e-6)
            assert torch.allclose(rv, bn.running_var, rtol=BLOCK_TOL[mean] * 10, atol=1e-9)
    if mean == 30.0:
        return
    # the sum of the ranks' gradients is the gradient of the whole-batch loss
    for name, p in blk.named_parameters():
        total = sum(res[(mode, mean)][2][name] for res in ranks)
        err = ((total - p.grad).abs().max() / p.grad.abs().max()).item()
        # float32: large cancelling terms at mean / std = 100 (measured up to 1.6e-3);
        # float64 shows the synchronised gradient is exact
        assert err <= (5e-3 if mean == 100.0 else 1e-10), (mode, mean, name, err)
