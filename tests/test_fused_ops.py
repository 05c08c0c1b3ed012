"""The fused path's ops against their reference formulas: packing, the chunked loss, the frozen
linear layer with its LoRA branch, attention within each example, and the memory plan's choice.

Every test runs on the CPU; the ``device`` parameter adds CUDA where a GPU is present (on the
lent H200: ``pytest tests/test_fused_ops.py``), so the GPU code path is checked by the same assertions.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from bench.shapes import config_kwargs
from loratune.training.data import IGNORE_INDEX, TokenizedExample
from loratune.training.fused import (
    Kernels,
    MemoryPlan,
    MemoryRequest,
    attention,
    choose_plan,
    chunked_cross_entropy,
    pack,
)
from loratune.training.fused.memory import LOSS_CHUNKS, Footprint, footprint, model_bytes, plan_cost
from loratune.training.fused.kernels import rms_norm, rms_norm_with_grad, rms_norm_with_grad_onto, swiglu, swiglu_with_grad
from loratune.training.fused.model import norm_prologue
from loratune.training.fused.residual import ResidualAdd, Stream
from loratune.training.fused.lora_linear import FrozenLinearLora, FrozenWeights, Prologue
from triton_checks import run_triton_check

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
    # bf16 logits, as in training: the gradient (rounded, the target's -1 added after) stays close
    half = hidden.detach().bfloat16().requires_grad_()
    rounded = chunked_cross_entropy(half, weight.bfloat16(), targets, chunk=3)
    (got,) = torch.autograd.grad(2 * rounded, half)
    assert rounded.dtype == torch.float32 and rounded.item() == pytest.approx(dense.item(), rel=2e-2)
    assert ((got.float() - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prologue", [None, "rms_norm", "rms_norm in one pass", "swiglu", "swiglu in one pass"])
@pytest.mark.parametrize("chunk_bytes", [None, 200])
@pytest.mark.parametrize("join", ["apart", "joined", "stacked"])
@pytest.mark.parametrize("dropout", [0.25, 0.0])
def test_frozen_linear_with_lora_and_dropout_has_the_gradients_of_its_formula(
    device, prologue, chunk_bytes, join, dropout
):
    """The autograd function that recomputes its prologue and dropout against plain autograd,
    its backward in one piece or in chunks of tokens (here of 2 or 3 of the 9), its forward with
    the LoRA up-projection joined to the frozen matmul ([x | z] [W | B]^T) or apart, its
    backward's input gradient in one matmul [grad_y | grad_z] [W ; A] (stacked: without a mask)."""
    generator = torch.Generator().manual_seed(0)
    width = 32 if prologue and "swiglu" in prologue else 16
    norm_weight = (1 + 0.1 * torch.randn(16, generator=generator)).to(device)
    functions = {None: None, "rms_norm": lambda u: rms_norm(u, norm_weight, 1e-5), "swiglu": lambda u: swiglu(u, 16)}
    functions["swiglu in one pass"] = Prologue(lambda u: swiglu(u, 16), lambda u, g: swiglu_with_grad(u, g, 16))
    functions["rms_norm in one pass"] = Prologue(
        functions["rms_norm"], lambda u, g: rms_norm_with_grad(u, norm_weight, 1e-5, g)
    )
    function = functions[prologue]
    linear = torch.nn.Linear(16, 12, bias=True).to(device).requires_grad_(False)
    u = torch.randn(9, width, generator=generator).to(device).requires_grad_()
    lora_a = (torch.randn(4, 16, generator=generator) * 0.3).to(device).requires_grad_()
    lora_b = (torch.randn(12, 4, generator=generator) * 0.3).to(device).requires_grad_()
    torch.manual_seed(3)
    weights = FrozenWeights([linear], torch.float32)
    y = FrozenLinearLora.apply(
        u, lora_a, lora_b, weights, dropout, Kernels(), function, chunk_bytes, True, join == "joined", join == "stacked"
    )
    got = torch.autograd.grad(y.square().sum(), (u, lora_a, lora_b))
    x = function(u) if function else u
    torch.manual_seed(3)  # the same mask, by the same call on the same RNG state
    x_dropped = torch.native_dropout(x.detach(), dropout, True)[1] * x / (1 - dropout) if dropout else x
    expected_y = linear(x) + (x_dropped @ lora_a.t()) @ lora_b.t()
    expected = torch.autograd.grad(expected_y.square().sum(), (u, lora_a, lora_b))
    torch.testing.assert_close(y, expected_y)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_bytes", [None, 200])
