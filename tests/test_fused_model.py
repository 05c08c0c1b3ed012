"""The fused model computes what the plain transformers + peft path computes: losses and LoRA
gradients of whole (tiny) models in fp32, bf16 and NF4, its memory plan on a real model, and
whole trials through both paths.

Every test runs on the CPU; the ``device`` parameter adds CUDA where a GPU is present (on the
lent H200: ``pytest tests/test_fused_model.py``), so the GPU code path (bf16 kernels, the
dequantize-into-one-buffer path, compiled kernels) is checked by the same assertions.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from loratune.training import TrainingSettings, run_trial
from loratune.training.data import IGNORE_INDEX, TokenizedExample
from loratune.training.fused import (
    FusedCausalLM,
    MemoryPlan,
    MemoryRequest,
    config_unsupported_reason,
    pack,
    plan_memory,
)
from loratune.training.fused.residual import Stream
from loratune.training.models import add_lora, load_base_model
from loratune.training.trainer import choose_fused, collate, summed_token_loss
from triton_checks import run_triton_check

ALL = TrainingSettings().target_modules
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def four_bit_unusable(device: str) -> str | None:
    try:
        import bitsandbytes.functional as bnb

        packed, state = bnb.quantize_4bit(torch.randn(64, 64, dtype=torch.bfloat16, device=device), quant_type="nf4")
        bnb.dequantize_4bit(packed, state)
    except Exception as error:  # any failure means: not usable here
        return f"bitsandbytes 4-bit is not usable on this {device} ({type(error).__name__}: {error})"
    return None


def lora_model(
    path: str, *, quantization="none", dtype=torch.float32, device="cpu", fused: bool, targets=ALL, dropout=0.0, seed=0
):
    """A LoRA-wrapped tiny Llama whose B matrices are random (peft starts them at zero)."""
    torch.manual_seed(seed)
    model = load_base_model(
        path,
        quantization=quantization,
        dtype=dtype,
        device=torch.device(device),
        gradient_checkpointing=False,
        fused=fused,
    )
    model = add_lora(model, rank=4, alpha=8, dropout=dropout, target_modules=targets)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(
                    torch.randn(
                        param.shape, generator=torch.Generator().manual_seed(zlib.crc32(f"{seed}{name}".encode()))
                    )
                    * 0.1
                )
    return model


def examples(lengths=(7, 12, 5, 12), prompt=2, seed=1) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 300, (n,), generator=generator).tolist()
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.float().clone() for name, p in model.named_parameters() if p.requires_grad}


def relative_error(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)


PLANS_NF4 = {  # the memory plans of the 4-bit model, besides the default (nothing recomputed)
    "lowest": MemoryPlan(  # but the embedding in host memory: tied here (test_the_embedding_in_host_memory...)
        checkpointed=frozenset({0, 1}), dequant_cache=False, offload=True, loss_chunk=8, chunked_backward=True
    ),
    "cached, half checkpointed": MemoryPlan(checkpointed=frozenset({0}), dequant_cache=True),
    "the last layer cached": MemoryPlan(checkpointed=frozenset({0}), dequant_cache=False, cached_layers=1),
}


# ---- the fused model against the plain one ----------------------------------------------
@pytest.mark.parametrize("targets", [ALL, ("q_proj", "v_proj"), ("down_proj",)])
def test_fused_loss_and_lora_gradients_equal_the_plain_path_in_fp32(tiny_model, targets):
    batch = examples()
    plain = lora_model(tiny_model, fused=False, targets=targets)
    plain.train()
    expected = summed_token_loss(plain, collate(batch, 0, torch.device("cpu")), torch.float32)
    expected.backward()
    for join_lora in (False, True):
        fused_model = lora_model(tiny_model, fused=True, targets=targets)
        got = FusedCausalLM(fused_model, join_lora=join_lora).loss(pack(batch, torch.device("cpu")), training=True)
        got.backward()
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
        assert relative_error(lora_grads(fused_model), lora_grads(plain)) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_fused_path_is_as_close_to_fp32_as_the_plain_path(tiny_model, device):
    """In bf16 both paths round differently; the fused one must not be further from exact."""
    batch = examples()
    dev = torch.device(device)
    exact_model = lora_model(tiny_model, device=device, fused=False)
    exact_model.train()
    summed_token_loss(exact_model, collate(batch, 0, dev), torch.float32).backward()
    exact = lora_grads(exact_model)
    plain = lora_model(tiny_model, dtype=torch.bfloat16, device=device, fused=False)
    plain.train()
    summed_token_loss(plain, collate(batch, 0, dev), torch.bfloat16).backward()
    fused_model = lora_model(tiny_model, dtype=torch.bfloat16, device=device, fused=True)
    FusedCausalLM(fused_model, compile=device == "cuda").loss(pack(batch, dev), training=True).backward()
    plain_error = relative_error(lora_grads(plain), exact)
    fused_error = relative_error(lora_grads(fused_model), exact)
    assert fused_error < max(1.25 * plain_error, 0.02), (fused_error, plain_error)


@pytest.mark.parametrize("device", DEVICES)
def test_nf4_fused_path_trains_the_same_model_as_the_plain_qlora_path(tiny_model, device):
    """The 4-bit path: same loss within bf16 rounding, gradients in every LoRA weight (the repack trap)."""
    if four_bit_unusable(device):
        pytest.skip(four_bit_unusable(device))
    batch = examples()
    dev = torch.device(device)
    plain = lora_model(tiny_model, quantization="nf4", dtype=torch.bfloat16, device=device, fused=False)
    plain.train()
    expected = summed_token_loss(plain, collate(batch, 0, dev), torch.bfloat16)
    expected.backward()
    fused_model = lora_model(tiny_model, quantization="nf4", dtype=torch.bfloat16, device=device, fused=True)
    fused = FusedCausalLM(fused_model, compile=device == "cuda")
    assert fused.quantized
    got = fused.loss(pack(batch, dev), training=True)
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=0.01)
    grads = lora_grads(fused_model)
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert relative_error(grads, lora_grads(plain)) < 0.3


@pytest.fixture(scope="module")
def untied_tiny_model(tmp_path_factory) -> str:
    """The tiny model with an input embedding of its own (one the memory plan may move to the host)."""
    from tiny_models import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("untied") / "model", tie_word_embeddings=False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", [None, *PLANS_NF4])
@pytest.mark.parametrize("join_lora", [None, True, False])
def test_nf4_fused_gradients_are_as_exact_as_the_plain_qlora_recipe(tiny_model, device, plan, join_lora):
    """Against fp32 arithmetic on the same dequantized NF4 weights, the fused path's LoRA
    gradients are no further off than the plain recipe's (which keeps the residual stream fp32),
    with the LoRA up-projection joined to the frozen matmul (None: where it pays, on CUDA) or not."""
    if four_bit_unusable(device):
        pytest.skip(four_bit_unusable(device))
    import bitsandbytes.functional as bnb

    batch = examples()
    dev = torch.device(device)
    quantized = lora_model(tiny_model, quantization="nf4", dtype=torch.bfloat16, device=device, fused=True)
    exact_model = lora_model(tiny_model, device=device, fused=False)
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in exact_model.named_modules():
            state = getattr(getattr(modules.get(name), "weight", None), "quant_state", None)
            if name.endswith("base_layer") and state is not None:
                module.weight.copy_(bnb.dequantize_4bit(modules[name].weight.data, state).float())
    exact_model.train()
    summed_token_loss(exact_model, collate(batch, 0, dev), torch.float32).backward()
    exact = lora_grads(exact_model)
    plain = lora_model(tiny_model, quantization="nf4", dtype=torch.bfloat16, device=device, fused=False)
    plain.train()
    summed_token_loss(plain, collate(batch, 0, dev), torch.bfloat16).backward()
    fused = FusedCausalLM(quantized, compile=device == "cuda", join_lora=join_lora)
    if plan is not None:
        fused.apply_plan(PLANS_NF4[plan])
    fused.loss(pack(batch, dev), training=True).backward()
    plain_error = relative_error(lora_grads(plain), exact)
    fused_error = relative_error(lora_grads(quantized), exact)
    assert fused_error < 1.25 * plain_error, (fused_error, plain_error)


PLANS = {  # the levers of the memory plan, on the two layers of the tiny model
    "checkpointed": MemoryPlan(checkpointed=frozenset({0, 1}), dequant_cache=False),
    "offloaded": MemoryPlan(checkpointed=frozenset({0, 1}), dequant_cache=False, offload=True),
    "one offloaded, small loss chunks, chunked backward": MemoryPlan(
        checkpointed=frozenset({0}), dequant_cache=False, offload=True, loss_chunk=5, chunked_backward=True
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", list(PLANS))
def test_every_plan_gives_the_same_gradients_dropout_included(tiny_model, device, plan):
    batch = examples()
    dev = torch.device(device)
    grads = []
    for memory_plan in (MemoryPlan(checkpointed=frozenset(), dequant_cache=False), PLANS[plan]):
        model = lora_model(tiny_model, device=device, fused=True, dropout=0.1)
        fused = FusedCausalLM(model)
        fused.apply_plan(memory_plan)
        torch.manual_seed(7)
        fused.loss(pack(batch, dev), training=True).backward()
        grads.append(lora_grads(model))
    assert relative_error(grads[1], grads[0]) < 1e-5


def test_the_recomputation_skips_only_the_down_projections_frozen_matmul(tiny_model):
    """A checkpointed layer's backward recomputes its forward but for the down projection's frozen
    matmul (its output is used by nothing the backward needs), and the gradients stay the same."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = examples()
    tokens = sum(len(e.input_ids) for e in batch)
    backward_flops, grads = [], []
    for checkpointed in (frozenset(), frozenset({0, 1})):
        model = lora_model(tiny_model, fused=True)
        fused = FusedCausalLM(model)
        fused.apply_plan(MemoryPlan(checkpointed=checkpointed, dequant_cache=False))
        loss = fused.loss(pack(batch, torch.device("cpu")), training=True)
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        backward_flops.append(counter.get_total_flops())
        grads.append(lora_grads(model))
    config = model.config
    hidden = torch.randn(tokens, config.hidden_size)
    packed = pack(batch, torch.device("cpu"))
    cos, sin = fused.rotary_emb(hidden, packed.position_ids[None])
    layer_flops = []
    for recompute in (False, True):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fused.layers[0].forward(hidden, Stream(), cos[0], sin[0], packed, fused.kernels, fused.shape, True, recompute)
        layer_flops.append(counter.get_total_flops())
    assert layer_flops[0] - layer_flops[1] == 2 * tokens * config.intermediate_size * config.hidden_size
    assert backward_flops[1] - backward_flops[0] == 2 * layer_flops[1]  # two layers recomputed, down's matmul not
    assert relative_error(grads[1], grads[0]) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the embedding moves only from a GPU")
