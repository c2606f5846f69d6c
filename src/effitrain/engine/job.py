"""One job: this process's World, the layout's degrees and its device mesh, built once at start and passed to
everything that needs them (the Trainer and its parts, a distillation teacher, the benchmarks, the tests)."""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.base.distributed import World, init_world
from effitrain.parallel import Degrees, parallel_degrees


@dataclass(frozen=True)
class Job:
    """Where this process stands in the run.

    Args:
        world: rank, size and device.
        degrees: the layout's pipeline ranks x data-parallel replicas x shards x tensor-parallel ranks (checked
            against the real world size, which torchrun may set from outside).
        mesh: the layout's DeviceMesh (parallel.build.build_mesh), None where the default process group serves
            (single, ddp).
    """

    world: World
    degrees: Degrees
    mesh: object | None

    @property
    def shard(self):
        """(rank, size) of this process among the data-parallel ranks; TP is the innermost mesh dimension, so the
        ranks of one TP group (consecutive ranks) read the same batch, and PP the outermost, so the stages of one
        pipeline (ranks dp x tp apart) read the same batch too."""
        from effitrain.data.loader import Shard

        return Shard(rank=(self.world.rank // self.degrees.tp) % self.degrees.dp, world=self.degrees.dp)


def join(cfg) -> World:
    """Join the process group: a one-process group too for every layout but single, so ddp/fsdp run unchanged in
    one process (idempotent)."""
    return init_world(cfg.device, group=cfg.parallel.strategy != "single")


def start_job(cfg) -> Job:
    """Join the process group, work out the degrees and build the mesh: once per process."""
    from effitrain.parallel.build import build_mesh

    world = join(cfg)
    degrees = parallel_degrees(cfg.parallel, world_size=world.size)
    return Job(world=world, degrees=degrees, mesh=build_mesh(cfg.parallel, degrees, world=world))
