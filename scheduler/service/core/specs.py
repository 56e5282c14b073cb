"""What users send: job specs and queue documents (YAML or JSON), validated with pydantic."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from quotas import QueueSpec
from scheduler.engine.model import JobSpec, check_gpus, mig_fraction
from scheduler.service.api.edge import (
    MAX_COMMAND_ARGS,
    MAX_COMMAND_BYTES,
    MAX_ENV,
    MAX_ENV_NAME,
    MAX_ENV_VALUE,
    MAX_IMAGE,
    MAX_LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_PATH,
    Amount,
    Body,
)

MAX_NAME = 200
MAX_RUNTIME_S = 10 * 365 * 86400.0  # ten years: any longer is "never", and far below where float seconds lose units


def _env_names(v: dict[str, str]) -> dict[str, str]:
    for k, x in v.items():
        if not k or "=" in k or "\0" in k or len(k) > MAX_ENV_NAME:
            raise ValueError(
                f"environment variable name {k[:MAX_ENV_NAME]!r} is not valid (1 to {MAX_ENV_NAME} characters, no '=')"
            )
        if k == "CUDA_VISIBLE_DEVICES":
            raise ValueError("CUDA_VISIBLE_DEVICES is set by Corral to the job's GPUs")
        if len(x) > MAX_ENV_VALUE:
            raise ValueError(f"the value of {k} has {len(x)} characters; at most {MAX_ENV_VALUE}")
    return v


def _workdir(v: str) -> str:
    # Relative to what? The service's own directory is no place for a job; whether it exists is checked at
    # submission by the backend that runs it (intake.check_workdir).
    if not v.startswith("/"):
        raise ValueError(f"workdir {v[:200]!r} is not an absolute path")
    return v


def _command(v: list[str] | str) -> list[str] | str:
    if (v if isinstance(v, str) else v[0]).strip() == "":
        raise ValueError("command is empty: give a program (argv[0]) or a shell command")
    args = [v] if isinstance(v, str) else v
    if any("\0" in a for a in args):
        raise ValueError("command arguments may not contain NUL characters")
    if len(args) > MAX_COMMAND_ARGS:
        raise ValueError(f"command has {len(args)} arguments; at most {MAX_COMMAND_ARGS}")
    size = sum(len(a.encode("utf-8", "surrogatepass")) + 1 for a in args)  # as exec sees it: NUL-ended
    if size > MAX_COMMAND_BYTES:
        raise ValueError(f"command is {size} bytes; at most {MAX_COMMAND_BYTES} (put long inputs in a file)")
    return v


def _gpu_count(v: Any) -> Any:
    """A number of GPUs as given (a form's text read as a number): one clear error for anything else, in place
    of the two an int-or-float union gives."""
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                pass
    elif isinstance(v, int | float) and not isinstance(v, bool):
        return v
    raise ValueError(f"gpus is {str(v)[:40]!r}: give an integer number of GPUs, or a decimal share of one below 1")


# The fields a job and a sandbox share, with their bounds in one place (a sandbox request is a job request too).
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
PoolName = Annotated[str, Field(max_length=MAX_NAME)] | None
Command = Annotated[list[str] | str, Field(min_length=1, max_length=MAX_COMMAND_BYTES), AfterValidator(_command)]
Argv = Annotated[list[str], Field(min_length=1, max_length=MAX_COMMAND_ARGS), AfterValidator(_command)]
Env = Annotated[dict[str, str], Field(max_length=MAX_ENV), AfterValidator(_env_names)]
Workdir = Annotated[str, Field(min_length=1, max_length=MAX_PATH), AfterValidator(_workdir)] | None
Image = Annotated[str, Field(min_length=1, max_length=MAX_IMAGE)] | None
GpuCount = Annotated[int | float, BeforeValidator(_gpu_count)]


class Strict(Body):
    """A document users send: unknown fields, non-finite numbers, booleans for numbers and NUL are errors (edge.py)."""


class JobSubmit(Strict):
    """A job as submitted. `command` is argv, or one string run by /bin/sh -c."""

    name: Name = "job"
    queue: Name
    pool: PoolName = Field(None, description="Default: the service's only pool.")
    workers: int = Field(1, ge=1, le=1024)
    gpus: GpuCount = Field(
        1,
        ge=0,
        le=1024,
        description="GPUs per worker: a whole number, or a fraction below 1 of one GPU for one worker (shared GPU).",
    )
    mig: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NAME,
        description="A MIG profile (1g.10gb): one slice of it, one worker; gpus is then the profile's fraction.",
    )
    cpus: Amount = Field(0.0, description="CPUs per worker (0: not accounted).")
    memory_gb: Amount = Field(0.0, description="Memory per worker, GiB (0: not accounted).")
    priority: int = Field(0, ge=-1000, le=1000)
    preemptible: bool = True
    command: Command
    env: Env = Field(default_factory=dict)
    workdir: Workdir = Field(
        None, description=("An absolute path; with the local backend it must be a directory that exists at submission.")
    )
    image: Image = Field(None, description="Container image, for the Kubernetes and Ray backends.")
    max_runtime: float | None = Field(
        None, gt=0, le=MAX_RUNTIME_S, description="Seconds; the job is stopped and failed after it."
    )
    checkpoint: bool = False
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)
    idempotency_key: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    kind: Literal["job", "sandbox"] = Field("job", description="Sandboxes are opened through /v1/sandboxes.")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for k, x in v.items():
            if not k or len(k) > MAX_LABEL_KEY:
                raise ValueError(f"label key {k[:MAX_LABEL_KEY]!r} is not valid (1 to {MAX_LABEL_KEY} characters)")
            if len(x) > MAX_LABEL_VALUE:
                raise ValueError(f"the value of label {k} has {len(x)} characters; at most {MAX_LABEL_VALUE}")
        return v

    @model_validator(mode="after")
    def _sharing(self) -> JobSubmit:
        """Fractions and MIG profiles (GPU sharing, docs/scheduling.md): what and where is wrong, in the message."""
        if self.mig is not None:
            fraction = mig_fraction(self.mig)  # ValueError: not a MIG profile
            if "gpus" in self.model_fields_set and self.gpus != fraction:
                raise ValueError(f"mig {self.mig} is {fraction} of a GPU; leave gpus out (it is {self.gpus})")
            if self.workers != 1:
                raise ValueError(f"mig {self.mig} with {self.workers} workers: a MIG slice is for one worker")
            self.gpus = fraction
        else:
            self.gpus = check_gpus(self.gpus, self.workers, "gpus")
        return self

    def engine_spec(self, job_id: int, pool: str) -> JobSpec:
        return JobSpec(
            id=engine_id(job_id),
            queue=self.queue,
            pool=pool,
            gpus=self.gpus,
            workers=self.workers,
            cpus=self.cpus,
            memory_gb=self.memory_gb,
            priority=self.priority,
            preemptible=self.preemptible,
            checkpoint=self.checkpoint,
            mig=self.mig,
        )


class QueueDecl(Strict):
    """One queue in a queue document: GPUs per pool guaranteed (quota), the most it may use (limit), weight."""

    name: str = Field(min_length=1, max_length=MAX_NAME)
    parent: str | None = None
    quota: dict[str, int] = Field(default_factory=dict)
    limit: dict[str, int] = Field(default_factory=dict)
    weight: float | dict[str, float] = 1.0

    def spec(self) -> QueueSpec:
        return QueueSpec(
            self.name,
            self.parent,
            dict(self.quota),
            dict(self.limit),
            dict(self.weight) if isinstance(self.weight, dict) else self.weight,
        )


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


def engine_spec_of(row_spec: Mapping[str, Any], job_id: int, pool: str) -> JobSpec:
    """The engine's view of a stored job spec: only the fields the engine reads, so that a spec stored under older,
    looser rules (a longer command, a relative workdir) still schedules and fails at launch, alone, if it must.
    ValueError when one of those fields is not what the engine needs (NaN or Infinity, a boolean for a number)."""

    def field(name: str, kinds: tuple[type, ...]) -> Any:
        v = row_spec.get(name, JobSubmit.model_fields[name].default)
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
            raise ValueError(f"job {job_id}: stored {name} {v!r} is not a {' or '.join(k.__name__ for k in kinds)}")
        return v

    queue = row_spec.get("queue")
    if not isinstance(queue, str):
        raise ValueError(f"job {job_id}: stored queue {queue!r} is not a name")
    # JobSpec refuses non-finite CPUs and memory itself (engine.model.finite).
    return JobSpec(
        id=engine_id(job_id),
        queue=queue,
        pool=pool,
        gpus=field("gpus", (int, float)),
        workers=field("workers", (int,)),
        cpus=float(field("cpus", (int, float))),
        memory_gb=float(field("memory_gb", (int, float))),
        priority=field("priority", (int,)),
        preemptible=field("preemptible", (bool,)),
        checkpoint=field("checkpoint", (bool,)),
        mig=field("mig", (str, type(None))),
    )