def test_the_embedding_in_host_memory_changes_nothing(untied_tiny_model):
    batch = examples()
    results = []
    for on_host in (False, True):
        model = lora_model(untied_tiny_model, dtype=torch.bfloat16, device="cuda", fused=True)
        fused = FusedCausalLM(model)
        fused.apply_plan(MemoryPlan(checkpointed=frozenset(), dequant_cache=False, embed_on_host=on_host))
        assert fused.embed.device.type == ("cpu" if on_host else "cuda")
        loss = fused.loss(pack(batch, torch.device("cuda")), training=True)
        loss.backward()
        results.append((loss.item(), lora_grads(model)))
        fused.apply_plan(MemoryPlan(checkpointed=frozenset(), dequant_cache=False))
        assert fused.embed.device.type == "cuda"  # and back
    assert results[0][0] == results[1][0]
    assert relative_error(results[1][1], results[0][1]) == 0


def test_a_tied_embedding_cannot_wait_in_host_memory(tiny_model):
    fused = FusedCausalLM(lora_model(tiny_model, fused=True))
    with pytest.raises(ValueError, match="tied to the output layer"):
        fused.apply_plan(MemoryPlan(checkpointed=frozenset(), dequant_cache=False, embed_on_host=True))


@pytest.mark.parametrize("device", DEVICES)
def test_dequantized_weight_cache_changes_nothing(tiny_model, device):
    if four_bit_unusable(device):
        pytest.skip(four_bit_unusable(device))
    check_the_dequantized_weight_cache_changes_nothing(tiny_model, device)


