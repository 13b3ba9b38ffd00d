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

Accumulation dtype: with `accum_dtype=torch.float32` over half-precision weights (fp16/bf16 runs
with fp32 masters) the buckets are fp32 and a parameter's `.grad` is not a view: autograd writes
each micro-batch's half-precision gradient to `.grad`, the post-accumulate hook adds it into the
parameter's fp32 slice and sets `.grad` to None. So 64 micro-batches are summed in fp32 (as
Megatron's `main_grad`), the dp all-reduce runs in fp32, and the fp32 masters read the slices
directly (`grad(p)`), with no conversion. Cost: 4 bytes per parameter instead of 2 during the
pipeline phase, plus one micro-batch's half-precision gradient of one parameter at a time.

Lifetime: over fp32 masters the buffers are dropped after each optimizer step (`release`); in
fp32 the optimizer reads these gradients, so the buffers stay allocated and are zeroed in place.
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


def assign_buckets(
    params: list[torch.nn.Parameter],
    bucket_numel: int,
    accum_dtype: torch.dtype | None = None,
) -> list[Bucket]:
    """Group `params` into buckets in reverse order, one dtype and device per bucket, each at
    most `bucket_numel` elements (a larger parameter gets a bucket of its own). The bucket's
    dtype is `accum_dtype`, or each parameter's own when None. Pure: no memory is allocated."""
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
    buckets: list[Bucket] = []
    for p in reversed(params):
        dtype = accum_dtype or p.dtype
        last = buckets[-1] if buckets else None
        if (
            last is None
            or last.dtype != dtype
            or last.device != p.device
            or last.numel + p.numel() > bucket_numel
        ):
            last = Bucket([], dtype, p.device, 0)
            buckets.append(last)
        last.offsets.append(last.numel)
        last.params.append(p)
        last.numel += p.numel()
    return buckets


class GradBuckets:
    """The gradients of `params` in flat buckets, summed over `group` (see the module docstring).

    Per step: `begin(expected)` before the first backward, `finish()` after the last one,
    `release()` once the gradients have been consumed (or `zero_()` to keep the buffers).
    `grad(p)` is the summed gradient of `p` (its `.grad`, or its fp32 slice when the bucket's
    dtype is not the parameter's).
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        group: dist.ProcessGroup | None,
        bucket_numel: int,
        *,
        persistent: bool,
        accum_dtype: torch.dtype | None = None,
    ):
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        self.buckets = assign_buckets(params, bucket_numel, accum_dtype)
        # id(param) -> its slice of the bucket, for parameters summed into a wider dtype.
        self._slice: dict[int, torch.Tensor] = {}
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
                view = b.buffer[off : off + p.numel()].view_as(p)
                if p.dtype == b.dtype:
                    p.grad = view
                else:  # summed by the hook, in the bucket's dtype
                    p.grad = None
                    self._slice[id(p)] = view
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

    def grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """The summed gradient of `p` this step (after `finish`)."""
        return self._slice.get(id(p), p.grad)

    def zero_(self) -> None:
        """Zero the gradients in place (the views stay the parameters' `.grad`)."""
        for b in self.buckets:
            if b.buffer is not None:
                b.buffer.zero_()

    def release_bucket(self, b: Bucket) -> None:
        """Drop one bucket's gradients and buffer."""
        for p in b.params:
            p.grad = None
            self._slice.pop(id(p), None)
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
        wide = self._slice.get(key)
        if wide is not None and p.grad is not None:
            # This micro-batch's half-precision gradient, summed in the bucket's dtype; the
            # next backward writes a fresh `.grad` instead of adding in half precision.
            wide.add_(p.grad)
            p.grad = None
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
