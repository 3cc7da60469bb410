"""What `prep build-*` runs: one build, one part of one, or, under torchrun, a part per rank and
the merge on rank 0.

- Plain: `build(config)`; with `--num-parts N --part-index I` (a Slurm array task, say) the
  build makes part I only, and `prep merge` joins the parts once all are done.
- torchrun (WORLD_SIZE > 1 and RANK set): rank r builds part r of WORLD_SIZE, all ranks meet at
  a gloo barrier, and rank 0 merges each size into `<out>/<split>-<size>/` and removes the
  parts. torch.distributed is the engine our users already run for training, so prep needs no
  other; torch is imported only here and only then. Every rank needs the same --src and an
  --out on storage they all share (rank 0 reads every part).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil

from prep.build import BuildConfig, BuildSummary, build, dataset_dir_of, default_workers
from prep.merge import MergeSummary, merge
from prep.partial import BuildError
from prep.parts import PartSpec
from prep.rank_watch import ParentWatch

# A rank that finished its part waits here for the slowest one; parts of real ImageNet take
# hours, and a rank that fails makes torchrun stop the others (a rank whose torchrun is gone
# stops itself: prep.rank_watch), so a long wait is safe.
BARRIER_TIMEOUT = datetime.timedelta(hours=72)
# Joining the ranks is quick (torchrun starts them together) unless they are not all coming:
# WORLD_SIZE/RANK/MASTER_* left over in a shell wait this long, not torch's default of hours.
RENDEZVOUS_SECONDS_ENV = "PREP_RENDEZVOUS_SECONDS"
DEFAULT_RENDEZVOUS_SECONDS = 120.0
TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_world_size: int


@dataclasses.dataclass
class LaunchResult:
    build: BuildSummary
    merges: list[MergeSummary]  # rank 0 under torchrun: one per size; else empty
    rank: int | None  # None outside torchrun


def _env_int(environ, name: str) -> int | None:
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise BuildError(f"environment variable {name}={value!r} is not an integer") from None


def torchrun_env(environ=os.environ) -> TorchrunEnv | None:
    """Where this process sits when torchrun (or a launcher like it) started it with several
    ranks; None for a plain run or a world of one."""
    world_size, rank = _env_int(environ, "WORLD_SIZE"), _env_int(environ, "RANK")
    if world_size is None or rank is None or world_size == 1:
        return None
    if world_size < 1 or not 0 <= rank < world_size:
        raise BuildError(f"RANK={rank} WORLD_SIZE={world_size}: need 0 <= RANK < WORLD_SIZE")
    return TorchrunEnv(rank, world_size, _env_int(environ, "LOCAL_WORLD_SIZE") or 1)


def default_build_workers(environ=os.environ) -> int:
    """All cores, shared among the ranks torchrun started on this machine."""
    env = torchrun_env(environ)
    return max(1, default_workers() // (env.local_world_size if env else 1))


def _torch_distributed():
    try:
        import torch.distributed as torch_dist
    except ImportError:
        raise BuildError(
            "running under torchrun (WORLD_SIZE > 1) needs torch for the barrier before the "
            "merge: install torch, or build with --num-parts/--part-index and run `prep merge`"
        ) from None
    return torch_dist


def rendezvous_seconds(environ=os.environ) -> float:
    value = environ.get(RENDEZVOUS_SECONDS_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_RENDEZVOUS_SECONDS
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise BuildError(f"{RENDEZVOUS_SECONDS_ENV}={value!r}: need a number of seconds > 0")
    return seconds


def run_build(config: BuildConfig, environ=os.environ) -> LaunchResult:
    env = torchrun_env(environ)
    if env is None:
        return LaunchResult(build(config), [], None)
    message = (
        f"rank {env.rank}: the process that started it (PID {os.getppid()}, torchrun's agent) is "
        "gone, so it stopped; rerun the same command to resume (finished parts are kept)"
    )
    watch = ParentWatch(f"prep: error: {message}").start()
    try:
        return _run_ranks(config, env, environ)
    except KeyboardInterrupt:  # the watch's SIGTERM, or a real one
        if watch.lost.is_set():
            raise BuildError(message) from None
        raise
    except BuildError:  # e.g. "connection closed" from the agent's store: say why it closed
        if watch.parent_gone(wait_seconds=0.5):
            raise BuildError(message) from None
        raise


def _run_ranks(config: BuildConfig, env: TorchrunEnv, environ) -> LaunchResult:
    part = PartSpec(env.rank, env.world_size)
    if config.part is not None and config.part != part:
        raise BuildError(
            f"--part-index {config.part.index} --num-parts {config.part.num_parts} contradicts "
            f"torchrun's RANK={env.rank} WORLD_SIZE={env.world_size}; give neither under torchrun"
        )
    single = dataclasses.replace(config, part=None)
    # As a single build does: sizes already complete are skipped, the others built in one pass.
    todo = [
        s
        for s in dict.fromkeys(config.prep_sizes)
        if config.overwrite or not (dataset_dir_of(single, s) / "manifest.json").is_file()
    ]
    torch_dist, group = _join_ranks(env, environ)
    if not todo:  # merged earlier: nothing to build or merge, only the summary to report
        try:  # in turn: each report holds the dataset's lock a moment; two at once collide
            for turn in range(env.world_size):
                if turn == env.rank:
                    summary = build(single)
                _barrier(torch_dist, group, env)
        finally:
            torch_dist.destroy_process_group()
        return LaunchResult(summary, [], env.rank)
    config = dataclasses.replace(config, prep_sizes=tuple(todo))
    try:
        summary = build(dataclasses.replace(config, part=part, quiet=config.quiet or env.rank != 0))
        _barrier(torch_dist, group, env)  # every part is finished and on the shared --out
        merges = _merge_parts(config, part) if env.rank == 0 else []
    finally:
        torch_dist.destroy_process_group()
    return LaunchResult(summary, merges, env.rank)


def _join_ranks(env: TorchrunEnv, environ):
    """torch.distributed and a group for the long barrier, once every rank has joined within
    the rendezvous timeout; else one line naming the variables that made this a rank."""
    seconds = rendezvous_seconds(environ)
    torch_dist = _torch_distributed()
    try:
        torch_dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=seconds))
        torch_dist.barrier()  # all here: the default group's short timeout has done its job
        group = torch_dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    except (ValueError, RuntimeError) as err:  # e.g. WORLD_SIZE exported outside torchrun
        variables = " ".join(
            f"{name}={environ[name]}" for name in TORCHRUN_VARIABLES if name in environ
        )
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise BuildError(
            f"{variables} are set, but joining the ranks failed within {seconds:g} s ({reason}): "
            "left over from another job? unset them for a plain build, or start the ranks with "
            f"torchrun ({RENDEZVOUS_SECONDS_ENV} sets the wait)"
        ) from None
    return torch_dist, group


def _barrier(torch_dist, group, env: TorchrunEnv) -> None:
    try:
        torch_dist.barrier(group=group)
    except RuntimeError as err:
        raise BuildError(
            f"rank {env.rank}: another rank failed before the merge ({str(err).splitlines()[0]}); "
            "rerun the same command: finished parts are kept"
        ) from None


def _merge_parts(config: BuildConfig, part: PartSpec) -> list[MergeSummary]:
    sizes = list(dict.fromkeys(config.prep_sizes))
    part_dirs = {
        s: [
            dataset_dir_of(dataclasses.replace(config, part=PartSpec(i, part.num_parts)), s)
            for i in range(part.num_parts)
        ]
        for s in sizes
    }
    merges = [
        merge(part_dirs[s], config.out_dir, overwrite=config.overwrite, quiet=config.quiet)
        for s in sizes
    ]
    for dirs in part_dirs.values():  # the parts were this command's intermediate output
        for part_dir in dirs:
            shutil.rmtree(part_dir)
    return merges