def check_the_dequantized_weight_cache_changes_nothing(tiny_model: str, device: str) -> None:
    """No cache, the whole cache, the last layer's: the same loss and gradients, the LoRA
    up-projection joined to the frozen matmul where it pays (with our NF4 kernel: into the cache's
    room beside the frozen weight) or never."""
    batch = examples()
    plans = {
        "none": MemoryPlan(checkpointed=frozenset(), dequant_cache=False),
        "every layer": MemoryPlan(checkpointed=frozenset(), dequant_cache=True),
        "the last layer": MemoryPlan(checkpointed=frozenset({0}), dequant_cache=False, cached_layers=1),
    }
    for join_lora in (None, False):
        results = {}
        for name, plan in plans.items():
            model = lora_model(tiny_model, quantization="nf4", dtype=torch.bfloat16, device=device, fused=True)
            fused = FusedCausalLM(model, join_lora=join_lora)
            fused.apply_plan(plan)
            cached = [all(g.weights.cache is not None for g in layer.groups) for layer in fused.layers]
            assert cached == [i in plan.cached_layer_indices(2) for i in range(2)], name
            if join_lora is None:  # a cache keeps the join where it pays uncached (our kernel's)
                assert [g.join_pays for g in fused.layers[1].groups] == [
                    g.weights.kernel and sum(g.weights.sizes) > g.weights.in_features for g in fused.layers[1].groups
                ]
            for step in range(2):  # the second use writes the LoRA up-weight into the cache again
                model.zero_grad()
                loss = fused.loss(pack(batch, torch.device(device)), training=True)
                loss.backward()
            results[name] = (loss.item(), lora_grads(model))
        for name in ("every layer", "the last layer"):
            assert results[name][0] == results["none"][0], (join_lora, name)
            assert relative_error(results[name][1], results["none"][1]) < 1e-2, (join_lora, name)


