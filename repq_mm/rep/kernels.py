"""Differentiable kernel algebra for merging branches (torch only).

Kernels follow ``nn.Conv2d``: ``W`` has shape ``(O, I / groups, kh, kw)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def centre_offset(size: tuple[int, int], kernel_size: tuple[int, int]) -> tuple[int, int]:
    """Offsets ``(ph, pw)`` of a ``size`` kernel centred in ``kernel_size``; ``ValueError``
    when it cannot be centred."""
    (kh, kw), (th, tw) = tuple(size), tuple(kernel_size)
    if (th - kh) % 2 or (tw - kw) % 2 or th < kh or tw < kw:
        raise ValueError(f'cannot centre a {kh}x{kw} kernel in {th}x{tw}')
    return (th - kh) // 2, (tw - kw) // 2


def pad_to(w: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad a kernel centrally to ``kernel_size`` (e.g. 1x1 or 1x3 into 3x3)."""
    ph, pw = centre_offset(w.shape[-2:], kernel_size)
    if not (ph or pw):
        return w
    return F.pad(w, (pw, pw, ph, ph))


def regroup(w: torch.Tensor, groups: int, target_groups: int, in_channels: int) -> torch.Tensor:
    """Express a kernel with ``groups`` as an equivalent kernel with ``target_groups``.

    ``groups`` must be a multiple of ``target_groups``; the result is block-diagonal with
    zeros (a depthwise kernel becomes a dense diagonal one for ``target_groups=1``).
    """
    if groups == target_groups:
        return w
    if groups % target_groups:
        raise ValueError(f'cannot regroup a groups={groups} kernel to groups={target_groups}')
    o, ig = w.shape[:2]
    it = in_channels // target_groups
    og = o // groups
    grp = torch.arange(o, device=w.device) // og                  # own group of each output
    tgrp = torch.arange(o, device=w.device) // (o // target_groups)
    offset = grp * ig - tgrp * it                                  # start inside target slice
    idx = (offset[:, None] + torch.arange(ig, device=w.device)[None]).reshape(o, ig, 1, 1)
    out = w.new_zeros(o, it, *w.shape[2:])
    return out.scatter(1, idx.expand_as(w), w)


def identity_kernel(channels: int, groups: int, dtype=None, device=None) -> torch.Tensor:
    """1x1 identity kernel ``(C, C / groups, 1, 1)``."""
    ig = channels // groups
    w = torch.zeros(channels, ig, 1, 1, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    w[idx, idx % ig, 0, 0] = 1.0
    return w


def compose(wa: torch.Tensor, ba: torch.Tensor, wb: torch.Tensor, bb: torch.Tensor | None,
            groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``conv_b(conv_a(x))`` (both with ``groups``), where one of the
    two kernels is 1x1. Exact when the intermediate map is padded with ``ba``.

    ``M[o,i,u,v] = sum_d Wb[o,d,u,v] Wa[d,i]`` (1x1 first) or ``sum_d Wb[o,d] Wa[d,i,u,v]``.
    """
    d, ia = wa.shape[:2]
    o, db = wb.shape[:2]
    g = groups
    wb_g = wb.reshape(g, o // g, db, *wb.shape[2:])
    if wa.shape[-2:] == (1, 1):
        wa_g = wa.reshape(g, d // g, ia)
        w = torch.einsum('godhw,gdi->goihw', wb_g, wa_g).reshape(o, ia, *wb.shape[2:])
    elif wb.shape[-2:] == (1, 1):
        wa_g = wa.reshape(g, d // g, ia, *wa.shape[2:])
        w = torch.einsum('god,gdihw->goihw', wb_g[..., 0, 0], wa_g).reshape(o, ia, *wa.shape[2:])
    else:
        raise ValueError('compose() needs one of the two kernels to be 1x1, got '
                         f'{tuple(wa.shape[-2:])} then {tuple(wb.shape[-2:])}')
    b = apply_to_channels(wb, ba, groups)
    if bb is not None:
        b = b + bb
    return w, b


def apply_to_channels(w: torch.Tensor, c: torch.Tensor, groups: int) -> torch.Tensor:
    """Output of kernel ``w`` (no bias) for an input that is the constant ``c[i]`` in
    channel ``i``: ``sum_{i,u,v} W[o,i,u,v] c_i`` (grouped)."""
    o, ig = w.shape[:2]
    ws = w.sum(dim=(2, 3)).reshape(groups, o // groups, ig)
    return torch.bmm(ws, c.reshape(groups, ig, 1)).reshape(o)
