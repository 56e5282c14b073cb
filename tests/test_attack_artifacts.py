"""Issue 21, item 3, artifact paths: a version's artifact is only what the job itself wrote in its output directory,
bounded (bytes, entries, depth), walked and hashed on the hashing pool under its timeout, reached by file descriptor
without following a link. Each hostile request is counted with attack_kit.attempt and must fail.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from notebooks.outputs import tree_digest
from scheduler.registry.artifacts import ArtifactError, Walk, digest, walk
from scheduler.service.api.auth import Role
from scheduler.service.api.errors import Unavailable
from scheduler.service.core import hashing
from tests import attack_kit
from tests.service_kit import ScriptedExecutor, Service, make_service
from tests.test_attack_models import refused, team
from tests.test_models_service import finished_job, output_dir, trained

__all__ = ["team"]  # the fixture, shared with test_attack_models


# ----- 3: artifact paths -----


@pytest.mark.parametrize(
    "uri",
    [
        "/dev/zero",
        "/etc/shadow",
        "/proc/self/environ",
        "file:///etc/passwd",
        "../../../../../../etc/passwd",
        "/",
        "file://otherhost/etc/passwd",
    ],
)
def test_server_files_are_no_artifacts(svc: Service, team: dict[str, TestClient], uri: str) -> None:
    job, _ = trained(svc, team["alice"])
    attack_kit.attempt("3 artifact paths")
    message = refused(team["alice"], job, uri)
    assert "output directory" in message or "only local files" in message


def test_what_leads_out_of_the_output_dir_or_cannot_end_is_refused(
    svc: Service, team: dict[str, TestClient], tmp_path: Path
) -> None:
    alice = team["alice"]
    job, _ = trained(svc, alice)
    out = output_dir(svc, job)
    secret = tmp_path / "secret"
    secret.write_bytes(b"the server's")
    (out / "escape").symlink_to("/etc")
    (out / "zero").symlink_to("/dev/zero")
    (out / "secret-link").symlink_to(secret)
    os.mkfifo(out / "fifo")
    (out / "tree").mkdir()
    os.mkfifo(out / "tree" / "fifo")
    (out / "hard").mkdir()
    os.link(secret, out / "hard" / "copy")  # a hard link to a file outside (same file system)
    other, _ = trained(svc, alice, name="theirs.pt")  # another job of the same team
    cases = {
        "escape/shadow": "output directory",
        "zero": "output directory",
        "secret-link": "output directory",
        "fifo": "a FIFO",
        str(out / "fifo"): "a FIFO",
        "tree": "a FIFO",
        "hard": "hard links",
        str(output_dir(svc, other) / "theirs.pt"): "output directory",
    }
    for uri, words in cases.items():
        attack_kit.attempt("3 artifact paths")
        assert words in refused(alice, job, uri), uri


def test_a_symlink_inside_a_directory_artifact_is_hashed_as_a_link_never_read(
    svc: Service, team: dict[str, TestClient], tmp_path: Path
) -> None:
    alice = team["alice"]
    job, _ = trained(svc, alice)
    tree = output_dir(svc, job) / "tree"
    tree.mkdir()
    (tree / "w.bin").write_bytes(b"w")
    secret = tmp_path / "secret"
    secret.write_bytes(b"one")
    (tree / "peek").symlink_to(secret)
    attack_kit.attempt("3 artifact paths")
    first = alice.post("/v1/models/m/versions", json={"job_id": job, "artifact_uri": "tree"}).json()["digest"]
    secret.write_bytes(b"two")  # were the link followed, the digest would tell the secret's content
    second = alice.post("/v1/models/m/versions", json={"job_id": job, "artifact_uri": "tree"}).json()["digest"]
    assert first == second


def test_a_directory_swapped_for_a_symlink_after_the_walk_is_not_followed(tmp_path: Path) -> None:
    """The job's user races the hash: once sized, `sub` becomes a symlink to a directory outside with a file of the
    same name; hashing opens beneath the output directory with O_NOFOLLOW, so it refuses instead of reading it."""
    out, outside = tmp_path / "output", tmp_path / "outside"
    (out / "tree" / "sub").mkdir(parents=True)
    (out / "tree" / "sub" / "w.bin").write_bytes(b"w")
    outside.mkdir()
    (outside / "w.bin").write_bytes(b"s")
    sized = walk(out / "tree", 100, 10, base=out)
    (out / "tree" / "sub" / "w.bin").unlink()
    (out / "tree" / "sub").rmdir()
    (out / "tree" / "sub").symlink_to(outside)
    attack_kit.attempt("3 artifact paths")
    with pytest.raises(ArtifactError, match="changed since it was sized"):
        digest(sized)


def test_another_teams_job_is_not_a_source(svc: Service, team: dict[str, TestClient]) -> None:
    job, _ = trained(svc, team["alice"])
    bob = team["bob"]
    bob.post("/v1/models", json={"name": "rank", "queue": "ranking"})
    attack_kit.attempt("3 artifact paths")
    r = bob.post("/v1/models/rank/versions", json={"job_id": job, "artifact_uri": "w.pt"})
    assert r.status_code == 422 and "not found" in r.json()["error"]["message"]


def test_artifacts_are_bounded_before_hashing(db_url: str, tmp_path: Path) -> None:
    svc = make_service(db_url, tmp_path, artifact_max_bytes=100, artifact_max_files=3)
    alice = svc.client("alice", Role.MEMBER, "nlp")
    alice.post("/v1/models", json={"name": "m", "queue": "nlp"})
    job, _ = trained(svc, alice, content=b"x" * 101)
    many = output_dir(svc, job) / "many"
    many.mkdir()
    for i in range(4):
        (many / f"{i}").write_bytes(b"1")
    attack_kit.attempt("3 artifact paths", 2)
    assert "artifact_max_bytes" in refused(alice, job, "w.pt")
    assert "artifact_max_files" in refused(alice, job, "many")


class Gate:
    """A hasher that waits until the test opens it: a slow artifact, without real waiting."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()

    def __call__(self, w: Walk) -> str:
        self.entered.set()
        self.open.wait(10)
        return digest(w)


