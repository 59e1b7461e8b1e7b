"""CPU offload of the activations gradient checkpointing keeps: `train.activation_offload`.

With checkpointing, each decoder block keeps only its input x (B, T, hidden) for backward and
recomputes the rest. At long context those inputs are what is left: one (T x hidden) bf16 tensor
a block, 1 GiB per block at 131,072 tokens on an 8B shape, 32 GiB over 32 blocks. Here each
checkpointed block's input goes to pinned host memory instead:

    forward, block i:   y_i = block_i(x_i) without a graph; x_i copied device -> host on a side
                        stream (overlapping block i's own compute), its device memory freed
    backward, block i:  x_i back on the device (prefetched while block i+1 ran its backward),
                        the prefetch of x_{i-1} started, then block i recomputed with a graph
                        and its backward run: dx_i and the parameter gradients

so the device holds one block's activations at a time plus two block inputs in flight. The
recompute restores the forward's RNG state (dropout masks) and autocast state. On the CPU the
"offload" is a copy to another host tensor, so the same code path runs (and is tested) there.

This is reentrant-style checkpointing (an autograd Function that runs the block's backward inside
its own): parameter gradients accumulate in `.grad` as usual; blocks with prefix-tuning inputs
that need gradients keep the ordinary checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


@dataclass
class OffloadStats:
    """What one model's offloader moved (bytes) since it was made."""

    to_host_bytes: int = 0
    to_device_bytes: int = 0
    blocks: int = 0
    passes: int = 0


class _HostCopy:
    """One tensor in host memory, on its way back to the device on demand or ahead of time."""

    def __init__(self, tensor: torch.Tensor, offloader: BlockOffloader, previous: _HostCopy | None):
        self.device, self.shape = tensor.device, tensor.shape
        self.offloader, self.previous = offloader, previous
        self.back: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        if tensor.is_cuda:
            stream = _side_stream(tensor.device)
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # x is computed
            with torch.cuda.stream(stream):
                self.host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)  # its memory is not reused before the copy ends
        else:
            self.host = tensor.detach().clone()
        offloader.stats.to_host_bytes += tensor.numel() * tensor.element_size()

    def prefetch(self) -> None:
        """Starts the host -> device copy (once)."""
        if self.back is not None:
            return
        self.offloader.stats.to_device_bytes += self.host.numel() * self.host.element_size()
        if self.device.type != "cuda":
            self.back = self.host.clone()
            return
        stream = _side_stream(self.device)
        with torch.cuda.stream(stream):
            self.back = self.host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def fetch(self) -> torch.Tensor:
        """The tensor on its device; starts bringing back the block input before this one."""
        self.prefetch()
        assert self.back is not None
        if self.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            self.back.record_stream(current)
        if self.previous is not None:
            self.previous.prefetch()
        back, self.back, self.host = self.back, None, torch.empty(0)  # host memory released
        self.previous = None
        return back


@dataclass
class _RecomputeState:
    cpu_rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    autocast: bool
    autocast_dtype: torch.dtype | None
    device_type: str


def _capture_state(device: torch.device) -> _RecomputeState:
    autocast = torch.is_autocast_enabled(device.type)
    return _RecomputeState(
        cpu_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        autocast=autocast,
        autocast_dtype=torch.get_autocast_dtype(device.type) if autocast else None,
        device_type=device.type,
    )


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,  # (B, T, hidden)
        _graph_anchor: torch.Tensor,  # requires grad, so the node runs even when x does not
        run: Callable[[torch.Tensor], torch.Tensor],
        offloader: BlockOffloader,
    ) -> torch.Tensor:
        ctx.run, ctx.x_requires_grad = run, x.requires_grad
        ctx.state = _capture_state(x.device)
        y = run(x)
        ctx.saved_x = offloader.offload(x)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x = ctx.saved_x.fetch().detach().requires_grad_(ctx.x_requires_grad)
        state: _RecomputeState = ctx.state
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(state.cpu_rng)
            if state.cuda_rng is not None:
                torch.cuda.set_rng_state(state.cuda_rng, x.device)
            with torch.autocast(state.device_type, dtype=state.autocast_dtype, enabled=state.autocast):
                y = ctx.run(x)
        if y.requires_grad:
            torch.autograd.backward(y, dy)
        return x.grad if ctx.x_requires_grad else None, None, None, None


@dataclass
class BlockOffloader:
    """Offloads the inputs of checkpointed blocks for one model (see the module docstring).
    `begin_pass()` starts a forward pass: inputs are prefetched in the reverse order of one pass."""

    stats: OffloadStats = field(default_factory=OffloadStats)
    _last: _HostCopy | None = None
    _anchor: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def begin_pass(self) -> None:
        self._last = None
        self.stats.passes += 1

    def offload(self, x: torch.Tensor) -> _HostCopy:
        self._last = _HostCopy(x, self, self._last)
        self.stats.blocks += 1
        return self._last

    def checkpoint(self, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """run(x) for a block, keeping x in host memory and recomputing run in backward."""
        if x.device not in self._anchor:
            self._anchor[x.device] = torch.empty(0, device=x.device, requires_grad=True)
        return _OffloadedCheckpoint.apply(x, self._anchor[x.device], run, self)