def test_residual_adds_hand_their_gradient_to_the_norm_that_reads_the_same_tensor(device, chunk_bytes):
    """Two residual blocks h + proj(norm(h)) of the fused layer's form: with the residual path's
    gradient handed to the norm's backward (added and cast in its pass) the gradients are plain
    autograd's; chunked backwards keep autograd's own sum. The first block's input needs no
    gradient (an embedding), as in the model."""
    generator = torch.Generator().manual_seed(1)
    norm_weight = (1 + 0.1 * torch.randn(16, generator=generator)).to(device)
    calls = []

    def counted_onto(*args):
        calls.append(1)
        return rms_norm_with_grad_onto(*args)

    kernels = Kernels(rms_norm_with_grad_onto=counted_onto)
    linears = [torch.nn.Linear(16, 16, bias=False).to(device).requires_grad_(False) for _ in range(2)]
    loras = [
        ((torch.randn(4, 16, generator=generator) * 0.3).to(device).requires_grad_(),
         (torch.randn(16, 4, generator=generator) * 0.3).to(device).requires_grad_())
        for _ in range(2)
    ]
    h0 = torch.randn(9, 16, generator=generator).to(device)
    weights = [FrozenWeights([linear], torch.float32) for linear in linears]

    def blocks(fused: bool):
        hidden, stream = h0, Stream()
        for (a, b), w in zip(loras, weights):
            prologue = norm_prologue(kernels, norm_weight, 1e-5, stream if fused else None)
            delta = FrozenLinearLora.apply(hidden, a, b, w, 0.0, kernels, prologue, chunk_bytes)
            out = Stream()
            if fused:
                hidden = ResidualAdd.apply(hidden, delta, kernels.residual_add, stream, out)
            else:
                hidden = hidden + delta
            stream = out
        return hidden

    params = [p for pair in loras for p in pair]
    got = torch.autograd.grad(blocks(True).float().square().sum(), params)
    assert len(calls) == (0 if chunk_bytes else 1)  # the second block's norm took the first add's gradient
    expected = torch.autograd.grad(blocks(False).float().square().sum(), params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


NF4_KERNEL_CHECK = """
import sys, types, torch, bitsandbytes.functional as bnb
from loratune.training.fused import nf4
device, rows, cols, extra, nested = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
generator = torch.Generator().manual_seed(rows + cols + extra)
weight = torch.randn(rows, cols, generator=generator).to(device, torch.bfloat16)
packed, state = bnb.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested)
linear = types.SimpleNamespace(weight=types.SimpleNamespace(data=packed, quant_state=state))
# the interpreter (CPU) rounds to bf16 its own way: compare fp32 output there, bf16 on CUDA
dtype = torch.bfloat16 if device == "cuda" else torch.float32
state.dtype = dtype
expected = bnb.dequantize_4bit(packed, state)
# every tile the kernel has: scales decoded an output or a block at a time (where blocks fit)
for tile in (nf4.TILE, nf4.Tile(), nf4.Tile(by_block=True), nf4.Tile(8, 64, 2, True), nf4.Tile(4, 256, 8, True)):
    out = torch.full((rows, cols), float("nan"), dtype=dtype, device=device)
    nf4.dequantize(linear, out, tile)
    assert torch.equal(out, expected), (tile, (out - expected).abs().max())
    wide = torch.full((rows, cols + extra), float("nan"), dtype=dtype, device=device)  # a slice of a wider buffer
    nf4.dequantize(linear, wide[:, :cols], tile)
    assert torch.equal(wide[:, :cols], expected) and wide[:, cols:].isnan().all(), tile
print("ok")
"""


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape", [(96, 200, 16, True), (64, 128, 48, False), (40, 330, 4, True), (72, 512, 8, True), (33, 1024, 0, False)]
)
def test_the_nf4_kernel_dequantizes_bit_for_bit_as_bitsandbytes(device, shape):
    """Our Triton kernel against bitsandbytes' dequantization, nested scales or not, odd shapes,
    into its own buffer or a slice of a wider one, with each tile (rows of whole 4-bit blocks:
    512 and 1,024 columns, several tiles a row, more than 256 blocks for the nested second
    level). On a CPU it runs under Triton's interpreter."""
    run_triton_check(NF4_KERNEL_CHECK, device, [str(int(v)) for v in shape])