CACHE_UNDER_TRITON = """
import sys, pathlib, torch
from tiny_models import build_tiny_llama
from test_fused_model import check_the_dequantized_weight_cache_changes_nothing
from loratune.training.fused import nf4
device, target = sys.argv[1], pathlib.Path(sys.argv[2])
assert nf4.available(torch.device(device))
check_the_dequantized_weight_cache_changes_nothing(str(build_tiny_llama(target)), device)
print("ok")
"""


def test_the_cache_with_room_for_the_lora_weight_changes_nothing_under_triton(tmp_path):
    """The same check where our NF4 kernel runs (CUDA; on a CPU, Triton's interpreter): the cache
    is then [W | zeros] and each use writes the LoRA up-weight beside W."""
    if four_bit_unusable("cpu"):
        pytest.skip(four_bit_unusable("cpu"))
    run_triton_check(CACHE_UNDER_TRITON, "cpu", [str(tmp_path / "model")], timeout=900)


def test_compiled_kernels_compute_the_same_loss(tiny_model):
    batch = examples()
    losses = []
    for compile in (False, True):
        model = lora_model(tiny_model, fused=True)
        losses.append(
            FusedCausalLM(model, compile=compile).loss(pack(batch, torch.device("cpu")), training=True).item()
        )
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


# ---- memory plan of a real model ---------------------------------------------------------
def test_on_the_cpu_the_plan_checkpoints_only_when_asked(tiny_model):
    fused = FusedCausalLM(lora_model(tiny_model, fused=True))
    options = dict(
        tokens_per_micro_batch=64,
        dropout=0.0,
        dequant_cache="auto",
        budget_gib=None,
        device=torch.device("cpu"),
        trainable_params=1000,
    )
    assert plan_memory(fused, MemoryRequest(checkpointing="auto", **options)).checkpointed == frozenset()
    assert plan_memory(fused, MemoryRequest(checkpointing=True, **options)).checkpointed == frozenset({0, 1})
    assert not plan_memory(fused, MemoryRequest(checkpointing="auto", **options)).dequant_cache  # nothing is quantized


