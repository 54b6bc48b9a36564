"""The same stages on DataTrove's executors: local processes, Slurm array jobs, or a Ray cluster.

Each stage becomes one executor whose `depends` is the stage before it: locally they run in order; on
Slurm each stage is an array job submitted with `--dependency=afterok:<previous job>`, so the whole
pipeline is queued at once; on Ray the driver runs the stages in order on the cluster. A step never
knows which executor runs it. Finished tasks are recorded per stage (`completions/`) by DataTrove, so
every executor resumes the same way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from phitrain.config import ExecutorConfig


def _quiet_run_for_rank(cls):
    """A subclass of a DataTrove executor whose tasks keep their log in the task's log file only (the
    stock executors also copy every line to stderr, hundreds of lines for a small corpus)."""

    class Quiet(cls):
        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
            saved = sys.stderr
            with open(os.devnull, "w") as devnull:
                sys.stderr = devnull
                try:
                    return super()._run_for_rank(rank, local_rank, node_rank)
                finally:
                    sys.stderr = saved

    Quiet.__name__ = Quiet.__qualname__ = f"Quiet{cls.__name__}"
    return Quiet


def make_executors(cfg: ExecutorConfig, stages, logs: Path) -> list:
    """One DataTrove executor per `(name, pipeline, tasks)` stage, each depending on the previous."""
    executors = []
    previous = None
    for name, pipeline, tasks in stages:
        common = dict(pipeline=pipeline, tasks=tasks, logging_dir=str(logs / name), depends=previous)
        if cfg.kind == "local":
            from datatrove.executor import LocalPipelineExecutor

            cls = _quiet_run_for_rank(LocalPipelineExecutor)
            workers = min(tasks, cfg.workers or os.cpu_count() or 1)
            ex = cls(workers=workers, start_method="spawn", **common)
        elif cfg.kind == "slurm":
            from datatrove.executor import SlurmPipelineExecutor

            ex = SlurmPipelineExecutor(
                time=cfg.time, partition=cfg.partition, cpus_per_task=cfg.cpus_per_task,
                mem_per_cpu_gb=cfg.mem_per_cpu_gb, job_name=f"phitrain-{name}", workers=cfg.workers or -1,
                env_command=cfg.env_command or f"source {Path(sys.prefix) / 'bin' / 'activate'}",
                sbatch_args=dict(cfg.sbatch_args), **common)
        else:
            import ray
            from datatrove.executor.ray import RayPipelineExecutor

            if not ray.is_initialized():   # join the cluster the recipe names (its head must be running)
                ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False)

            ex = RayPipelineExecutor(workers=cfg.workers or -1, cpus_per_task=cfg.cpus_per_task,
                                     mem_per_cpu_gb=cfg.mem_per_cpu_gb, **common)
        executors.append(ex)
        previous = ex
    return executors
