"""The fused training path: a Llama-family forward and backward written for (Q)LoRA training.

The plain path runs the Hugging Face model with peft adapters: per projection a 4-bit matmul
(dequantize, matmul) and a LoRA branch (dropout, two matmuls, a scale, an add); norms and the
residual stream upcast to fp32 by ``prepare_model_for_kbit_training``; padded batches; and the
logits of the whole batch materialized in fp32 for the loss. This path computes the same function
with fewer, larger kernels and less memory:

* the examples of a micro-batch are one flat token stream (no padding; attention stays inside
  each example through per-example causal attention, RoPE positions restart per example);
* q/k/v and gate/up are one matmul each over their weights dequantized side by side, with the
  LoRA branches of a group as one down- and one block-diagonal up-projection, inside a custom
  autograd function that saves only what the LoRA gradients need (never a dequantized weight);
  on CUDA our Triton kernel dequantizes the NF4 weights (bitsandbytes' values, one pass), with
  room beside them for the LoRA up-weight, so that q|k|v and gate|up take their LoRA branch
  inside the one matmul ([x | z] [W | B]^T);
* LoRA dropout draws one mask per shared input (q/k/v share one, gate/up another), where peft
  draws one per projection: the same distribution, not the same random numbers;
* the residual stream and its gradient stay fp32, as in the plain QLoRA recipe; the rest runs in
  the compute dtype (bf16);
* the loss is a chunked cross-entropy over the output layer that never holds more than one
  chunk's logits, and computes its input gradient on the way (each chunk's log-sum-exp and
  gradient compiled with the other kernels);
* gradient checkpointing is chosen per layer from a memory budget (``plan_memory``; a recomputed
  layer skips the down projection's frozen matmul, and its input may wait in host memory in bf16),
  and the dequantized weights (of every layer, or of the last layers) may be kept when the budget
  leaves room for them;
* RMSNorm and SwiGLU run inside the projection that follows them and are recomputed in the
  backward pass instead of saved; on CUDA they, RoPE and the dropout arithmetic are compiled
  into fused kernels when ``compile`` is on (SwiGLU's backward as one Triton pass of our own);
  AdamW takes its fused kernel.

The LoRA weights stay peft's own parameters, so adapters save and load as peft adapters. Models
other than Llama-style ones (``unsupported_reason``) keep the plain path.

The package keeps each op apart from the model that uses it (as Liger-Kernel does): ``support``
(what can be fused), ``lora_linear`` (a frozen linear layer with its LoRA branch, and the
projection groups), ``nf4`` (the NF4 dequantization kernel), ``swiglu`` (SwiGLU's backward in one pass),
``kernels`` (the elementwise pieces), ``attention`` (packing and attention
within each example), ``loss`` (the chunked cross-entropy), ``model`` (``FusedCausalLM``) and
``memory`` (the per-layer checkpointing and dequantization plan).
"""

from loratune.training.fused.attention import PackedBatch, attention, pack
from loratune.training.fused.kernels import Kernels, make_kernels
from loratune.training.fused.loss import chunked_cross_entropy
from loratune.training.fused.memory import MemoryPlan, MemoryRequest, choose_plan, plan_memory
from loratune.training.fused.model import FusedCausalLM
from loratune.training.fused.support import config_unsupported_reason, unsupported_reason

__all__ = [
    "FusedCausalLM",
    "Kernels",
    "MemoryPlan",
    "MemoryRequest",
    "PackedBatch",
    "attention",
    "choose_plan",
    "chunked_cross_entropy",
    "config_unsupported_reason",
    "make_kernels",
    "pack",
    "plan_memory",
    "unsupported_reason",
]
