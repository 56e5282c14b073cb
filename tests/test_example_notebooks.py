"""The example notebooks (notebooks/examples/*.ipynb) run top to bottom, in a real kernel, against a live Corral."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
from nbclient import NotebookClient

from tests.marks import starts_processes
from tests.test_sdk import LiveCorral, start_corral

EXAMPLES = Path(__file__).resolve().parent.parent / "notebooks" / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


TEAMS = ("nlp", "vision")


@pytest.fixture(scope="module")
@starts_processes
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCorral]:
    """A live Corral with two teams' queues, and the notebooks run by a member of one of them, not the admin:
    CORRAL_TOKEN is the member's, CORRAL_QUEUE the team's queue, as a Corral notebook sandbox sets it."""
    for corral in start_corral(tmp_path_factory.mktemp("corral")):
        admin = httpx.Client(base_url=corral.url, headers={"Authorization": f"Bearer {corral.token}"})
        pool = admin.get("/v1/pools").json()["pools"][0]["name"]
        tree = {"queues": [{"name": "default", "quota": {pool: 0}}] + [{"name": t, "quota": {pool: 1}} for t in TEAMS]}
        assert admin.post("/v1/queues/apply", json={"document": tree}).status_code == 200
        r = admin.post("/v1/tokens", json={"user": "nia", "role": "member", "scope": "vision"})
        assert r.status_code == 201, r.text
        yield LiveCorral(
            corral.url, r.json()["token"], {**corral.env, "CORRAL_TOKEN": r.json()["token"], "CORRAL_QUEUE": "vision"}
        )


def run(path: Path, live: LiveCorral, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    """Execute a notebook with this interpreter's ipykernel (the `python3` kernel runs sys.executable),
    in `workdir`, with the environment that finds the live Corral; a cell error fails the test."""
    monkeypatch.delenv("CORRAL_QUEUE", raising=False)
    for k, v in live.env.items():
        # The kernel inherits this process's environment: set what a user's shell would have set.
        if k.startswith("CORRAL_") or k == "PATH":
            monkeypatch.setenv(k, v)
    nb: nbformat.NotebookNode = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    NotebookClient(nb, kernel_name="python3", timeout=60, resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    """Everything the cells showed: streams, text results and HTML."""
    out: list[str] = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            data: dict[str, Any] = o.get("data", {})
            out.append(o.get("text", "") + data.get("text/plain", "") + data.get("text/html", ""))
    return "\n".join(out)


def test_every_example_is_stored_without_outputs() -> None:
    assert [p.name for p in NOTEBOOKS] == ["01_train_script.ipynb", "02_function_sweep.ipynb", "03_cell_magic.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
        nbformat.validate(nb)
        assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")


def test_train_script_notebook(live: LiveCorral, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shown = text_of(run(EXAMPLES / "01_train_script.ipynb", live, tmp_path, monkeypatch))
    assert "epoch 5/5 loss=0.0778" in shown and "final loss 0.0778" in shown
    assert "GPUs: 0" in shown or "GPUs: 1" in shown
    assert "completed" in shown and "tiny-train" in shown  # the job's card
    assert (tmp_path / "train.py").exists()
    mine = httpx.get(
        f"{live.url}/v1/jobs", params={"state": "completed"}, headers={"Authorization": f"Bearer {live.token}"}
    ).json()["jobs"]
    assert {(j["queue"], j["owner"]) for j in mine if j["name"] == "tiny-train"} == {("vision", "nia")}


def test_without_corral_queue_the_sdk_takes_the_members_one_queue(
    live: LiveCorral, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside a sandbox (no CORRAL_QUEUE) the SDK submits to the one queue the member may see, its team's."""
    shown = text_of(
        run(
            EXAMPLES / "01_train_script.ipynb",
            LiveCorral(live.url, live.token, {k: v for k, v in live.env.items() if k != "CORRAL_QUEUE"}),
            tmp_path,
            monkeypatch,
        )
    )
    assert "final loss 0.0778" in shown and "vision" in shown


def test_function_sweep_notebook(live: LiveCorral, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shown = text_of(run(EXAMPLES / "02_function_sweep.ipynb", live, tmp_path, monkeypatch))
    assert "best learning rate: 0.4" in shown
    assert "lr=0.01 epoch=0" in shown  # one run's full log


def test_cell_magic_notebook(live: LiveCorral, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shown = text_of(run(EXAMPLES / "03_cell_magic.ipynb", live, tmp_path, monkeypatch))
    assert "sum of squares: 332833500" in shown and "running on GPUs" in shown
    assert "magic-demo" in shown and "completed" in shown


def test_examples_do_not_hardcode_a_server() -> None:
    for path in NOTEBOOKS:
        text = path.read_text()
        # URL and token come from the environment (CORRAL_URL, CORRAL_TOKEN), never from the notebook.
        assert "127.0.0.1" not in text and "localhost" not in text and "token=" not in text
        # Nor the queue: the SDK's default (CORRAL_QUEUE, else the user's one queue) works for every team member.
        assert "queue=" not in text and "--queue" not in text and "-q " not in text
