"""Service settings: environment (CORRAL_*), then a config file, then defaults; every field says its unit and why."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ADMIN_TOKEN_FILE = "admin-token"  # in data_dir: the bootstrap platform-admin token, mode 0600


SYSTEM_DATA_DIR = Path("/var/lib/corral")


def default_data_dir() -> Path:
    """$XDG_DATA_HOME/corral if set; else, for root, /var/lib/corral (a system service: jobs run as their users'
    own accounts and must pass through data_dir to their directories, which root's 0700 home forbids); else
    ~/.local/share/corral."""
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]) / "corral"
    if os.geteuid() == 0:
        return SYSTEM_DATA_DIR
    return Path.home() / ".local" / "share" / "corral"


class ServiceSettings(BaseSettings):
    """How `corral serve` runs. Set as CORRAL_<FIELD> in the environment or in the YAML file CORRAL_CONFIG."""

    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="forbid")

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where the SQLite file, job logs and the bootstrap admin token live.",
    )
    database_url: str | None = Field(
        None,
        description=("SQLAlchemy URL, e.g. postgresql+psycopg://corral@db/corral. Default: SQLite (WAL) in data_dir."),
    )
    host: str = Field("127.0.0.1", description="Address the API listens on; loopback unless you mean to share it.")
    port: int = Field(8265, ge=1, le=65535, description="TCP port of the API.")
    migrate_on_start: bool = Field(
        True,
        description=(
            "Bring the database to the newest schema at start (Alembic). Off (the Helm chart, which runs `corral db "
            "upgrade` in a pre-install/pre-upgrade hook, and any multi-replica installation): the service refuses to "
            "start on a database that is not at the newest migration, and says to run `corral db upgrade`."
        ),
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description=(
            "Serve /metrics (Prometheus) on this separate TCP port (plain HTTP, on host) and answer 404 for /metrics "
            "on the API's port, so that a NetworkPolicy can open the metrics to Prometheus alone. None: /metrics is "
            "on the API's port."
        ),
    )
    tls_certfile: Path | None = Field(None, description="PEM certificate: serve the API over HTTPS (with tls_keyfile).")
    tls_keyfile: Path | None = Field(None, description="PEM private key of tls_certfile.")
    backend: Literal["local", "ray", "kubernetes"] = Field(
        "local",
        description=(
            "Where admitted jobs run: local processes on this machine, a Ray cluster, or a Kubernetes cluster (their "
            "GPU nodes become pools)."
        ),
    )
    k8s_kubeconfig: str | None = Field(None, description="Kubeconfig for backend kubernetes (None: in-cluster).")
    k8s_default_image: str | None = Field(None, description="Image for jobs that name none (backend kubernetes).")
    k8s_namespace_prefix: str = Field("corral-", description="A team's namespace is this prefix + its queue.")
    k8s_node_selector: str | None = Field(
        None,
        description=(
            "Label selector of the nodes Corral schedules on (backend kubernetes), e.g. corral.dev/managed=true; "
            "None: every Ready GPU node."
        ),
    )
    k8s_foreign_pods: bool = Field(
        True, description=("Schedule pods others create with schedulerName corral, as gangs (see docs/kubernetes.md).")
    )
    k8s_workload: Literal["pod", "job"] = Field(
        "pod",
        description=(
            "What a job's attempt becomes on Kubernetes: bare pods, or one Indexed batch/v1 Job whose pods Corral "
            "binds "
            "(a job's env CORRAL_K8S_WORKLOAD overrides it; sandboxes are always pods)."
        ),
    )
    k8s_hub_namespace: str = Field(
        "jupyterhub",
        description=(
            "JupyterHub's namespace: its hub and proxy pods are the only ones outside a team that reach its sandboxes."
        ),
    )
    k8s_notebook_storage_size: str | None = Field(
        None,
        description=(
            "Per-user notebook storage on Kubernetes: each user gets a PersistentVolumeClaim of this size (e.g. 10Gi) "
            "in their team's namespace, mounted at k8s_notebook_dir in every sandbox of theirs. None: none (a "
            "sandbox's "
            "files go with its pod). Corral's ServiceAccount then needs create and get on persistentvolumeclaims."
        ),
    )
    k8s_notebook_storage_class: str | None = Field(
        None, description=("The StorageClass of those claims (None: the cluster's default).")
    )
    k8s_notebook_dir: str = Field(
        "/home/jovyan", description=("Where a sandbox's claim is mounted: the notebook server's root directory.")
    )
    k8s_run_as_user: int = Field(
        1000,
        ge=1,
        description=(
            "The uid every job and sandbox pod runs as on Kubernetes (runAsNonRoot, never 0), whatever its image's "
            "USER "
            "says; 1000 is the Jupyter images' jovyan."
        ),
    )
    k8s_managed_taint: str = Field(
        "corral.dev/managed",
        description=(
            "Taint key (effect NoSchedule) that keeps kube-scheduler's pods off Corral's nodes; every pod Corral "
            "builds tolerates it. Taint the nodes Corral schedules with it (docs/kubernetes.md)."
        ),
    )
    k8s_binding_webhook_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description=(
            "Port of the HTTPS endpoint (path /bind) the API server asks before another scheduler binds a pod "
            "(a ValidatingWebhookConfiguration on pods/binding): a bind onto one of Corral's nodes is refused unless "
            "the pod fits beside Corral's jobs. None: no endpoint; others' pods are then only counted once bound."
        ),
    )
    k8s_binding_webhook_tls_dir: Path | None = Field(
        None,
        description=(
            "Directory with tls.crt and tls.key (a kubernetes.io/tls Secret mounted) for k8s_binding_webhook_port."
        ),
    )
    # High availability (docs/kubernetes.md, "High availability"): several instances on one PostgreSQL database.
    advertise_url: str | None = Field(
        None,
        description=(
            "Where other instances reach this one's API (http://POD_IP:8265): followers forward requests to the "
            "leader's. None: http://host:port, or http://<this host's name>:port when host is 0.0.0.0."
        ),
    )
    lease_s: float = Field(
        12.0,
        gt=0,
        le=600,
        description=(
            "Seconds a follower waits, after it last saw the leader renew, before it may take the lead (the Lease's "
            "duration on Kubernetes). Failover takes about this long plus a second after a leader dies: 12 keeps it "
            "within 15 s (Kubernetes' own controllers use 15, failing over in about 16)."
        ),
    )
    renew_deadline_s: float = Field(
        8.0,
        gt=0,
        le=600,
        description=(
            "Seconds the leader keeps acting after its last successful renewal (Lease and database lock); shorter than "
            "lease_s, so it stops before another may take the lead."
        ),
    )
    leader_retry_s: float = Field(2.0, gt=0, le=60, description="Seconds between renewals, and between tries to lead.")
    k8s_lease_name: str = Field("corral-leader", description="The Lease leader election uses (backend kubernetes).")
    k8s_lease_namespace: str | None = Field(
        None,
        description=("Its namespace; None: the service's own (POD_NAMESPACE, or the ServiceAccount's namespace file)."),
    )
    ray_address: str | None = Field(
        None, description=("The Ray cluster's dashboard/Jobs API address, e.g. http://10.0.0.5:8265 (backend ray).")
    )
    ray_token: str | None = Field(
        None,
        description=("Ray's authentication token (Ray >= 2.60 checks tokens by default); else RAY_AUTH_TOKEN is used."),
    )
    # Tenant isolation on the local backend (issue 21; docs/service.md, "Trust model").
    run_as: Literal["auto", "users", "service"] = Field(
        "auto",
        description=(
            "Backend local: whose OS account runs a job or notebook. users: its owner's own account (needs root), so "
            "jobs cannot read each other's files, the database or the admin token; service: the service's own user "
            "(single-user: no isolation); auto: users when the service runs as root, else service (with a warning)."
        ),
    )
    accounts: Literal["range", "system"] = Field(
        "range",
        description=(
            "With run_as users: range gives each user a uid of [uid_min, uid_max] (private group, home in "
            "data_dir/home/<user>, the mapping kept in data_dir/accounts.json); system maps a user to the existing "
            "account of that name (as JupyterHub's LocalProcessSpawner)."
        ),
    )
    uid_min: int = Field(
        2_000_000,
        gt=0,
        description=(
            "First uid of accounts range (a count; far above the uids of real accounts, so none is ever shared)."
        ),
    )
    uid_max: int = Field(2_099_999, gt=0, description="Last uid of accounts range (inclusive).")
    pool: str = Field("local", description="Pool name of this machine's GPUs.")
    node: str = Field("localhost", description="Node name of this machine in its pool.")
    gpus: int | None = Field(
        None,
        ge=0,
        description=("Declare this many GPUs instead of discovering them through NVML (a machine without GPUs)."),
    )
    gpu_model: str = Field("virtual", description="Model name of declared GPUs.")
    # Finite: free room starting at infinity becomes NaN once a job takes some, and then no job fits (issue 21).
    cpus: float | None = Field(
        None, gt=0, allow_inf_nan=False, description=("CPUs jobs may ask for on this node (None: not accounted).")
    )
    memory_gb: float | None = Field(
        None, gt=0, allow_inf_nan=False, description=("Memory jobs may ask for (GiB; None: not accounted).")
    )
    max_request_bytes: int = Field(
        1 << 20,
        ge=1024,
        description=(
            "Largest request body, bytes (default 1 MiB), refused with 413 before it is parsed. A job spec or queue "
            "tree "
            "is a few KiB; the largest parts of a job (command 64 KiB, env 256 x 32 KiB) are bounded on their own, and "
            "a bigger body would only be held in memory and stored."
        ),
    )
    tick_s: float = Field(
        0.5,
        gt=0,
        description=(
            "Seconds between scheduling cycles when nothing wakes the loop earlier; submissions wake it at once."
        ),
    )
    grace_s: float = Field(
        30.0,
        ge=0,
        description=("Seconds between SIGTERM and SIGKILL when a job is preempted or cancelled: time to checkpoint."),
    )
    min_runtime_s: float = Field(
        0.0, ge=0, description=("A job is not preempted before it has run this long (seconds): restarts cost warm-up.")
    )
    starvation_timeout_s: float = Field(
        3600.0, gt=0, description=("Seconds a skipped head job waits before the engine reserves nodes for it.")
    )
    demo: bool = Field(False, description="Load the demo queues on an empty database.")
    idle_threshold_pct: float = Field(
        5.0,
        gt=0,
        le=100,
        description=("A sandbox's GPU under this utilisation (%), with its memory unchanged, counts as idle."),
    )
    idle_timeout_s: float = Field(
        1800.0,
        gt=0,
        description=("Seconds a sandbox's GPUs may stay idle before it is stopped (profiles may set their own)."),
    )
    cull_interval_s: float = Field(10.0, gt=0, description="Seconds between looks at sandboxes' GPUs (NVML).")
    sandbox_priority: int = Field(
        100,
        ge=-1000,
        le=1000,
        description=(
            "Priority of every sandbox (the job priority scale, -1000..1000; batch jobs default to 0). Above its "
            "team's batch jobs, so a notebook takes GPUs back from them (preemption by priority within the queue), "
            "as Run:ai ranks interactive work over training."
        ),
    )
    hub_api_url: str | None = Field(
        None,
        description=(
            "JupyterHub's API (e.g. http://127.0.0.1:8081/hub/api): tokens the hub issued are accepted, and the "
            "hub's groups and custom:corral:* scopes decide who may do what."
        ),
    )
    hub_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description=(
            "JupyterHub's address as users open it (e.g. https://hub.example.org): the dashboard's sandbox page links "
            "each notebook there (<hub_url>/user/<name>/<server>/). None: the link goes to the server's own address."
        ),
    )
    hub_groups: dict[str, str] = Field(
        default_factory=dict,
        description=("Hub group -> Corral leaf queue: a group's members are that team (JSON in the environment)."),
    )
    hub_service_prefix: str | None = Field(
        None,
        pattern=r"^/[^?#]*$",
        description=(
            "The path under which JupyterHub's proxy forwards to Corral, registered as the hub service `corral` (the "
            "proxy forwards the whole path): Corral answers there as at its root. None: /services/corral and, with "
            "hub_api_url, <hub base URL>services/corral (hub_api_url's path without hub/api)."
        ),
    )
    otel_exporter: Literal["none", "console", "otlp"] = Field(
        "none",
        description=(
            "OpenTelemetry traces of API requests and scheduling cycles: none (off), console (stdout), or otlp (OTLP "
            "over "
            "HTTP to otel_endpoint; needs the extra corral[otel])."
        ),
    )
    otel_endpoint: str | None = Field(
        None,
        description=(
            "OTLP traces URL, e.g. http://collector:4318/v1/traces (None: OTEL_EXPORTER_OTLP_* or localhost:4318)."
        ),
    )
    otel_service_name: str = Field("corral", description="service.name of the spans: tells installations apart.")
    log_format: Literal["text", "json"] = Field(
        "text",
        description=(
            "Logs on stderr as text, or as one JSON object a line (time, level, logger, message, request_id, job_id, "
            "queue, ...) for a log pipeline."
        ),
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "warning",
        description=(
            "Least severe log records written; info adds one line per API request and per scheduling decision."
        ),
    )
    # The model registry (docs/models.md): artifacts are hashed by the service, so their reading is bounded.
    artifact_max_bytes: int = Field(
        16 * 2**30,
        gt=0,
        description=(
            "Largest model artifact registered (bytes, all files of a directory together): the service reads every "
            "byte to hash it, at registration and again at promotion and rollback."
        ),
    )
    artifact_max_files: int = Field(
        100_000,
        gt=0,
        description=("Most files in a directory artifact (a count): each is opened and framed in the digest."),
    )
    artifact_hash_timeout_s: float = Field(
        45.0,
        gt=0,
        description=(
            "Seconds a request waits for an artifact's digest before answering 503 (below the clients' 60 s read "
            "timeout, so the answer says why)."
        ),
    )
    artifact_hash_workers: int = Field(
        2,
        ge=1,
        le=64,
        description=(
            "Threads that hash artifacts (a count), off the API's request threads; with artifact_hash_waiting, what "
            "bounds the disk reading registrations and promotions can cause at once."
        ),
    )
    artifact_hash_waiting: int = Field(
        4,
        ge=0,
        le=1024,
        description=(
            "Digests that may wait for a hashing thread (a count); beyond that a request is answered 503 at once, so "
            "a flood of registrations cannot hold the API's threads."
        ),
    )
    mlflow_tracking_uris: list[str] = Field(
        default_factory=list,
        description=(
            "MLflow tracking URIs model owners may export to (exact strings; JSON list in the environment). Empty: "
            "export is off. Only an admin names them: the export makes the server write (sqlite:, file:) or call them."
        ),
    )
    mlflow_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description=(
            "Seconds an MLflow export may take in all, and each HTTP request to the tracking server (connect and "
            "read), with no retries: an unreachable server answers an error in seconds."
        ),
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments (CLI flags) beat the environment, which beats the config file.
        return init_settings, env_settings, _YamlFile(settings_cls)

    @model_validator(mode="after")
    def _tls_pair(self) -> ServiceSettings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together: give both, or neither")
        if self.metrics_port is not None and self.metrics_port in (self.port, self.k8s_binding_webhook_port):
            raise ValueError(f"metrics_port {self.metrics_port} is already the API's or the binding webhook's port")
        if self.renew_deadline_s >= self.lease_s:
            raise ValueError(
                f"renew_deadline_s ({self.renew_deadline_s:g}) must be shorter than lease_s "
                f"({self.lease_s:g}): a leader must stop before another may take the lead"
            )
        if (self.k8s_binding_webhook_port is None) != (self.k8s_binding_webhook_tls_dir is None):
            raise ValueError(
                "k8s_binding_webhook_port and k8s_binding_webhook_tls_dir go together: give both, or neither"
            )
        return self

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'corral.db'}"

    @model_validator(mode="after")
    def _uid_range(self) -> ServiceSettings:
        if self.uid_min > self.uid_max:
            raise ValueError(f"uid_min {self.uid_min} is above uid_max {self.uid_max}")
        return self

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "runs"


class _YamlFile(PydanticBaseSettingsSource):
    """Fields from the YAML file named by CORRAL_CONFIG (keys are field names)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("CORRAL_CONFIG")
        if not path:
            return {}
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of setting names to values")
        return data
