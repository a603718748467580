"""``torch.compile`` of RepQ models (inductor on the CPU stands in for the GPU backend).

* no graph break inside any registered rep block's forward (train: ``exact``, ``est``,
  ``est`` with ``est_refresh``; eval), counted with ``torch._dynamo.explain``;
* compiled == eager (losses, parameters, BN running statistics, LSQ step sizes after
  several SGD steps), float32, for a classifier-like stack of rep blocks in every BN mode
  (``backend='eager'``: dynamo's graph capture, guards and side effects, where the RepQ
  specific state lives) and once with inductor itself (AOTAutograd through the custom
  autograd nodes, generated kernels); with the quantizers calibrated before compiling,
  ``est_refresh`` needs exactly two graphs (a refresh step, a plain step), not a
  recompilation per call;
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


def _net(modes=('exact', 'est', 'est_refresh')):
    """A small classifier whose three rep blocks (RepVGG, DBB, QARepVGG: single-stage,
    multi-stage and post-sum BNs) use the given BN modes."""
    torch.manual_seed(0)
    blocks = [RepVGGBlock(3, 8, stride=2, act=nn.ReLU()), DiverseBranchBlock(8, 8, act=nn.ReLU()),
              QARepVGGBlock(8, 8, act=nn.ReLU())]
    for blk, mode in zip(blocks, modes):
        convert_to_repq(blk, w_bits=4, a_bits=4, per_channel=True, **MODES[mode])
    net = _Classifier(nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.Linear(8, 5)))
    return convert_to_repq(net, w_bits=8, a_bits=8).train()


class _Classifier(nn.Module):
    """A model class of its own, like every OpenMMLab model: ``torch.compile`` runs its
    hooks (the est_refresh schedule) outside the graph and captures its ``forward`` as one
    frame. (A bare ``nn.Sequential`` root is traced from ``nn.Module.__call__``, so the
    schedule hook would split it into one frame per child.)"""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


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


def _graph_breaks(net, x):
    torch._dynamo.reset()
    expl = torch._dynamo.explain(net)(x)
    return expl.graph_break_count, expl.graph_count, expl.break_reasons


@pytest.mark.parametrize('mode', list(MODES))
def test_no_graph_break_in_rep_blocks(mode):
    """Every registered block in training mode (and, for ``exact``, in eval mode): one
    graph, no break (the count the README quotes)."""
    torch.manual_seed(0)
    net = convert_to_repq(_EveryBlock(), w_bits=4, a_bits=4, **MODES[mode])
    x = torch.randn(2, 4, 8, 8)
    net.train()(x)                                   # initialise the quantizers
    breaks, graphs, reasons = _graph_breaks(net, x)
    assert breaks == 0 and graphs == 1, (mode, reasons)
    if mode == 'exact':                              # eval does not depend on the mode
        breaks, graphs, reasons = _graph_breaks(net.eval(), x)
        assert breaks == 0 and graphs == 1, ('eval', reasons)


def test_compiled_training_matches_eager():
    """Three BN modes in one model, quantizers uninitialised at the first compiled call
    (they initialise eagerly there, a graph break), then two SGD steps: losses, parameters,
    step sizes, running statistics and the est_refresh correction equal eager; eval and
    merge of the trained compiled model match."""
    eager = _net()
    batches = _batches(3)        # est_refresh=2: refresh, plain, refresh
    comp_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(comp_model, backend='eager')
    l_e, l_c = _train(eager, batches[:1]), _train(compiled, batches[:1])
    assert all(q.is_initialized for n, q in comp_model.named_modules() if n.endswith('quant'))
    l_e, l_c = l_e + _train(eager, batches[1:]), l_c + _train(compiled, batches[1:])
    for a, b in zip(l_e, l_c):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (l_e, l_c)
    _assert_same_state(eager, comp_model, 1e-5)
    eager.eval()
    comp_model.eval()
    with torch.no_grad():
        y_e, y_c = eager(batches[0]), compiled(batches[0])
        y_m = merge_model(comp_model)(batches[0])
    assert torch.allclose(y_e, y_c, rtol=1e-5, atol=1e-6)
    assert torch.allclose(y_m, y_e, rtol=1e-5, atol=1e-5)


def test_calibrated_model_compiles_to_two_graphs():
    """Quantizers initialised before compiling (what the calibration hook does before the
    first ``train_step``): the whole training forward is one graph per est_refresh variant
    (a refresh step and a plain step), with no recompilation as the call count grows."""
    from torch._dynamo.utils import counters
    model = _net()
    batches = _batches(6)
    model(batches[0])
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend='eager')
    _train(compiled, batches)
    assert counters['stats']['unique_graphs'] == 2, dict(counters['stats'])


def test_inductor_training_matches_eager():
    """The real backend (inductor + the C++ compiler, AOTAutograd through the custom
    autograd nodes): a RepQ-BNEst block and a linear head, two SGD steps."""
    torch.manual_seed(0)
    eager = convert_to_repq(nn.Sequential(RepVGGBlock(3, 4, act=nn.ReLU()), nn.Flatten(),
                                          nn.Linear(4 * 36, 3)),
                            w_bits=4, a_bits=4, bn_mode='est').train()
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 3, 6, 6, generator=gen) for _ in range(3)]
    eager(batches[0])
    comp_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(comp_model)
    l_e, l_c = _train(eager, batches[1:]), _train(compiled, batches[1:])
    for a, b in zip(l_e, l_c):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (l_e, l_c)
    _assert_same_state(eager, comp_model, 1e-4)
