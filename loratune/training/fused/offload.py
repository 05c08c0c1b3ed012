"""The inputs of checkpointed layers held in pinned host memory between their forward and backward.

A checkpointed layer keeps only its input for the backward pass (its activations are recomputed),
but at the 8B shape that input (the fp32 residual stream of 8,192 tokens) is 128 MiB, 4 GiB for 32
layers. ``HostOffload`` moves each such input to pinned host memory on a side stream while the GPU
computes the next layer, and brings it back one layer ahead of its backward, so at most two are on
the GPU at a time. It sends them in the compute dtype (bf16: 64 MiB, half the PCIe time; the 8 GiB
plan's copies were 18% of the H200's CUDA time): the forward's residual stream stays exact fp32, only
the backward's recomputation of the layer starts from the rounded input, an error of the size of the
bf16 rounding the layer's RMSNorm output gets anyway (the gradient accuracy test bounds it). The
pinned host blocks come from torch's caching host allocator, so the steps reuse them. It works through ``torch.autograd.graph.saved_tensors_hooks`` around the
checkpointed call: non-reentrant checkpointing saves the layer's inputs with the hooks in force
(and nothing else: what the layer saves goes to its own, inner hooks).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class _Saved:
    index: int
    host: torch.Tensor
    device: torch.device
    dtype: torch.dtype  # the input's own (fp32), restored on the way back
    copied: torch.cuda.Event | None  # the copy to the host is done
    back: torch.Tensor | None = None  # prefetched to the device
    arrived: torch.cuda.Event | None = None


class HostOffload:
    """One training step's offloaded layer inputs, in forward order (a new one for each step)."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.bfloat16):
        self.device = device
        self.dtype = dtype  # of the host copies
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.saved: list[_Saved] = []

    @contextmanager
    def layer_input(self, tensor: torch.Tensor):
        """Within this context, saving ``tensor`` for the backward pass puts it in host memory
        (other saved tensors, cos/sin say, stay where they are)."""
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)

        def pack(saved: torch.Tensor):
            if (saved.data_ptr(), saved.shape, saved.dtype) != key:
                return saved
            return self._to_host(saved)

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            yield

    def _to_host(self, tensor: torch.Tensor) -> _Saved:
        staged = tensor.detach().to(self.dtype)  # rounded on the compute stream (the input itself if already so)
        if self.stream is None:  # the CPU: a copy stands for the host buffer
            host = staged.clone() if staged.data_ptr() == tensor.data_ptr() else staged
            record = _Saved(len(self.saved), host, tensor.device, tensor.dtype, None)
        else:
            host = torch.empty(tensor.shape, dtype=self.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(staged, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.stream)
            staged.record_stream(self.stream)  # not reused before the copy is done
            record = _Saved(len(self.saved), host, tensor.device, tensor.dtype, copied)
        self.saved.append(record)
        return record

    def _unpack(self, record):
        if not isinstance(record, _Saved):
            return record
        if record.back is None:
            self.prefetch(record)
        current = torch.cuda.current_stream(self.device) if self.stream is not None else None
        if current is not None:
            current.wait_event(record.arrived)
            record.back.record_stream(current)
        tensor, record.back = record.back.to(record.dtype), None
        if record.index > 0:  # the layer before is the next to need its input
            self.prefetch(self.saved[record.index - 1])
        return tensor

    def prefetch(self, record: _Saved | None = None) -> None:
        """Start bringing ``record`` (default: the last saved input, the first the backward
        needs) back to the device, on the side stream."""
        if record is None:
            if not self.saved:
                return
            record = self.saved[-1]
        if record.back is not None:
            return
        if self.stream is None:
            record.back = record.host.to(record.device)
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(record.copied)
            record.back = record.host.to(record.device, non_blocking=True)
            record.arrived = torch.cuda.Event()
            record.arrived.record(self.stream)
