"""Many processes on torch.distributed: the process group, who this process is, and the few collectives training uses.

A command launched by torchrun (or `imagen ... --nproc N`, which launches the same) finds RANK, LOCAL_RANK and
WORLD_SIZE in its environment; `init_distributed` joins the process group then (gloo on CPU, NCCL on CUDA, one GPU
per local rank). Without them every function here is the single-process identity, so the rest of the toolkit never
asks whether it runs distributed. Nothing assumes one machine: what one rank reads from its disk (a run's config, a
checkpoint) reaches the others through `broadcast_object`, never through a shared file system.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from imagen.errors import ConfigError


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the job: `rank` of `world_size` processes, `local_rank` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run directory, logs, checkpoints and sample grids."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> ProcessInfo:
    """This process's rank, local rank and world size as the launcher set them (one process when none did)."""
    try:
        return ProcessInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                           int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch with torchrun") from None


def current() -> ProcessInfo:
    """This process's rank and world size (after `init_distributed`; one process before it)."""
    if dist.is_available() and dist.is_initialized():
        return ProcessInfo(dist.get_rank(), dist.get_world_size(), launched().local_rank)
    return ProcessInfo()


def init_distributed(device: torch.device) -> ProcessInfo:
    """Join the launcher's process group once (gloo for CPU, NCCL for CUDA); return this process's place in it."""
    info = launched()
    if not info.distributed or not dist.is_available():
        return ProcessInfo()
    if dist.is_initialized():
        return current()
    if device.type == "mps":
        raise ConfigError("multi-process training runs on CPU (gloo) or CUDA (NCCL), not on mps; use --device cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {info.local_rank} has no GPU ({torch.cuda.device_count()} here); launch at most "
                              f"{torch.cuda.device_count()} processes per machine (--nproc-per-node)")
        torch.cuda.set_device(info.local_rank)
    # A rank that dies makes the launcher stop the others; the timeout only bounds a collective some rank never joins.
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=float(os.environ.get("IMAGEN_DIST_TIMEOUT_MIN", 30))))
    return current()


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: its own GPU (cuda:LOCAL_RANK) when several processes share a machine's GPUs."""
    info = current()
    if info.distributed and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def _comm_device() -> torch.device:
    """Where collective tensors live: the rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of `values` over every rank (a copy; `values` itself unchanged)."""
    if not current().distributed:
        return values.clone()
    out = values.detach().to(_comm_device(), torch.float64)
    dist.all_reduce(out)
    return out.to(values.device, values.dtype)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one."""
    if not current().distributed:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def broadcast_object(obj=None):
    """Rank 0's `obj` on every rank (pickled over the process group; the object travels between our own processes)."""
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def from_main(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` computed on rank 0 alone (it may read rank 0's disk) and handed to every rank.

    An exception it raises is raised on every rank, so no rank waits for a collective the others never reach; the
    copies carry `raised_on_rank = 0`, so only rank 0 reports it.
    """
    info = current()
    if not info.distributed:
        return fn(*args, **kwargs)
    result, error = None, None
    if info.is_main:
        try:
            result = ("ok", fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - handed to every rank, then raised
            error = e
            result = ("error", e)
    kind, value = broadcast_object(result)
    if kind == "error":
        if error is not None:
            raise error
        value.raised_on_rank = 0
        raise value
    return value


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    info = current()
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into `module` on every rank."""
    if not current().distributed:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def barrier() -> None:
    """Wait until every rank gets here. Call it on every rank, never inside an `if is_main` branch."""
    if current().distributed:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous share of `n` items split as evenly as possible (the first n % world get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class TrainingStep(torch.nn.Module):
    """The task's training step as a module, for DistributedDataParallel to wrap (it owns `model`'s parameters)."""

    def __init__(self, model, task):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch):
        return self.task.training_step(self.model, batch)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random streams (dropout, augmentation): rank 0 keeps the run's seed."""
    return seed if rank == 0 else (seed + 1_000_003 * rank) % 2**63


def destroy() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


current_process = current  # the name imagen.train exports


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run `python -m imagen ARGV` as `nproc` processes on this machine through torchrun's own launcher
    (torch.distributed.run, --standalone); return the job's exit status: 0, or that of the first rank that failed."""
    import logging
    import sys

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import parse_args, run

    # The launcher's own log lines (rendezvous, the failure report) would bury the failing rank's one-line error.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets, said once here instead of in a warning
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--module", "imagen"])
    args.training_script_args = list(argv)  # set here: torchrun's parser would read "--n" as one of its own options
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal
            print(f"imagen: rank {rank} was stopped by signal {-code}", file=sys.stderr)
            return 128 - code
        return code or 1
    except SignalException as e:  # SIGTERM / SIGINT to the launcher: the ranks got it too, and checkpointed
        return 128 + int(e.sigval)
    return 0
