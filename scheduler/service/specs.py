"""What users send: job specs and queue documents (YAML or JSON), validated with pydantic."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from quotas import QueueSpec
from scheduler.engine.model import JobSpec

MAX_NAME = 200


class Strict(BaseModel):
    # Unknown fields are errors here: a typo in "preemptable" must not silently run a job the wrong way.
    model_config = ConfigDict(extra="forbid")


class JobSubmit(Strict):
    """A job as submitted. `command` is argv, or one string run by /bin/sh -c."""

    name: str = Field("job", min_length=1, max_length=MAX_NAME)
    queue: str = Field(min_length=1, max_length=MAX_NAME)
    pool: str | None = Field(None, max_length=MAX_NAME, description="Default: the service's only pool.")
    workers: int = Field(1, ge=1, le=1024)
    gpus: int = Field(1, ge=0, le=1024, description="GPUs per worker.")
    cpus: float = Field(0.0, ge=0, description="CPUs per worker (0: not accounted).")
    memory_gb: float = Field(0.0, ge=0, description="Memory per worker, GiB (0: not accounted).")
    priority: int = Field(0, ge=-1000, le=1000)
    preemptible: bool = True
    command: list[str] | str = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = None
    image: str | None = Field(None, description="Container image, for the Kubernetes and Ray backends.")
    max_runtime: float | None = Field(None, gt=0, description="Seconds; the job is stopped and failed after it.")
    checkpoint: bool = False
    labels: dict[str, str] = Field(default_factory=dict)
    idempotency_key: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    kind: Literal["job", "sandbox"] = Field("job", description="Sandboxes are opened through /v1/sandboxes.")

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not k or "=" in k or "\0" in k:
                raise ValueError(f"environment variable name {k!r} is not valid")
            if k == "CUDA_VISIBLE_DEVICES":
                raise ValueError("CUDA_VISIBLE_DEVICES is set by Corral to the job's GPUs")
        return v

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str] | str) -> list[str] | str:
        if (v if isinstance(v, str) else v[0]).strip() == "":
            raise ValueError("command is empty: give a program (argv[0]) or a shell command")
        if not isinstance(v, str) and any("\0" in a for a in v):
            raise ValueError("command arguments may not contain NUL characters")
        return v

    def engine_spec(self, job_id: int, pool: str) -> JobSpec:
        return JobSpec(id=engine_id(job_id), queue=self.queue, pool=pool, gpus=self.gpus, workers=self.workers,
                       cpus=self.cpus, memory_gb=self.memory_gb, priority=self.priority,
                       preemptible=self.preemptible, checkpoint=self.checkpoint)


class QueueDecl(Strict):
    """One queue in a queue document: GPUs per pool guaranteed (quota), the most it may use (limit), weight."""

    name: str = Field(min_length=1, max_length=MAX_NAME)
    parent: str | None = None
    quota: dict[str, int] = Field(default_factory=dict)
    limit: dict[str, int] = Field(default_factory=dict)
    weight: float | dict[str, float] = 1.0

    def spec(self) -> QueueSpec:
        return QueueSpec(self.name, self.parent, dict(self.quota), dict(self.limit),
                         dict(self.weight) if isinstance(self.weight, dict) else self.weight)


class QueueDocument(Strict):
    """The whole queue tree, as `corral queue apply -f queues.yaml` sends it."""

    queues: list[QueueDecl]

    def specs(self) -> list[QueueSpec]:
        return [q.spec() for q in self.queues]


def engine_id(job_id: int) -> str:
    """The engine's name for a job: its reasons read "... and job-7 needs 2", not "... and 7 needs 2"."""
    return f"job-{job_id}"


def job_id_of(engine_job: str) -> int:
    return int(engine_job.removeprefix("job-"))


def engine_spec_of(row_spec: dict[str, Any], job_id: int, pool: str) -> JobSpec:
    """The engine's view of a stored job spec."""
    return JobSubmit.model_validate(row_spec).engine_spec(job_id, pool)
