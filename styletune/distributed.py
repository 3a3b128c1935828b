"""Training on several processes: the small layer the training loop calls, and the launcher.

One process (the default) needs none of it: :class:`Processes` with ``world == 1`` makes every
call a no-op, creates no process group and wraps nothing, so single-process training is the
same loop at the same speed. Under ``torchrun``, ``accelerate launch`` or ``styletune train
--devices N`` (which runs torchrun itself), each process is one rank of a PyTorch process group
(gloo on CPU, NCCL on CUDA) and:

* the model is wrapped in ``DistributedDataParallel`` (gradients averaged across ranks during
  backward), or sharded with FSDP2's ``fully_shard`` when ``--fsdp`` is given;
* each rank takes its own consecutive share of every optimizer step's blocks (see
  ``training.StepPlan``), so the global batch is the same blocks in the same order whatever the
  number of processes;
* only rank 0 writes (checkpoints, metrics, samples, plots, the progress bar, messages);
* ranks agree at each step boundary on whether to stop (Ctrl-C, SIGTERM, early stopping, a
  non-finite loss), so they all stop at the same step with one checkpoint.

Why torch.distributed directly and not ``accelerate.Accelerator``: what the loop needs from it is
the process group, the DDP/FSDP wrapper and two small all-reduces, each one call here.
``Accelerator`` would also take over the data loader (this loop derives each step's blocks from the
step number, which is what makes resume exact and lets the process count change), autocast
(styletune picks bf16 per machine itself) and checkpointing (styletune's has its own safetensors
layout). ``accelerate launch`` works all the same: it starts the processes with the same
environment variables torchrun sets, and ``ACCELERATE_USE_FSDP=true`` (its FSDP plugin) turns on
``--fsdp``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import StyletuneError


def launched() -> bool:
    """Whether this process is one of several started by torchrun / accelerate launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Processes:
    """This process's place in the run: its rank among ``world`` processes, and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    owns_group: bool = False
    """Whether :meth:`start` created the process group (and :meth:`close` ends it): a caller that
    made its own keeps it."""

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and talks to the user."""
        return self.rank == 0

    @classmethod
    def start(cls, device: str) -> "Processes":
        """One process, or (under a launcher) join the process group: NCCL when ``device`` is CUDA,
        else gloo. Each rank takes the CUDA device of its local rank."""
        if not launched():
            return cls(device=device)
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(rank=rank, world=world, local_rank=local_rank, device=device, owns_group=owns)

    def _all_reduce(self, values: Sequence[float], op) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64,
                         device=self.device if self.device.startswith("cuda") else "cpu")
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks."""
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        return self._all_reduce(values, dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        """The largest ``value`` over the ranks."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        return self._all_reduce([value], dist.ReduceOp.MAX)[0]

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
        if self.world == 1:
            return bool(flag)
        import torch.distributed as dist

        return self._all_reduce([float(bool(flag))], dist.ReduceOp.MAX)[0] > 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def wrap(self, model: torch.nn.Module, layers: Sequence[torch.nn.Module], fsdp: bool) -> torch.nn.Module:
        """The module the loop calls for a micro-batch's loss: ``LossOf(model)`` as is (one process),
        inside DDP, or over a model sharded by FSDP2 (each transformer layer one unit, the rest in
        the root unit; the loss then goes through the model's own forward, which gathers the root)."""
        from .losses import LossOf

        if fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in layers:
                fully_shard(layer)
            fully_shard(model)
            return LossOf(model, chunked=False)
        if self.world == 1:
            return LossOf(model)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.device.startswith("cuda") else None
        return DistributedDataParallel(LossOf(model), device_ids=ids)

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def fsdp_from_environment() -> bool:
    """``accelerate launch`` with its FSDP plugin (``--use_fsdp`` or a config with
    ``distributed_type: FSDP``) says so in ``ACCELERATE_USE_FSDP``."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank is gone (its own error is
    that rank's to report). gloo says "Connection closed by peer" or "Connection reset"."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))


# ---------------------------------------------------------------------------------------------
# The launcher behind `styletune train --devices N`


def launch(nproc: int, train_args: list[str]) -> int:
    """Run ``python -m styletune train ARGS`` in ``nproc`` processes through torchrun
    (``torch.distributed.run``, standalone: one machine, a free port) and wait for them.

    Returns the exit status for the CLI: 0, 130 when interrupted (the ranks saved a checkpoint),
    else the failing rank's own status (2 for a user error, which that rank has printed as one line).
    The other ranks stop too: torchrun ends them when one fails, so nothing hangs.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun's own log lines (its OMP_NUM_THREADS notice, a failure report of many lines, "Received
    # 2 death signal"): each rank reports for itself, and this function says how the run ended.
    # Its modules set their loggers' levels themselves, so each is quietened by name.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
                                "--monitor-interval=0.1", "-m", "styletune", "train", *train_args])
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        return 2 if 2 in codes else next((c for c in codes if c > 0), 1)
    except SignalException:
        return 130
    return 0


def relaunch_config(cfg) -> str:
    """The resolved config as a temporary YAML file the ranks start from (removed by the caller)."""
    from .config import save_yaml, train_config_to_dict

    fd, path = tempfile.mkstemp(prefix="styletune-launch-", suffix=".yaml")
    os.close(fd)
    save_yaml(path, train_config_to_dict(cfg))
    return path


def rank_prefix() -> str:
    """``[rank N] `` in a multi-process run, so each line says which process it came from."""
    return f"[rank {os.environ.get('RANK', '0')}] " if launched() else ""


def check_devices(n: int, device: str) -> None:
    """A clear error for a --devices count the machine cannot run."""
    if n < 1:
        raise StyletuneError(f"--devices must be >= 1, got {n}")
    if device.startswith("cuda") and torch.cuda.is_available() and n > torch.cuda.device_count():
        raise StyletuneError(f"--devices {n}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if n > 1 and device == "mps":
        raise StyletuneError("--devices: several processes on Apple MPS are not supported; use one")
    if launched():
        raise StyletuneError("--devices is for starting the processes; this process was already started by "
                             "torchrun or accelerate launch")

