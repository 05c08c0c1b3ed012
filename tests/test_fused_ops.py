"""The fused path's ops against their reference formulas: packing, the chunked loss, the frozen
linear layer with its LoRA branch, attention within each example, and the memory plan's choice.

Every test runs on the CPU; the ``device`` parameter adds CUDA where a GPU is present (on the
lent H200: ``pytest tests/test_fused_ops.py``), so the GPU code path is checked by the same assertions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loratune.training.data import IGNORE_INDEX, TokenizedExample
from loratune.training.fused import Kernels, attention, choose_plan, chunked_cross_entropy, pack
from loratune.training.fused.kernels import rms_norm, swiglu
from loratune.training.fused.lora_linear import FrozenLinearLora, FrozenWeights

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


# ---- packing and the loss ---------------------------------------------------------------
def test_pack_restarts_positions_and_never_predicts_across_examples():
    batch = pack(
        [TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), TokenizedExample([8, 9], [8, 9])], torch.device("cpu")
    )
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 9]
    assert batch.position_ids.tolist() == [0, 1, 2, 0, 1]
    # position t predicts the label of t+1 within its example; the last token of each predicts nothing
    assert batch.targets.tolist() == [6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]
    assert batch.cu_seqlens.tolist() == [0, 3, 5] and batch.tokens == 5


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_cross_entropy_equals_the_dense_loss_and_gradient(device):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=generator).to(device).requires_grad_()
    weight = torch.randn(40, 16, generator=generator).to(device)
    targets = torch.randint(0, 40, (11,), generator=generator).to(device)
    targets[[0, 5, 10]] = IGNORE_INDEX
    dense = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (expected,) = torch.autograd.grad(2 * dense, hidden)
    chunked = chunked_cross_entropy(hidden, weight, targets, chunk=3)  # chunks that do not divide 11
    (got,) = torch.autograd.grad(2 * chunked, hidden)
    assert chunked.item() == pytest.approx(dense.item(), rel=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # evaluation: the loss alone
        assert chunked_cross_entropy(hidden, weight, targets).item() == pytest.approx(dense.item(), rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prologue", [None, "rms_norm", "swiglu"])
def test_frozen_linear_with_lora_and_dropout_has_the_gradients_of_its_formula(device, prologue):
    """The autograd function that recomputes its prologue and dropout against plain autograd."""
    generator = torch.Generator().manual_seed(0)
    width = 32 if prologue == "swiglu" else 16
    norm_weight = (1 + 0.1 * torch.randn(16, generator=generator)).to(device)
    functions = {None: None, "rms_norm": lambda u: rms_norm(u, norm_weight, 1e-5), "swiglu": lambda u: swiglu(u, 16)}
    function = functions[prologue]
    linear = torch.nn.Linear(16, 12, bias=True).to(device).requires_grad_(False)
    u = torch.randn(9, width, generator=generator).to(device).requires_grad_()
    lora_a = (torch.randn(4, 16, generator=generator) * 0.3).to(device).requires_grad_()
    lora_b = (torch.randn(12, 4, generator=generator) * 0.3).to(device).requires_grad_()
    torch.manual_seed(3)
    y = FrozenLinearLora.apply(u, lora_a, lora_b, FrozenWeights([linear], torch.float32), 0.25, Kernels(), function)
    got = torch.autograd.grad(y.square().sum(), (u, lora_a, lora_b))
    x = function(u) if function else u
    torch.manual_seed(3)  # the same mask, by the same call on the same RNG state
    _, mask = torch.native_dropout(x.detach(), 0.25, True)
    expected_y = linear(x) + ((x * mask / 0.75) @ lora_a.t()) @ lora_b.t()
    expected = torch.autograd.grad(expected_y.square().sum(), (u, lora_a, lora_b))
    torch.testing.assert_close(y, expected_y)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the variable-length kernel is CUDA only")
def test_variable_length_attention_equals_attending_example_by_example():
    lengths = [5, 17, 2, 9]
    batch = pack([TokenizedExample(list(range(n)), list(range(n))) for n in lengths], torch.device("cuda"))
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(sum(lengths), 8, 64, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()
    kv = torch.randn(2, sum(lengths), 2, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    k, v = kv[0].requires_grad_(), kv[1].requires_grad_()
    got = attention(q, k, v, batch)
    grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    expected, start = [], 0
    for n in lengths:
        part = F.scaled_dot_product_attention(
            *(t[start : start + n].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True, enable_gqa=True
        )
        expected.append(part[0].transpose(0, 1).reshape(n, -1))
        start += n
    expected = torch.cat(expected)
    expected_grads = torch.autograd.grad(expected.float().square().sum(), (q, k, v))
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


# ---- memory plan -------------------------------------------------------------------------
GIB = 2**30


def test_the_budget_decides_how_many_layers_recompute_and_whether_weights_stay_dequantized():
    common = dict(fixed=10 * GIB, per_layer=1 * GIB, n_layers=32, cache_bytes=14 * GIB, dequant_cache="auto")
    tight = choose_plan(budget=30 * GIB, checkpointing="auto", **common)
    assert tight.checkpointed == frozenset(range(12)) and not tight.dequant_cache  # 20 layers kept, first 12 recompute
    roomy = choose_plan(budget=60 * GIB, checkpointing="auto", **common)
    assert roomy.checkpointed == frozenset() and roomy.dequant_cache  # 42 GiB + 14 GiB cache fit in 60
    assert len(choose_plan(budget=60 * GIB, checkpointing=True, **common).checkpointed) == 32
    assert choose_plan(budget=5 * GIB, checkpointing=False, **common).checkpointed == frozenset()
    assert len(choose_plan(budget=5 * GIB, checkpointing="auto", **common).checkpointed) == 32
    assert not choose_plan(budget=60 * GIB, checkpointing="auto", **{**common, "cache_bytes": 0}).dequant_cache
    assert not choose_plan(budget=60 * GIB, checkpointing="auto", **{**common, "dequant_cache": False}).dequant_cache
    forced = choose_plan(budget=30 * GIB, checkpointing="auto", **{**common, "dequant_cache": True})
    assert forced.dequant_cache and len(forced.checkpointed) == 26  # the cache's 14 GiB leave room for 6 layers