SWIGLU_KERNEL_CHECK = """
import sys, torch
from loratune.training.fused import kernels, swiglu
device, rows, intermediate, extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
generator = torch.Generator().manual_seed(rows + intermediate)
# the interpreter (CPU) rounds to bf16 its own way: fp32 there (the same arithmetic as eager's), bf16 on CUDA
dtype = torch.bfloat16 if device == "cuda" else torch.float32
wide = (3 * torch.randn(rows, 2 * intermediate + extra, generator=generator)).to(device, dtype)
gate_up = wide[:, : 2 * intermediate]  # rows of a wider buffer: a row stride of its own
grad = torch.randn(rows, intermediate, generator=generator).to(device, dtype)
assert swiglu.runs(gate_up, grad)
x, grad_gate_up = swiglu.swiglu_with_grad(gate_up, grad, intermediate)
expected_x, expected_grad = kernels.swiglu_with_grad(gate_up, grad, intermediate)
tolerance = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
torch.testing.assert_close(x, expected_x, **tolerance)
torch.testing.assert_close(grad_gate_up, expected_grad, **tolerance)
assert x.is_contiguous() and grad_gate_up.is_contiguous() and grad_gate_up.dtype == dtype
print("ok")
"""


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(7, 600, 16), (12, 512, 0), (1, 37, 3)])
def test_the_swiglu_kernel_computes_what_the_compiled_backward_does(device, shape):
    """SwiGLU's output and its input gradient in one Triton pass, against the function the
    compiled path runs: odd token counts and widths (partial tiles), a strided gate|up."""
    run_triton_check(SWIGLU_KERNEL_CHECK, device, [str(v) for v in shape])


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
LLAMA3_8B = config_kwargs("llama3-8b")  # the shape bench/train_speed.py measures
R16_ALL_LINEAR = 32 * 16 * (8192 + 5120 + 5120 + 8192 + 3 * 18432)  # trainable LoRA weights at r=16


def request_8b(**changes) -> MemoryRequest:
    options = dict(
        tokens_per_micro_batch=4 * 2048,
        dropout=0.0,
        checkpointing="auto",
        dequant_cache="auto",
        budget_gib=None,
        device=torch.device("cuda"),
        trainable_params=R16_ALL_LINEAR,
    )
    return MemoryRequest(**{**options, **changes})


def sizes_8b(request: MemoryRequest, compiled: bool = True) -> Footprint:
    from transformers import LlamaConfig

    config = LlamaConfig(**LLAMA3_8B)
    resident = model_bytes(config, quantized=True, trainable_params=request.trainable_params)
    return footprint(config, request, resident_bytes=resident, quantized=True, compiled=compiled)


