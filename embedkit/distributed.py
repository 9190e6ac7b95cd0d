"""Ranks of a ``torchrun`` job: detection, process group, unit assignment, collectives.

``torchrun`` (``python -m torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and the rendezvous variables for every worker. :func:`session` turns them into a
:class:`DistContext` (initialising the process group: NCCL on CUDA, gloo on CPU) and tears the
group down afterwards. A plain ``embedkit extract`` (no torchrun, or ``WORLD_SIZE=1``) gets a
one-rank context whose collectives are no-ops, so the engine has one code path.

Work split: every rank takes ``sorted(pending)[rank::world]`` of the *pending* units that rank 0
read under the entry's file lock (:func:`assign_units`): disjoint, covering, deterministic.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from embedkit.errors import EmbedkitError

T = TypeVar("T")

#: How long a collective may wait (e.g. for rank 0 to get an entry's lock held by another job).
DEFAULT_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True, slots=True)
class RankEnv:
    """What torchrun told this process: its rank, the world size, its rank on this node."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise EmbedkitError(
                f"Expected 0 <= RANK < WORLD_SIZE, got RANK={self.rank}, "
                f"WORLD_SIZE={self.world_size} instead; launch with torchrun"
            )


def rank_env(environ: dict[str, str] | None = None) -> RankEnv:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` (defaults: one rank)."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as exc:
        raise EmbedkitError(f"torchrun environment variables must be integers: {exc}") from exc
    return RankEnv(rank, world, local, local_world)


def assign_units(pending: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of ``pending``: ``sorted(pending)[rank::world_size]``.

    Over all ranks the shares are disjoint and cover ``pending``; every rank computes the same
    split from the same list, so no coordination beyond sharing ``pending`` is needed.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"Expected 0 <= rank < world_size, got {rank}, {world_size} instead")
    return sorted(pending)[rank::world_size]


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, env: RankEnv) -> torch.device:
    """Under torchrun, ``cuda`` without an index means this rank's GPU (``cuda:LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and env.world_size > 1:
        return torch.device("cuda", env.local_rank)
    return device


@dataclass(frozen=True, slots=True)
class DistContext:
    """One rank of a job; with ``world_size == 1`` every collective is a no-op."""

    env: RankEnv
    device: torch.device
    backend: str | None  # None: no process group (one rank)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def broadcast(self, obj: T, src: int = 0) -> T:
        """``obj`` of rank ``src`` on every rank (pickled; for small objects)."""
        if not self.distributed:
            return obj
        box: list[Any] = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return cast(T, box[0])

    def _reduce(self, value: float, op: dist.ReduceOp.RedOpType) -> float:
        if not self.distributed:
            return value
        device = self.device if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def max(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX)

    def min(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MIN)

    def sum(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM)

    def mesh(self) -> Any:
        """A 1-D device mesh over all ranks (for FSDP2)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world_size,))


@contextmanager
def session(device: torch.device, *, timeout: timedelta = DEFAULT_TIMEOUT) -> Iterator[DistContext]:
    """The :class:`DistContext` of this process; initialises (and destroys) the process group.

    A group that already exists (the caller initialised it) is used and left alone.
    """
    env = rank_env()
    device = rank_device(device, env)
    if env.world_size == 1:
        yield DistContext(env, device, None)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        yield DistContext(env, device, str(dist.get_backend()))
        return
    backend = backend_for(device)
    dist.init_process_group(backend=backend, timeout=timeout)
    try:
        yield DistContext(env, device, backend)
    finally:
        dist.destroy_process_group()


#: torchrun's own entry point, minus the traceback it prints when a rank fails: the ranks have
#: already printed their (clean) errors, so the launcher exits with the first failed rank's
#: status (2 for a user error) and one line naming it.
_LAUNCHER = """
import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run
try:
    run(get_args_parser().parse_args(sys.argv[1:]))
except ChildFailedError as exc:
    rank, failure = exc.get_first_failure()
    code = failure.exitcode if 0 < failure.exitcode < 128 else 1
    print(f"error: rank {rank} of the torchrun job exited with status {failure.exitcode}; "
          "its error is printed above", file=sys.stderr)
    sys.exit(code)
except KeyboardInterrupt:
    sys.exit(130)
"""


def torchrun_command(nproc: int, args: Sequence[str]) -> list[str]:
    """The command that runs ``embedkit <args>`` as ``nproc`` ranks on this node (torchrun's
    launcher; a failed rank ends it with that rank's exit status and no traceback)."""
    return [
        sys.executable,
        "-c",
        _LAUNCHER,
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "embedkit",
        *args,
    ]


def strip_option(args: Sequence[str], option: str) -> list[str]:
    """``args`` without ``option VALUE`` / ``option=VALUE`` (to relaunch without ``--nproc``)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            out.append(arg)
    return out


def launch_torchrun(nproc: int, args: Sequence[str]) -> int:
    """Run ``embedkit <args>`` under torchrun with ``nproc`` local ranks; its exit code."""
    if "WORLD_SIZE" in os.environ:
        raise EmbedkitError(
            "--nproc launches torchrun itself; inside a torchrun job (WORLD_SIZE is set) drop it"
        )
    return subprocess.call(torchrun_command(nproc, strip_option(args, "--nproc")))
