"""The model registry from Python: versions from finished jobs, gated promotions, approvals, rollback.

    from notebooks.client import Client
    corral = Client()
    job = corral.submit(script="train.py", queue="nlp", gpus=1)
    job.wait()
    corral.models.create_model("sentiment", queue="nlp")
    # the job wrote model.pt, metrics.json and lineage.json into $CORRAL_OUTPUT_DIR (notebooks.outputs)
    v = corral.models.register_model("sentiment", job, "model.pt")
    ask = corral.models.promote("sentiment", v["version"])          # {"promotion", "state", "gates": [...]}
    # another model owner of the team, with their own token:
    Client(token=...).models.approve(ask["promotion"])

`AsyncModels` is the asynchronous core over `AsyncCorral.request` (notebooks.aio), for code already on an
event loop; `Models` (what `Client.models` returns) runs it on the client's private loop, as `Client` does for
jobs. Every method answers the API's decoded JSON (see docs/models.md) or raises CorralError.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    # Only for annotations: notebooks.client imports this module (for Client.models), so a runtime import of it
    # here would be circular.
    from notebooks.aio import AsyncCorral
    from notebooks.client import Client

__all__ = ["AsyncModels", "Models", "job_id"]

Stage = Literal["staging", "production"]


class HasId(Protocol):
    """Anything with an integer `id`: a notebooks.client.Job."""

    @property
    def id(self) -> int: ...


def job_id(job: HasId | int) -> int:
    """A Job handle's id, or the id itself; a job's id travels, never its (possibly stale) local data."""
    return int(job) if isinstance(job, int) else int(job.id)


class AsyncModels:
    """/v1/models over an AsyncCorral's connection."""

    def __init__(self, api: AsyncCorral) -> None:
        self.api = api

    async def _json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        data: dict[str, Any] = (await self.api.request(method, path, **kw)).json()
        return data

    async def create_model(self, name: str, queue: str, description: str = "") -> dict[str, Any]:
        return await self._json("POST", "/v1/models", json={"name": name, "queue": queue, "description": description})

    async def models(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = (await self._json("GET", "/v1/models"))["models"]
        return found

    async def model(self, name: str) -> dict[str, Any]:
        return await self._json("GET", f"/v1/models/{name}")

    async def apply_policy(self, name: str, document: Mapping[str, Any]) -> dict[str, Any]:
        return await self._json("PUT", f"/v1/models/{name}/policy", json={"document": dict(document)})

    async def register_model(
        self, name: str, job: HasId | int, artifact_uri: str, lineage_jobs: Iterable[HasId | int] = ()
    ) -> dict[str, Any]:
        body = {"job_id": job_id(job), "artifact_uri": artifact_uri, "lineage_jobs": [job_id(j) for j in lineage_jobs]}
        return await self._json("POST", f"/v1/models/{name}/versions", json=body)

    async def promote(self, name: str, version: int, stage: Stage = "production") -> dict[str, Any]:
        return await self._json("POST", f"/v1/models/{name}/promotions", json={"version": version, "stage": stage})

    async def approve(self, promotion_id: int) -> dict[str, Any]:
        return await self._json("POST", f"/v1/promotions/{promotion_id}/approve")

    async def rollback(self, name: str, stage: Stage = "production") -> dict[str, Any]:
        return await self._json("POST", f"/v1/models/{name}/rollback", json={"stage": stage})

    async def audit(self, model: str | None = None, verify: bool = False, head: str | None = None) -> dict[str, Any]:
        params: dict[str, str] = {"model": model} if model else {}
        if verify:
            params["verify"] = "true"
        if head is not None:
            params["head"] = head
        return await self._json("GET", "/v1/models/audit", params=params)

    async def manifest(
        self,
        name: str,
        stage: Stage = "production",
        kind: Literal["kserve", "deployment"] = "kserve",
        namespace: str = "default",
        image: str | None = None,
        gpus: int = 1,
    ) -> str:
        params: dict[str, str | int] = {"stage": stage, "kind": kind, "namespace": namespace, "gpus": gpus}
        if image is not None:
            params["image"] = image
        return (await self.api.request("GET", f"/v1/models/{name}/deploy", params=params)).text

    async def roi(self, name: str) -> dict[str, Any]:
        return await self._json("GET", f"/v1/models/{name}/roi")


class Models:
    """The registry, synchronously: `Client.models`. Same methods as AsyncModels, documented here."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.aio = AsyncModels(client.api)

    def __repr__(self) -> str:
        return f"Models(url={self.client.connection.url!r})"

    def _run(self, coro: Any) -> dict[str, Any]:
        data: dict[str, Any] = self.client.run(coro)
        return data

    def create_model(self, name: str, queue: str, description: str = "") -> dict[str, Any]:
        """A new model owned by `queue`'s team: its members register versions, its model owners promote."""
        return self._run(self.aio.create_model(name, queue, description))

    def models(self) -> list[dict[str, Any]]:
        """Every model you may see, with its aliases ({stage: {version, previous, updated_at}})."""
        found: list[dict[str, Any]] = self.client.run(self.aio.models())
        return found

    def model(self, name: str) -> dict[str, Any]:
        """One model: its versions (metrics, lineage, digest), aliases per stage and current policy."""
        return self._run(self.aio.model(name))

    def apply_policy(self, name: str, document: Mapping[str, Any]) -> dict[str, Any]:
        """Replace the model's promotion policy (docs/models.md); a bad one raises CorralError with each problem
        in `.detail`."""
        return self._run(self.aio.apply_policy(name, document))

    def register_model(
        self, name: str, job: HasId | int, artifact_uri: str, lineage_jobs: Iterable[HasId | int] = ()
    ) -> dict[str, Any]:
        """A new version from a completed `job` (a Job or its id): {model, version, digest, lineage}.
        `artifact_uri` is a path in the job's output directory ($CORRAL_OUTPUT_DIR; relative to it, or absolute);
        the metrics the gates check and the code and data digests are what the job wrote there with
        notebooks.outputs.log_metrics and record_lineage, never typed in here."""
        return self._run(self.aio.register_model(name, job, artifact_uri, lineage_jobs))

    def promote(self, name: str, version: int, stage: Stage = "production") -> dict[str, Any]:
        """Ask to promote: {promotion, state: open|promoted|rejected, gates: [{gate, status, evidence}]}.
        "open" waits for approvals from other model owners (approve(promotion))."""
        return self._run(self.aio.promote(name, version, stage))

    def approve(self, promotion_id: int) -> dict[str, Any]:
        """Approve another owner's open promotion; the gates are evaluated again and the answer is promote()'s."""
        return self._run(self.aio.approve(promotion_id))

    def rollback(self, name: str, stage: Stage = "production") -> dict[str, Any]:
        """Put the stage's previous version back: {model, stage, version, previous}."""
        return self._run(self.aio.rollback(name, stage))

    def audit(self, model: str | None = None, verify: bool = False, head: str | None = None) -> dict[str, Any]:
        """The hash-chained history: {entries, head: {seq, hash}, verified: {intact, problems, entries}} (verified
        with verify; `head`, a hash kept earlier, must still be in the chain)."""
        return self._run(self.aio.audit(model, verify, head))

    def manifest(
        self,
        name: str,
        stage: Stage = "production",
        kind: Literal["kserve", "deployment"] = "kserve",
        namespace: str = "default",
        image: str | None = None,
        gpus: int = 1,
    ) -> str:
        """The YAML serving the version at `stage` (a KServe InferenceService or a Deployment), to apply yourself."""
        text: str = self.client.run(self.aio.manifest(name, stage, kind, namespace, image, gpus))
        return text

    def roi(self, name: str) -> dict[str, Any]:
        """GPU-hours spent by each version's lineage jobs, and by the production version's."""
        return self._run(self.aio.roi(name))