def all_plans(n_layers: int):
    for checkpointed in range(n_layers + 1):
        for offload, embed, cache, chunked in itertools.product((False, True), repeat=4):
            for chunk in LOSS_CHUNKS:
                offloaded = offload and checkpointed > 0
                yield MemoryPlan(frozenset(range(checkpointed)), cache, offloaded, chunk, embed, chunked)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_the_planner_takes_the_fastest_plan_that_fits_each_budget_of_the_8b_case(dropout):
    """Llama-3-8B shape, NF4, 4 x 2048 tokens, r=16 on every linear layer: against every plan the
    levers allow, the chosen one fits and none that fits is faster; more budget never checkpoints more."""
    request = request_8b(dropout=dropout)
    sizes = sizes_8b(request)
    chosen = {}
    for budget in (8, 16, 24, 40):
        plan = choose_plan(sizes, request, budget=budget * GIB, can_offload=True)
        chosen[budget] = plan
        assert plan.estimate_gib == pytest.approx(sizes.peak(plan) / GIB) and plan.budget_gib == budget
        fitting = [p for p in all_plans(32) if sizes.peak(p) <= budget * GIB]
        if fitting:
            assert sizes.peak(plan) <= budget * GIB
            assert plan_cost(plan) <= min(plan_cost(p) for p in fitting)
        else:  # nothing fits: the lowest plan there is
            assert sizes.peak(plan) == min(sizes.peak(p) for p in all_plans(32))
    counts = [len(chosen[b].checkpointed) for b in (8, 16, 24, 40)]
    assert counts == sorted(counts, reverse=True) and counts[0] >= 30 and counts[-1] < 8
    lowest = chosen[8]
    assert sizes.peak(lowest) <= 8 * GIB and lowest.offload and lowest.embed_on_host
    if dropout == 0:  # the calibrated model leaves 8 GiB room for the whole backward and 1024-token chunks
        assert not lowest.chunked_backward and lowest.loss_chunk == LOSS_CHUNKS[0]
        # hosting the embedding (measured: 1.1 layers' time a step) costs more than recomputing the
        # 1.2 layers its GiB holds, so only the lowest budget hosts it
        assert not chosen[16].embed_on_host and not chosen[24].embed_on_host
    if dropout == 0:  # at 40 GiB all activations fit: nothing recomputed, nothing in host memory
        assert not chosen[40].checkpointed and not chosen[40].embed_on_host and not chosen[40].chunked_backward
    assert chosen[16].offload  # the inputs of the many checkpointed layers wait in host memory
    assert not any(p.dequant_cache for p in chosen.values())  # 13 GiB of bf16 weights fit in none
    for budget, plan in chosen.items():  # the room left over: the last layers' weights stay dequantized
        assert plan.cached_layers <= 32 - len(plan.checkpointed)  # never a recomputed layer's
        if plan.cached_layers < 32 - len(plan.checkpointed):  # as many as fit
            assert sizes.peak(replace(plan, cached_layers=plan.cached_layers + 1)) > budget * GIB
    if dropout == 0:  # at 40 GiB about 5 GiB are left: 10 or more layers of 0.44 GiB
        assert chosen[40].cached_layers >= 10
        assert plan_cost(chosen[40]) == 0 and sizes.peak(chosen[40]) <= 40 * GIB
    assert not choose_plan(sizes, request_8b(dequant_cache=False), budget=40 * GIB, can_offload=True).cached_layers
    assert choose_plan(sizes, request, budget=80 * GIB, can_offload=True).dequant_cache


# The four plans the H200 ran (bench/results/train_speed_peers_h200_2026-12-01_f2d31a7.md, dropout
# 0): recomputed layers, inputs and embedding in host memory, chunked backward, loss chunk; peak GiB.
MEASURED_8B_PEAKS = [
    (32, True, True, True, 256, 7.1),
    (23, True, True, False, 1024, 14.5),
    (13, True, True, False, 256, 22.5),
    (0, False, False, False, 1024, 34.9),
]


@pytest.mark.parametrize("recomputed, offload, embed, chunked, chunk, measured", MEASURED_8B_PEAKS)
def test_the_footprint_model_meets_the_measured_8b_peaks_within_its_margin(
    recomputed, offload, embed, chunked, chunk, measured
):
    """The model's peak of each measured plan is torch's peak allocation there, to within the
    safety margin above it and a tenth of a GiB below (the GPU's resident bytes are a little more
    than ``model_bytes``: the H200 estimates were 0.2 GiB higher)."""
    from loratune.training.fused.memory import SAFETY_MARGIN

    sizes = sizes_8b(request_8b())
    plan = MemoryPlan(frozenset(range(recomputed)), False, offload, chunk, embed, chunked)
    estimate = sizes.peak(plan) / GIB
    assert measured - 0.1 <= estimate <= measured + SAFETY_MARGIN / GIB


