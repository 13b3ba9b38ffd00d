"""Gradients in flat buckets, summed over the data-parallel group while the backward still runs.

Each trainable parameter's `.grad` is a view into one flat buffer per bucket (DDP's
`gradient_as_bucket_view`), so autograd accumulates straight into the buffers and the all-reduce
needs no copy. Buckets follow the reverse order of the parameters, the order in which a backward
produces their gradients (last layer first), hold one dtype each and at most `bucket_numel`
elements.

Overlap: a step runs `expected` backward passes (micro-batches x accumulation passes). A
post-accumulate-grad hook counts them per parameter; once every parameter of a bucket has had
its last one, the bucket's all-reduce starts asynchronously while the backward goes on with the
layers below. Buckets start strictly in index order, so every replica issues the same collectives
in the same order (NCCL and gloo match them by order). `finish()` starts what is left (buckets
with a parameter that got fewer gradients, or none: their zeros are summed too) and waits.

Lifetime: with fp32 masters over half-precision weights the model's gradients are copied to the
masters and dropped each step (`release`, so the optimizer step does not hold both); in fp32 the
optimizer reads these gradients, so the buffers stay allocated and are zeroed in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Bucket:
    params: list[torch.nn.Parameter]
    dtype: torch.dtype
    device: torch.device
    numel: int
    buffer: torch.Tensor | None = None
    pending: int = 0  # parameters still waiting for their last gradient this step
    work: object | None = None  # the async all-reduce in flight
    launched: bool = False
    offsets: list[int] = field(default_factory=list)


def assign_buckets(params: list[torch.nn.Parameter], bucket_numel: int) -> list[Bucket]:
    """Group `params` into buckets in reverse order, one dtype and device per bucket, each at
    most `bucket_numel` elements (a larger parameter gets a bucket of its own). Pure: no
    memory is allocated."""
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
    buckets: list[Bucket] = []
    for p in reversed(params):
        last = buckets[-1] if buckets else None
        if (
            last is None
            or last.dtype != p.dtype
            or last.device != p.device
            or last.numel + p.numel() > bucket_numel
        ):
            last = Bucket([], p.dtype, p.device, 0)
            buckets.append(last)
        last.offsets.append(last.numel)
        last.params.append(p)
        last.numel += p.numel()
    return buckets


class GradBuckets:
    """The gradients of `params` in flat buckets, summed over `group` (see the module docstring).

    Per step: `begin(expected)` before the first backward, `finish()` after the last one,
    `release()` once the gradients have been consumed (or `zero_()` to keep the buffers).
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        group: dist.ProcessGroup | None,
        bucket_numel: int,
        *,
        persistent: bool,
    ):
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        self.buckets = assign_buckets(params, bucket_numel)
        self.persistent = persistent
        self._owner = {id(p): b for b in self.buckets for p in b.params}
        self._count = {id(p): 0 for p in params}
        self._expected = 0
        self._next = 0  # the next bucket to start, in index order
        self.started_early = 0  # buckets started from a hook during the backward, this step
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    # -- per step --------------------------------------------------------------------------------
    def begin(self, expected: int) -> None:
        """Give every parameter a zeroed gradient view; `expected` backward passes follow."""
        self._expected = expected
        self._next = 0
        self.started_early = 0
        for b in self.buckets:
            if b.buffer is None:
                b.buffer = torch.zeros(b.numel, dtype=b.dtype, device=b.device)
            # (Re)attach the views: someone may have set a `.grad` to None since.
            for p, off in zip(b.params, b.offsets, strict=True):
                p.grad = b.buffer[off : off + p.numel()].view_as(p)
            b.pending = len(b.params)
            b.work, b.launched = None, False
        for k in self._count:
            self._count[k] = 0

    def finish(self) -> None:
        """Start the buckets not started yet, in order, and wait for every all-reduce."""
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None

    def zero_(self) -> None:
        """Zero the gradients in place (the views stay the parameters' `.grad`)."""
        for b in self.buckets:
            if b.buffer is not None:
                b.buffer.zero_()

    def release_bucket(self, b: Bucket) -> None:
        """Drop one bucket's gradients and buffer."""
        for p in b.params:
            p.grad = None
        b.buffer = None

    def release(self) -> None:
        """Drop the gradients and their buffers (fp32 masters hold a copy by now)."""
        for b in self.buckets:
            self.release_bucket(b)

    def end_step(self) -> None:
        """After the optimizer step: keep and zero the buffers, or free them. Until the next
        `begin` the hooks only count (a backward outside a step starts no all-reduce)."""
        self._expected = 0
        for b in self.buckets:
            b.launched = False
        if self.persistent:
            self.zero_()
        else:
            self.release()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- internals -------------------------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        key = id(p)
        self._count[key] += 1
        bucket = self._owner[key]
        if bucket.launched:
            # A gradient after the bucket's sum started would be lost: a schedule ran more
            # backward passes than the engine announced.
            raise RuntimeError(
                f"gradient {self._count[key]} of a parameter whose bucket was already summed "
                f"(expected {self._expected} backward passes)"
            )
        if self._expected and self._count[key] == self._expected:
            bucket.pending -= 1
            # Start every bucket that is ready, strictly in index order.
            while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
                self._launch(self._next)
                self.started_early += 1
                self._next += 1

    def _launch(self, i: int) -> None:
        b = self.buckets[i]
        b.launched = True
        if self.group is not None and b.buffer is not None:
            b.work = dist.all_reduce(
                b.buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True
            )