# ---- choosing the path, and whole trials -------------------------------------------------
def test_unsupported_architectures_fall_back_or_fail_clearly(tmp_path, tiny_model):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    assert config_unsupported_reason(GPT2Config()) == "model type 'gpt2' (supported: llama, mistral)"
    assert choose_fused(TrainingSettings(), str(tmp_path)) is False
    with pytest.raises(
        ValueError, match=r"^training\.fused_kernels: true, but the fused path does not support model type 'gpt2'"
    ):
        choose_fused(TrainingSettings(fused_kernels=True), str(tmp_path))
    assert choose_fused(TrainingSettings(fused_kernels=False), tiny_model) is False
    assert choose_fused(TrainingSettings(), tiny_model) is True


def test_a_fused_trial_follows_the_plain_trial_loss_curve(tiny_model, data_dir, tmp_path):
    """Same seed, data and hyperparameters: the two paths train the same model (fp32, no dropout)."""
    hparams = {"lora_rank": 8, "lora_alpha": 16, "learning_rate": 1e-2, "lora_dropout": 0.0}
    common = dict(
        max_steps=15, warmup_ratio=0.0, log_every=100, quantization="none", compute_dtype="float32", device="cpu"
    )
    plain = run_trial(hparams, TrainingSettings(fused_kernels=False, **common), tiny_model, data_dir, tmp_path / "a")
    fused = run_trial(hparams, TrainingSettings(fused_kernels=True, **common), tiny_model, data_dir, tmp_path / "b")
    assert plain["status"] == fused["status"] == "ok", (plain["error"], fused["error"])
    assert not plain["fused_kernels"] and fused["fused_kernels"]
    assert fused["memory_plan"] == {
        "checkpointed_layers": 0,
        "layers": 2,
        "offload": False,
        "loss_chunk": 1024,
        "embed_on_host": False,
        "chunked_backward": False,
        "dequant_cache": False,
        "cached_layers": 0,
        "budget_gib": None,
        "estimate_gib": None,
        "compiled": False,
    }
    assert fused["train_tokens"] == plain["train_tokens"]  # same tokens, no padding counted
    for a, b in zip(plain["loss_curve"], fused["loss_curve"]):
        assert math.isclose(a, b, rel_tol=1e-3), (plain["loss_curve"], fused["loss_curve"])
    assert fused["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-3)


def test_a_failing_compiler_falls_back_to_eager_kernels(tiny_model, data_dir, tmp_path, monkeypatch):
    """No working C compiler (as on some compute nodes): the trial trains on with eager kernels."""
    import torch._dynamo
    import torch._inductor.config

    hparams = {"lora_rank": 8, "lora_alpha": 16, "learning_rate": 1e-2, "lora_dropout": 0.0}
    common = dict(
        max_steps=4, warmup_ratio=0.0, log_every=100, quantization="none", compute_dtype="float32", device="cpu"
    )
    eager = run_trial(hparams, TrainingSettings(compile=False, **common), tiny_model, data_dir, tmp_path / "a")
    torch._dynamo.reset()  # no compiled code cached from other tests
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    try:
        broken = run_trial(hparams, TrainingSettings(compile=True, **common), tiny_model, data_dir, tmp_path / "b")
    finally:
        torch._dynamo.reset()
    assert broken["status"] == "ok", broken["error"]
    assert broken["memory_plan"]["compiled"] is False
    assert broken["loss_curve"] == pytest.approx(eager["loss_curve"], rel=1e-6)
    assert broken["eval_loss"] == pytest.approx(eager["eval_loss"], rel=1e-6)