@pytest.fixture
def gate(svc: Service) -> Iterator[Gate]:
    g = Gate()
    pool = hashing.HashPool(workers=1, waiting=0, timeout_s=0.05, hash_fn=g)
    svc.core.hashes = pool
    yield g
    g.open.set()
    pool.close()


def test_a_slow_artifact_times_out_and_a_full_pool_refuses_at_once(
    svc: Service, team: dict[str, TestClient], gate: Gate
) -> None:
    alice = team["alice"]
    job, _ = trained(svc, alice)
    attack_kit.attempt("3 artifact paths")
    message = refused(alice, job, "w.pt", 503)
    assert "artifact_hash_timeout_s" in message and "nothing was changed" in message
    assert gate.entered.is_set()
    attack_kit.attempt("3 artifact paths")
    assert "artifact_hash_workers" in refused(alice, job, "w.pt", 503)  # the slow hash still holds the one slot
    assert svc.admin.get("/healthz").status_code == 200
    assert alice.get("/v1/models").status_code == 200
    assert alice.get("/v1/models/m").json()["versions"] == []
    gate.open.set()
    deadline = time.monotonic() + 10
    while True:  # the slot comes back once the slow hash really ends
        r = alice.post("/v1/models/m/versions", json={"job_id": job, "artifact_uri": "w.pt"})
        if r.status_code == 201 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert r.status_code == 201, r.text


def test_an_executor_that_keeps_no_outputs_registers_nothing(db_url: str, tmp_path: Path) -> None:
    class Remote:
        """The scripted executor, minus output_dir: a backend whose outputs the service cannot read."""

        def __init__(self) -> None:
            self.inner = ScriptedExecutor()

        def __getattr__(self, name: str) -> Any:
            if name == "output_dir":
                raise AttributeError(name)
            return getattr(self.inner, name)

    svc = make_service(db_url, tmp_path, executor=Remote())
    alice = svc.client("alice", Role.MEMBER, "nlp")
    alice.post("/v1/models", json={"name": "m", "queue": "nlp"})
    jid = alice.post("/v1/jobs", json={"queue": "nlp", "gpus": 1, "command": ["train"]}).json()["id"]
    svc.tick()
    svc.executor.inner.exit(jid, 0)
    svc.tick()
    attack_kit.attempt("3 artifact paths")
    message = refused(alice, jid, str(tmp_path / "c.db"))
    assert "keeps no job outputs" in message and "Kubernetes or Ray" in message


def test_directories_count_against_the_file_bound(db_url: str, tmp_path: Path) -> None:
    """Empty directories hold no bytes and no files, yet a million of them keep a walk busy: they count."""
    svc = make_service(db_url, tmp_path, artifact_max_files=3)
    alice = svc.client("alice", Role.MEMBER, "nlp")
    alice.post("/v1/models", json={"name": "m", "queue": "nlp"})
    job, _ = trained(svc, alice)
    for i in range(5):
        (output_dir(svc, job) / "dirs" / f"d{i}").mkdir(parents=True)
    attack_kit.attempt("3 artifact paths")
    assert "artifact_max_files" in refused(alice, job, "dirs")


