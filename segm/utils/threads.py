"""Data-loading workers and intra-op threads chosen together, so that they do not fight over cores
(docs/DESIGN.md, "Threads and workers").

torch's intra-op threads meet at a barrier after every parallel operator. When a busy DataLoader
worker (or any neighbouring process) holds one of their cores, every barrier waits for a thread
that is not running: on a 2-core machine that made the policy network's training steps about ten
times slower. So the trainers plan both numbers from the cores this process may use (its CPU
affinity, shared among the training processes of the node):

- on the CPU, a machine of at most SMALL_MACHINE cores per process loads data in the training
  process (no workers: measured faster on 2 cores, BENCHMARKS.md "Threads and workers"); a larger
  one gives a quarter of its cores to workers (at most the reference's count); the intra-op threads
  take the cores the workers do not;
- on a GPU the workers feed the device and the threads hardly matter: up to the reference's
  count of workers, one core left to the training process, and torch's thread default.

`--num-workers` and `--threads` given on the command line win; so does OMP_NUM_THREADS for the threads.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

__all__ = ["SMALL_MACHINE", "CpuPlan", "apply_threads", "cores_per_process", "plan_cpu", "WORKERS_HELP",
           "THREADS_HELP"]

SMALL_MACHINE = 4  # cores per process at or below which a CPU run loads data in its own process
# Launchers' count of training processes on this node.
_LOCAL_PROCESSES = ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")

WORKERS_HELP = (f"Data-loading processes per training process [default: on the CPU 0 with ≤ {SMALL_MACHINE} "
                "cores per process, else a quarter of them; on a GPU one core per process left to training; "
                "at most {reference}].")
THREADS_HELP = ("Intra-op threads of each training process [default: on the CPU the cores per process not given "
                "to workers (or $OMP_NUM_THREADS when set); on a GPU torch's default].")


def _local_processes(env: Mapping[str, str]) -> int:
    for name in _LOCAL_PROCESSES:
        match = re.match(r"\d+", env.get(name, ""))  # SLURM writes e.g. "2(x3)"
        if match and int(match.group()) > 0:
            return int(match.group())
    return 1


def cores_per_process(env: Mapping[str, str] | None = None) -> int:
    """The cores this process may use: SLURM's cores per task when it says so (srun binds each
    task to its own), else its affinity divided among the node's training processes (torchrun
    starts them all on the same cores)."""
    env = os.environ if env is None else env
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_task = re.match(r"\d+", env.get("SLURM_CPUS_PER_TASK", ""))
    if per_task and int(per_task.group()) > 0:
        return max(1, min(cores, int(per_task.group())))
    return max(1, cores // _local_processes(env))


@dataclass(frozen=True)
class CpuPlan:
    workers: int
    threads: int | None  # None: torch's own setting stays (a GPU run, or OMP_NUM_THREADS given)
    cores: int

    def describe(self) -> str:
        threads = "torch's default" if self.threads is None else str(self.threads)
        return f"{self.cores} cores per process: {self.workers} data-loading workers, intra-op threads {threads}"


def apply_threads(threads: int | None) -> None:
    """torch's intra-op threads of this process: `threads`, or left as they are for None."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def plan_cpu(device_type: str, reference_workers: int, workers: int | None = None, threads: int | None = None,
             env: Mapping[str, str] | None = None, cores: int | None = None) -> CpuPlan:
    """The workers and intra-op threads of a training process on `device_type` ("cpu", "cuda");
    given values win. Raises ValueError for a negative worker count or fewer than one thread."""
    env = os.environ if env is None else env
    if workers is not None and workers < 0:
        raise ValueError(f"--num-workers must be ≥ 0, got {workers}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be ≥ 1, got {threads}")
    cores = cores_per_process(env) if cores is None else cores
    if workers is None:
        if device_type == "cpu":
            workers = 0 if cores <= SMALL_MACHINE else min(reference_workers, cores // 4)
        else:
            workers = min(reference_workers, max(0, cores - 1))
    if threads is None and device_type == "cpu" and "OMP_NUM_THREADS" not in env:
        threads = max(1, cores - workers)
    return CpuPlan(workers, threads, cores)
