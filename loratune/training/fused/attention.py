"""A micro-batch as one flat token stream, and causal attention within each of its examples."""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from loratune.training.data import IGNORE_INDEX, TokenizedExample

log = logging.getLogger(__name__)


@dataclass
class PackedBatch:
    """The examples of one micro-batch as one flat token stream, with next-token targets."""

    input_ids: torch.Tensor  # (T,)
    targets: torch.Tensor  # (T,): the label of the next token of the same example, or IGNORE_INDEX
    position_ids: torch.Tensor  # (T,): restart at 0 for each example
    lengths: list[int]
    cu_seqlens: torch.Tensor  # (n + 1,) int32, on the device
    # The token ids as built, in host memory: an input embedding kept there (the memory plan) looks
    # them up without waiting for the device to send them back.
    host_input_ids: torch.Tensor

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def pack(examples: Sequence[TokenizedExample], device: torch.device) -> PackedBatch:
    """Concatenate ``examples``; position t is trained to predict token t+1 of the same example."""
    ids, targets, positions, lengths = [], [], [], []
    for example in examples:
        n = len(example.input_ids)
        ids.extend(example.input_ids)
        targets.extend(list(example.labels[1:]) + [IGNORE_INDEX])
        positions.extend(range(n))
        lengths.append(n)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    host_ids = torch.tensor(ids, dtype=torch.long)
    return PackedBatch(
        input_ids=host_ids.to(device, non_blocking=True),
        targets=torch.tensor(targets, dtype=torch.long).to(device, non_blocking=True),
        position_ids=torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True),
        lengths=lengths,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True),
        host_input_ids=host_ids,
    )


_VARLEN: dict[str, object] = {}


def _varlen_attention():
    """torch's variable-length flash attention with a causal mask, if this torch has one whose
    forward and backward run here (probed once on a tiny input); else None."""
    if "fn" in _VARLEN:
        return _VARLEN["fn"]
    fn = None
    try:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        if "window_size" in params:
            causal = {"window_size": (-1, 0)}
        elif "is_causal" in params:
            causal = {"is_causal": True}
        else:
            raise ImportError("no causal option")

        def fn(q, k, v, cu, longest, scale):
            return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **causal)

        q = torch.randn(6, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cu = torch.tensor([0, 2, 6], device="cuda", dtype=torch.int32)
        fn(q, q, q, cu, 4, 0.125).sum().backward()
    except Exception as error:  # no such function, no kernel for this GPU, no backward, ...
        log.info("variable-length attention unavailable (%s); attending example by example", error)
        fn = None
    _VARLEN["fn"] = fn
    return fn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Causal attention within each example of the stream; q (T, Hq, D), k/v (T, Hkv, D) → (T, Hq·D)."""
    total, heads, dim = q.shape
    scale = 1.0 / math.sqrt(dim)
    gqa = k.shape[1] != heads
    lengths = batch.lengths
    if len(set(lengths)) == 1:  # equal lengths: one batched call of the fastest SDPA kernel
        n, length = len(lengths), lengths[0]

        def split(t):
            return t.view(n, length, t.shape[1], dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(total, heads * dim)
    varlen = _varlen_attention() if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) else None
    if varlen is not None:
        if gqa:  # this kernel wants as many key/value heads as query heads
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        return varlen(q, k, v, batch.cu_seqlens, max(lengths), scale).reshape(total, heads * dim)
    outs = []
    start = 0
    for length in lengths:
        s = slice(start, start + length)
        part = F.scaled_dot_product_attention(
            q[s].transpose(0, 1)[None],
            k[s].transpose(0, 1)[None],
            v[s].transpose(0, 1)[None],
            is_causal=True,
            scale=scale,
            enable_gqa=gqa,
        )
        outs.append(part[0].transpose(0, 1).reshape(length, heads * dim))
        start += length
    return torch.cat(outs)