def test_nesting_is_bounded(tmp_path: Path) -> None:
    deep = tmp_path / "tree"
    (deep / "a" / "b" / "c" / "d" / "e").mkdir(parents=True)
    attack_kit.attempt("3 artifact paths")
    with pytest.raises(ArtifactError, match="nests directories more than 3 deep"):
        walk(deep, 100, 100, max_depth=3)
    assert walk(deep, 100, 100).entries == ()  # the default depth allows it: directories alone hash to nothing


def test_a_directory_swapped_for_a_symlink_during_the_walk_names_nothing_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's user swaps `sub` for a symlink to a directory it may not list, between the walk seeing `sub` and
    listing it: the walk lists the directory it opened (by fd, without following), so nothing from the other
    directory is read or named, not even in an error message."""
    out, private = tmp_path / "output", tmp_path / "root-only"
    (out / "tree" / "sub").mkdir(parents=True)
    (out / "tree" / "sub" / "w.bin").write_bytes(b"w")
    private.mkdir()
    os.mkfifo(private / "secret-name-of-a-root-only-file")
    real_scandir = os.scandir
    calls = []

    def racing(where: Any = ".") -> Any:
        calls.append(where)
        if len(calls) == 2:  # the walk has seen `sub` and is about to list it
            (out / "tree" / "sub").rename(out / "tree" / "moved")
            (out / "tree" / "sub").symlink_to(private)
        return real_scandir(where)

    monkeypatch.setattr(os, "scandir", racing)
    attack_kit.attempt("3 artifact paths")
    try:
        sized = walk(out / "tree", 100, 10, base=out)
    except (ArtifactError, OSError) as e:
        assert "secret-name" not in str(e) and str(private) not in str(e)
    else:
        assert [e.rel for e in sized.entries] == ["sub/w.bin"]  # what `sub` held when it was opened


def test_the_walk_runs_on_the_hashing_pool(
    svc: Service, team: dict[str, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No request thread walks a tree: the walk is inside the pool's job, so its timeout covers it."""
    where: list[str] = []
    real = walk

    def watched(*args: Any, **kwargs: Any) -> Walk:
        where.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr("scheduler.service.core.registry.walk", watched)
    job, _ = trained(svc, team["alice"])
    r = team["alice"].post("/v1/models/m/versions", json={"job_id": job, "artifact_uri": "w.pt"})
    assert r.status_code == 201, r.text
    assert where and all(name.startswith("corral-hash") for name in where), where


def test_a_slow_walk_times_out() -> None:
    release = threading.Event()

    def slow_walk() -> Walk:
        release.wait(10)
        raise ArtifactError("never sized")

    pool = hashing.HashPool(workers=1, waiting=0, timeout_s=0.05)
    attack_kit.attempt("3 artifact paths")
    try:
        with pytest.raises(Unavailable, match="walking and hashing a tree took longer"):
            pool.digest(slow_walk, "a tree")
    finally:
        release.set()
        pool.close()


def test_the_sdk_and_the_service_digest_trees_with_the_same_code(tmp_path: Path) -> None:
    tree = tmp_path / "code"
    (tree / "pkg" / ".git").mkdir(parents=True)
    (tree / "pkg" / "m.py").write_text("x = 1\n")
    (tree / "pkg" / ".git" / "HEAD").write_text("ref\n")
    (tree / "link").symlink_to("pkg/m.py")
    assert tree_digest(tree) == digest(walk(tree, 1 << 20, 100))
    assert tree_digest(tree, skip={".git"}) == digest(walk(tree, 1 << 20, 100, skip={".git"})) != tree_digest(tree)


def test_records_and_artifacts_refuse_hard_links_alike(
    svc: Service, team: dict[str, TestClient], tmp_path: Path
) -> None:
    """metrics.json is read by the same code as an artifact's files (artifacts.open_beneath): one rule, one
    message."""
    alice = team["alice"]
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"accuracy": 0.999}')
    job = finished_job(svc, alice, outputs={"w.pt": b"w"})
    os.link(elsewhere, output_dir(svc, job) / "metrics.json")
    os.link(elsewhere, output_dir(svc, job) / "linked.bin")
    attack_kit.attempt("3 artifact paths", 2)
    record = refused(alice, job, "w.pt")
    (output_dir(svc, job) / "metrics.json").unlink()
    artifact = refused(alice, job, "linked.bin")
    assert "hard links: a job's outputs must be its own copies" in record
    assert "hard links: a job's outputs must be its own copies" in artifact