def test_the_levers_lower_the_8b_peak_and_the_fixed_settings_are_kept():
    request = request_8b()
    sizes = sizes_8b(request)
    every = frozenset(range(32))
    resident = MemoryPlan(every, False)
    offloaded = MemoryPlan(every, False, offload=True)
    small = MemoryPlan(every, False, offload=True, loss_chunk=256)
    embedding = MemoryPlan(every, False, offload=True, loss_chunk=256, embed_on_host=True)
    assert sizes.peak(small) - sizes.peak(embedding) == 128256 * 4096 * 2  # the bf16 input embedding
    chunked = MemoryPlan(every, False, offload=True, loss_chunk=256, embed_on_host=True, chunked_backward=True)
    assert sizes.peak(chunked) < sizes.peak(embedding)
    # 31 of 32 fp32 inputs leave the GPU; the one prefetched comes back in bf16
    assert sizes.peak(resident) - sizes.peak(offloaded) == 31 * 8192 * 4096 * 4 - 8192 * 4096 * 2
    # With every layer recomputed the backward, not the loss, is the peak; with none, the loss chunk is.
    assert sizes.peak(small) == sizes.peak(offloaded)
    assert sizes.peak(MemoryPlan(frozenset(), False, loss_chunk=256)) < sizes.peak(MemoryPlan(frozenset(), False))
    assert sizes_8b(request, compiled=False).peak(small) > sizes.peak(small)  # eager kernels keep more
    forced = choose_plan(sizes, request_8b(checkpointing=True), budget=60 * GIB, can_offload=True)
    assert forced.checkpointed == every and not forced.offload  # room enough to keep the inputs on the GPU
    assert (
        choose_plan(sizes, request_8b(checkpointing=False), budget=8 * GIB, can_offload=True).checkpointed
        == frozenset()
    )
    cached = choose_plan(sizes, request_8b(dequant_cache=True), budget=24 * GIB, can_offload=True)
    uncached = choose_plan(sizes, request, budget=24 * GIB, can_offload=True)
    assert cached.dequant_cache and not uncached.dequant_cache  # asked for, the cache comes first:
    assert len(cached.checkpointed) > len(uncached.checkpointed)  # more layers recompute
    assert not choose_plan(sizes, request_8b(dequant_cache=False), budget=80 * GIB, can_offload=True).dequant_cache
    assert not choose_plan(sizes, request, budget=8 * GIB, can_offload=False).offload


@pytest.mark.parametrize("device", DEVICES)
def test_host_offload_holds_only_the_checkpointed_input_and_brings_it_back_in_backward_order(device):
    import torch.utils.checkpoint

    from loratune.training.fused.offload import HostOffload

    dev = torch.device(device)
    weight = torch.randn(8, 8, device=dev, requires_grad=True)
    side = torch.randn(8, device=dev)  # saved too, but not the layer input: stays where it is

    def layer(x, side):
        return torch.tanh(x @ weight) * side

    def run(offload):
        torch.manual_seed(0)
        x = torch.randn(5, 8, device=dev).requires_grad_()
        hidden = x * 2
        for _ in range(3):
            if offload is None:
                hidden = torch.utils.checkpoint.checkpoint(layer, hidden, side, use_reentrant=False)
            else:
                with offload.layer_input(hidden):
                    hidden = torch.utils.checkpoint.checkpoint(layer, hidden, side, use_reentrant=False)
        loss = hidden.square().sum()
        loss.backward()
        grads = (loss.detach(), x.grad.clone(), weight.grad.clone())
        weight.grad = None
        return grads

    expected = run(None)
    exact = HostOffload(dev, torch.float32)
    for a, b in zip(run(exact), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [record.host.device.type for record in exact.saved] == ["cpu"] * 3
    assert all(record.back is None for record in exact.saved)  # each went back once, and was let go
    rounded = HostOffload(dev)  # the default: bf16 host copies, half the bytes
    loss, *grads = run(rounded)
    assert [record.host.dtype for record in rounded.saved] == [torch.bfloat16] * 3
    assert loss == expected[0]  # the forward is exact; only the recomputation starts from rounded inputs
    for a, b in zip(grads, expected[1:]):
        # a few bf16 roundings (the tanh chain amplifies them)
        assert not torch.equal(a, b) and ((a - b).norm() / b.norm()).item() < 3e-2
