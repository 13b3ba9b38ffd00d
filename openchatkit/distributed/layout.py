"""The parallel layout: pipeline size x data-parallel size = world size, and this rank's place in it.

One `ParallelLayout` is built once per process after the default process group starts, and is
passed explicitly to whatever needs a group (no module-level process groups).

Rank layout, as upstream OpenChatKit: consecutive ranks form one pipeline, so
    pipeline rank (stage index) = rank % pp,    data rank (replica index) = rank // pp.
With pp=2, dp=2: ranks 0,1 are replica 0 (stages 0,1) and ranks 2,3 are replica 1.

`init_groups` builds a `DeviceMesh` with named axes ("dp", "pp") (mesh[dp_rank][pp_rank] = rank)
and takes the groups from it:
- `pp_group` (axis "pp"): the `pp` ranks of this replica (point-to-point activations,
  loss/grad-norm reductions).
- `dp_group` (axis "dp"): the `dp` ranks holding this rank's stage (gradient all-reduce).
- `tie_group`: first and last stage of this replica, when embeddings are tied and pp > 1
  (the two copies of the tied matrix get their gradients summed there).
`check_layout` is the one place that checks pipeline x data size against the world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from openchatkit.errors import UserError


def check_layout(pipeline_size: int, data_size: int, world_size: int) -> None:
    """Raise UserError unless pipeline_size x data_size == world_size (all >= 1)."""
    if pipeline_size < 1:
        raise UserError(f"--pipeline-group-size must be >= 1, got {pipeline_size}")
    if data_size < 1:
        raise UserError(f"--data-group-size must be >= 1, got {data_size}")
    if world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {world_size}")
    if pipeline_size * data_size != world_size:
        raise UserError(
            f"--pipeline-group-size ({pipeline_size}) x --data-group-size ({data_size}) = "
            f"{pipeline_size * data_size}, but the world size (--world-size / WORLD_SIZE) is "
            f"{world_size}; they must be equal"
        )


def pipeline_ranks(replica: int, pipeline_size: int) -> list[int]:
    """Global ranks of one pipeline replica, in stage order."""
    return [replica * pipeline_size + s for s in range(pipeline_size)]


def data_ranks(stage: int, pipeline_size: int, data_size: int) -> list[int]:
    """Global ranks holding one stage, in replica order."""
    return [d * pipeline_size + stage for d in range(data_size)]


@dataclass
class ParallelLayout:
    """Pipeline x data layout of the job and this rank's coordinates in it.

    Build with `ParallelLayout(pp, dp, rank)` for pure bookkeeping (tests, a single process), then
    `init_groups()` once the default process group exists.
    """

    pp: int
    dp: int
    rank: int = 0
    mesh: Any = field(default=None, repr=False)  # DeviceMesh, axes ("dp", "pp")
    pp_group: Any = field(default=None, repr=False)
    dp_group: Any = field(default=None, repr=False)
    tie_group: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_layout(self.pp, self.dp, self.pp * self.dp)
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"--rank must be in [0, {self.world_size}), got {self.rank}")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp

    @property
    def pp_rank(self) -> int:
        """This rank's stage index in its pipeline."""
        return self.rank % self.pp

    @property
    def dp_rank(self) -> int:
        """This rank's replica index."""
        return self.rank // self.pp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def pp_peers(self) -> list[int]:
        """Global ranks of this rank's pipeline, stage 0 first."""
        return pipeline_ranks(self.dp_rank, self.pp)

    @property
    def dp_peers(self) -> list[int]:
        """Global ranks holding this rank's stage, replica 0 first."""
        return data_ranks(self.pp_rank, self.pp, self.dp)

    @property
    def first_stage_rank(self) -> int:
        """Global rank of stage 0 of this replica."""
        return self.pp_peers[0]

    def describe_rank(self, rank: int) -> str:
        """Any rank of the job with its place, for messages: "rank 3 (stage 1, replica 1)"."""
        return f"rank {rank} (stage {rank % self.pp}, replica {rank // self.pp})"

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: stage {self.pp_rank}/{self.pp}, "
            f"replica {self.dp_rank}/{self.dp}"
        )

    def init_groups(self, device_type: str = "cpu", tied: bool = False) -> None:
        """Build the device mesh and take this rank's groups from it; every rank must call it
        (group creation is collective). With one rank nothing is created and every collective
        in the engine is skipped."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not self.is_distributed:
            return
        # mesh[dp_rank][pp_rank] = dp_rank * pp + pp_rank = rank: consecutive ranks form one
        # pipeline, as the rank arithmetic above (and upstream) has it.
        self.mesh = init_device_mesh(device_type, (self.dp, self.pp), mesh_dim_names=("dp", "pp"))
        self.pp_group = self.mesh.get_group("pp")
        self.dp_group = self.mesh.get_group("dp")
        if tied and self.pp > 1:
            # First and last stage of each replica: not an axis of the mesh. Every rank creates
            # every such group in the same order, as torch requires, and keeps its own.
            for replica in range(self.dp):
                ranks = pipeline_ranks(replica, self.pp)
                g = dist.new_group([ranks[0], ranks[-1]])
                if replica == self.dp_rank:
                    self.tie_group = g
