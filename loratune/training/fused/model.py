"""The fused model: a Llama-family forward and backward over peft's LoRA weights."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from loratune.training.fused.attention import PackedBatch, attention
from loratune.training.fused.kernels import Kernels, is_compile_error, make_kernels
from loratune.training.fused.lora_linear import BACKWARD_CHUNK_BYTES, Prologue, make_group
from loratune.training.fused.loss import chunked_cross_entropy
from loratune.training.fused.memory import MemoryPlan, MemoryRequest, plan_memory
from loratune.training.fused.offload import HostOffload
from loratune.training.fused.residual import ResidualAdd, Stream
from loratune.training.fused.support import inner_model, unsupported_reason


class Layer:
    def __init__(self, layer, dtype: torch.dtype, config):
        self.norm_in = layer.input_layernorm.weight
        self.norm_post = layer.post_attention_layernorm.weight
        self.eps = float(config.rms_norm_eps)
        self.qkv = make_group(layer.self_attn, ("q_proj", "k_proj", "v_proj"), dtype)
        self.o = make_group(layer.self_attn, ("o_proj",), dtype)
        self.gate_up = make_group(layer.mlp, ("gate_proj", "up_proj"), dtype)
        self.down = make_group(layer.mlp, ("down_proj",), dtype)
        self.groups = (self.qkv, self.o, self.gate_up, self.down)

    def forward(
        self,
        hidden,
        stream: Stream,
        cos,
        sin,
        batch: PackedBatch,
        kernels: Kernels,
        shape,
        training: bool,
        recompute: bool = False,
    ) -> tuple[torch.Tensor, Stream]:
        """The layer's output and its residual ``Stream`` (``stream``: the input's); with
        ``recompute`` (the backward's recomputation of a checkpointed layer, which only refills what
        the layer saved: the down projection's input is the last of it) the down projection's
        frozen matmul, 27% of the layer's forward FLOPs, is skipped."""
        heads, kv_heads, head_dim, intermediate = shape
        qkv = self.qkv(hidden, training, kernels, norm_prologue(kernels, self.norm_in, self.eps, stream))
        q, k, v = kernels.split_rotary(qkv, cos, sin, heads, kv_heads, head_dim)
        middle = Stream()
        o = self.o(attention(q, k, v, batch), training, kernels)
        hidden = ResidualAdd.apply(hidden, o, kernels.residual_add, stream, middle)
        gate_up = self.gate_up(hidden, training, kernels, norm_prologue(kernels, self.norm_post, self.eps, middle))
        down = self.down(gate_up, training, kernels, swiglu_prologue(kernels, intermediate), output=not recompute)
        out = Stream()
        return ResidualAdd.apply(hidden, down, kernels.residual_add, middle, out), out


def norm_prologue(kernels: Kernels, weight: torch.Tensor, eps: float, stream: Stream | None = None) -> Prologue:
    """The RMSNorm before a projection; with ``stream`` (its input's), the backward also adds the
    residual path's gradient and leaves the sum's compute-dtype copy for the residual add above."""

    def with_grad(u: torch.Tensor, grad: torch.Tensor):
        if stream is None or not stream.fused:
            return kernels.rms_norm_with_grad(u, weight, eps, grad)
        x, grad_u, stream.low = kernels.rms_norm_with_grad_onto(u, weight, eps, grad, stream.take_skip())
        return x, grad_u

    return Prologue(lambda u: kernels.rms_norm(u, weight, eps), with_grad, stream)


def swiglu_prologue(kernels: Kernels, intermediate: int) -> Prologue:
    return Prologue(
        lambda u: kernels.swiglu(u, intermediate), lambda u, grad: kernels.swiglu_with_grad(u, grad, intermediate)
    )


class _Checkpointed:
    """A layer's forward as torch's non-reentrant checkpoint calls it: first the forward, then
    (in the backward pass) the recomputation, told apart by the call count."""

    def __init__(self, layer: Layer):
        self.layer = layer
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return self.layer.forward(*args, recompute=self.calls > 1)


class FusedCausalLM:
    """Loss of a (peft-wrapped) Llama-family model through the fused path; see the module docstring."""

    def __init__(
        self,
        model,
        *,
        compile: bool = False,
        residual_dtype: torch.dtype = torch.float32,
        join_lora: bool | None = None,
    ):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"training.fused_kernels: cannot fuse this model: {reason}")
        self.model = model
        inner = inner_model(model)
        config = inner.config
        self.config = config
        self.embed = inner.model.embed_tokens.weight
        self.dtype = self.embed.dtype
        self.norm = inner.model.norm.weight
        self.eps = float(config.rms_norm_eps)
        self.lm_head = inner.lm_head.weight
        self.rotary_emb = inner.model.rotary_emb
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.shape = (heads, config.num_key_value_heads, head_dim, config.intermediate_size)
        self.layers = [Layer(layer, self.dtype, config) for layer in inner.model.layers]
        for layer in self.layers:  # None: the LoRA up-projection joins the frozen matmul where it pays
            for group in layer.groups:
                group.join_lora = join_lora
        self.kernels = make_kernels(compile)
        self.compiled = compile
        # The residual stream (and its gradient) stays fp32, as the plain QLoRA recipe keeps it: in
        # bf16, 30 layers of rounded adds doubled the LoRA gradients' error (SmolLM2, tests).
        self.residual_dtype = residual_dtype
        self.plan = MemoryPlan(checkpointed=frozenset(), dequant_cache=False)
        self.memory_request: MemoryRequest | None = None

    def fall_back_to_eager(self, error: BaseException) -> bool:
        """After ``error``: if it is a failure of torch.compile's own machinery (no C compiler on
        the node, say), switch to the eager kernels (same results), plan memory again for them (they
        keep more intermediates) and return True; for any other error, or kernels already eager,
        return False."""
        if not self.compiled or not is_compile_error(error):
            return False
        self.kernels = make_kernels(False)
        self.compiled = False
        if self.memory_request is not None:
            self.fit_memory(self.memory_request)
        return True

    @property
    def quantized(self) -> bool:
        return any(group.weights.quantized for layer in self.layers for group in layer.groups)

    def fit_memory(self, request: MemoryRequest) -> MemoryPlan:
        """Plan memory for ``request`` and apply the plan; the request is kept for a re-plan."""
        self.memory_request = request
        self.apply_plan(plan_memory(self, request))
        return self.plan

    def apply_plan(self, plan: MemoryPlan) -> None:
        self.plan = plan
        device = self.lm_head.device
        if plan.embed_on_host and self.embed is self.lm_head:
            raise ValueError("the input embedding is tied to the output layer: it cannot wait in host memory")
        if device.type == "cuda":  # the input embedding to host memory and back, as the plan says
            self.embed.data = self.embed.data.to("cpu" if plan.embed_on_host else device)
        cached = plan.cached_layer_indices(len(self.layers))
        for index, layer in enumerate(self.layers):
            for group in layer.groups:
                group.keep_dequantized(index in cached)
                group.backward_chunk_bytes = BACKWARD_CHUNK_BYTES if plan.chunked_backward else None

    def loss(self, batch: PackedBatch, *, training: bool) -> torch.Tensor:
        """Summed cross-entropy over ``batch.targets`` (the caller divides by the count)."""
        if self.embed.device == batch.input_ids.device:
            hidden = F.embedding(batch.input_ids, self.embed).to(self.residual_dtype)
        else:  # the embedding waits in host memory (the memory plan): look up there, send the rows
            # from pinned memory without a synchronization (the ids are the host's own copy)
            ids = batch.host_input_ids
            rows = torch.empty((ids.shape[0], self.embed.shape[1]), dtype=self.embed.dtype, pin_memory=True)
            torch.index_select(self.embed, 0, ids, out=rows)
            hidden = rows.to(batch.input_ids.device, non_blocking=True).to(self.residual_dtype)
        cos, sin = self.rotary_emb(hidden, batch.position_ids[None])
        cos, sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        checkpointed = self.plan.checkpointed if training and torch.is_grad_enabled() else frozenset()
        offload = HostOffload(hidden.device, self.dtype) if checkpointed and self.plan.offload else None
        stream = Stream()
        for index, layer in enumerate(self.layers):
            args = (hidden, stream, cos, sin, batch, self.kernels, self.shape, training)
            if index in checkpointed:
                with offload.layer_input(hidden) if offload else contextlib.nullcontext():
                    hidden, stream = torch.utils.checkpoint.checkpoint(_Checkpointed(layer), *args, use_reentrant=False)
            else:
                hidden, stream = layer.forward(*args)
        if offload:
            offload.prefetch()  # the last checkpointed layer's input comes back while the later layers' backward runs
        hidden = self.kernels.rms_norm(hidden, self.norm, self.eps)
        weight = self.lm_head.to(self.dtype)
        return chunked_cross_entropy(
            hidden, weight, batch.targets, self.plan.loss_chunk, self.kernels.cross_entropy_chunk
        )
