"""``torch.compile`` of RepQ models (inductor on the CPU stands in for the GPU backend).

* no graph break inside any registered rep block's forward (train: ``exact``, ``est``,
  ``est`` with ``est_refresh``; eval), counted with ``torch._dynamo.explain``;
* compiled == eager (losses, parameters, BN running statistics, LSQ step sizes after
  several SGD steps), float32, for a classifier-like stack of rep blocks in every BN mode
  (``backend='eager'``: dynamo's graph capture, guards and side effects, where the RepQ
  specific state lives) and once with inductor itself (AOTAutograd through the custom
  autograd nodes, generated kernels); ``est_refresh`` needs exactly two graphs (a refresh
  step, a plain step), not a recompilation per call;
* LSQ initialisation at the first compiled call and the eval-mode weight cache behave.

Compiles cost seconds (dynamo only) to about a minute (inductor), so the models are tiny.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from repq_mm import convert_to_repq, merge_model
from repq_mm.rep import REP_BLOCKS, DiverseBranchBlock, QARepVGGBlock, RepVGGBlock

MODES = {'exact': dict(bn_mode='exact'), 'est': dict(bn_mode='est'),
         'est_refresh': dict(bn_mode='est', est_refresh=2)}


def _net(**qkw):
    torch.manual_seed(0)
    net = nn.Sequential(RepVGGBlock(3, 8, stride=2, act=nn.ReLU()),
                        DiverseBranchBlock(8, 8, act=nn.ReLU()),
                        QARepVGGBlock(8, 8, act=nn.ReLU()),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    return convert_to_repq(net, w_bits=4, a_bits=4, per_channel=True, first_bits=8,
                           last_bits=8, **qkw).train()


def _batches(n=4):
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(4, 3, 12, 12, generator=gen) for _ in range(n)]


def _train(model, batches, lr=0.05):
    """Plain SGD steps; returns the losses."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for x in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _assert_same_state(a: nn.Module, b: nn.Module, rtol: float):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        if v.is_floating_point():
            err = (v - sb[k]).abs().max().item()
            assert err <= rtol * max(1.0, v.abs().max().item()), (k, err)
        else:
            assert torch.equal(v, sb[k]), k


class _EveryBlock(nn.Module):
    """Every registered block family (4 -> 4 channels), each on the same input."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(cls(4, 4) for cls in REP_BLOCKS.values())

    def forward(self, x):
        return [blk(x) for blk in self.blocks]


@pytest.mark.parametrize('mode', list(MODES))
def test_no_graph_break_in_rep_blocks(mode):
    """Every registered block, train and eval: one graph, no break (the count the README
    quotes)."""
    torch.manual_seed(0)
    net = convert_to_repq(_EveryBlock(), w_bits=4, a_bits=4, **MODES[mode])
    x = torch.randn(2, 4, 8, 8)
    net.train()(x)                                   # initialise the quantizers
    for train in (True, False):
        net.train(train)
        torch._dynamo.reset()
        expl = torch._dynamo.explain(net)(x)
        assert expl.graph_break_count == 0, (mode, train, expl.break_reasons)
        assert expl.graph_count == 1


@pytest.mark.parametrize('mode', list(MODES))
def test_compiled_training_matches_eager(mode):
    eager = _net(**MODES[mode])
    batches = _batches()
    eager(batches[0])                                # initialise the step sizes (eager)
    comp_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    compiled = torch.compile(comp_model, backend='eager')
    l_e, l_c = _train(eager, batches), _train(compiled, batches)
    for a, b in zip(l_e, l_c):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (mode, l_e, l_c)
    _assert_same_state(eager, comp_model, 1e-5)
    # est_refresh: a refresh step and a plain step, no recompilation per call
    assert counters['stats']['unique_graphs'] == (2 if mode == 'est_refresh' else 1), \
        dict(counters['stats'])
    # eval (the weight cache is bypassed inside the compiled graph)
    eager.eval()
    comp_model.eval()
    with torch.no_grad():
        y_e, y_c = eager(batches[0]), compiled(batches[0])
    assert torch.allclose(y_e, y_c, rtol=1e-5, atol=1e-6)
    # the trained compiled model merges like an eager one
    y_m = merge_model(comp_model)(batches[0])
    assert torch.allclose(y_m, y_e, rtol=1e-5, atol=1e-5)


def test_lsq_initialises_at_first_compiled_call():
    """Uninitialised quantizers initialise eagerly at the first compiled call (one graph
    break there), then the compiled model matches eager."""
    eager = _net(bn_mode='est')
    comp_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(comp_model, backend='eager')
    x = _batches(1)[0]
    y_e, y_c = eager(x), compiled(x)
    assert torch.allclose(y_e, y_c, rtol=1e-5, atol=1e-6)
    steps_e = [q.step.detach() for n, q in eager.named_modules() if n.endswith('quant')]
    steps_c = [q.step.detach() for n, q in comp_model.named_modules() if n.endswith('quant')]
    assert steps_e and all(torch.equal(a, b) for a, b in zip(steps_e, steps_c))
    assert all(q.is_initialized for n, q in comp_model.named_modules() if n.endswith('quant'))


def test_inductor_training_matches_eager():
    """The real backend (inductor + the C++ compiler): training steps agree with eager."""
    eager = _net(bn_mode='est')
    batches = _batches(3)
    eager(batches[0])
    comp_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(comp_model)
    l_e, l_c = _train(eager, batches), _train(compiled, batches)
    for a, b in zip(l_e, l_c):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (l_e, l_c)
    _assert_same_state(eager, comp_model, 1e-4)
