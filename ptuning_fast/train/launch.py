"""Running the job: :func:`run` (a :class:`TrainConfig` in, a :class:`TrainResult` out) and the
command-line entry :func:`main`."""
from __future__ import annotations

from dataclasses import dataclass

from ..backend import use_backend
from .config import TrainConfig, check_config, parse_args
from .job import Job
from .multitask import MultiTaskJob
from .processes import destroy_process_group


@dataclass
class TrainResult:
    """What :func:`run` returns: the summary (also in ``summary.json``) and the trained model."""

    summary: dict
    model: object  # the PeftModel (unwrapped from DDP), or the PTuningModel of a multi-task run


def run(config: TrainConfig) -> TrainResult:
    """Run the training job described by ``config`` (see :mod:`ptuning_fast.train`)."""
    check_config(config)
    with use_backend(config.backend):  # the caller's choice comes back afterwards
        job = MultiTaskJob(config) if config.tasks else Job(config)
        try:
            job.train()
            return TrainResult(job.summary(), job.peft_model)
        finally:
            job.close()  # the output folder is free for the next job


def main(argv=None) -> dict:
    """Command-line entry: parse ``argv`` (default ``sys.argv[1:]``), run, return the summary."""
    config = parse_args(argv)
    try:
        return run(config).summary
    finally:
        destroy_process_group()


__all__ = ["TrainResult", "main", "run"]
