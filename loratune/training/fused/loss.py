"""The chunked cross-entropy over the output layer."""

from __future__ import annotations

import torch

from loratune.training.data import IGNORE_INDEX

LOSS_CHUNK_TOKENS = 1024  # tokens per chunk of the chunked cross-entropy, unless the memory plan asks for fewer


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed next-token cross-entropy of ``hidden @ weight.T`` without holding all the logits.

    The output weight is frozen; the input gradient is computed chunk by chunk in the forward
    (the loss is a sum, so the backward only scales it), so at most one chunk of fp32 logits
    exists at a time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        total = hidden.new_zeros((), dtype=torch.float32)
        need_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = (h @ weight.t()).float()
            valid = t != IGNORE_INDEX
            safe = torch.where(valid, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None])[:, 0]
            total += ((lse - picked) * valid).sum()
            if need_grad:
                probs = torch.exp_(logits.sub_(lse[:, None]))
                probs.scatter_add_(1, safe[:, None], -valid[:, None].float())
                probs.mul_(valid[:, None])
                grad_hidden[start : start + chunk] = probs.to(hidden.dtype) @ weight
        if need_grad:
            ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def chunked_cross_entropy(hidden, weight, targets, chunk: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    return ChunkedCrossEntropy.apply(hidden, weight, targets, chunk)
