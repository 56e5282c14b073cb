"""The Corral image built by scripts/image (an OCI archive, cached under ~/.cache/corral/image-<version>-<hash>/).

How the image is started: with podman from Debian, its storage in a temporary directory, running the OCI archive
itself (`podman run oci-archive:...`) with runc as the OCI runtime, host network, a read-only root file system (as
the chart's readOnlyRootFilesystem) and a tmpfs on /tmp. crun (podman's default) cannot run containers on this
project's machines: their cgroups are in hybrid mode with a controller on the v2 hierarchy, which crun refuses;
runc accepts it. Where podman or runc is missing, the tests fall back to a chroot into the unpacked root file system
as uid 10001 (chroot --userspec, in a private mount namespace for the data directory), and say so in their output.
scripts/test installs podman and runc, so CI uses the containers.

Skipped without a built image (CORRAL_IMAGE=<dir> or `scripts/image --check`); failed instead when
CORRAL_REQUIRE_IMAGE=1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration  # the built image, run with podman

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SCRIPT = ROOT / "scripts" / "image"
UID = 10001


def _version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert m
    return m.group(1)


VERSION = _version()


def _image_dir() -> Path:
    given = os.environ.get("CORRAL_IMAGE")
    why = ""
    if given:
        d: Path | None = Path(given)
    else:
        out = subprocess.run([str(IMAGE_SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
        d = Path(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
        why = out.stderr.strip()
    if d is not None and (d / f"corral-{VERSION}.oci.tar").is_file() and (d / "rootfs").is_dir():
        return d
    msg = why or f"no Corral image in {d} (CORRAL_IMAGE): run scripts/image"
    if os.environ.get("CORRAL_REQUIRE_IMAGE") == "1":
        pytest.fail(f"{msg} (CORRAL_REQUIRE_IMAGE=1)", pytrace=False)
    pytest.skip(msg)


@dataclass
class Image:
    dir: Path
    archive: Path
    rootfs: Path
    index: dict[str, Any]
    manifest: dict[str, Any]
    config: dict[str, Any]


@pytest.fixture(scope="module")
def image() -> Image:
    d = _image_dir()
    archive = d / f"corral-{VERSION}.oci.tar"
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> bytes:
            algo, _, hexdigest = digest.partition(":")
            f = tar.extractfile(f"blobs/{algo}/{hexdigest}")
            assert f is not None, digest
            data = f.read()
            assert hashlib.sha256(data).hexdigest() == hexdigest, f"{digest}: content does not match its digest"
            return data

        f = tar.extractfile("oci-layout")
        assert f is not None
        assert json.load(f)["imageLayoutVersion"] == "1.0.0"
        f = tar.extractfile("index.json")
        assert f is not None
        index = json.load(f)
        assert len(index["manifests"]) == 1
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        for layer in manifest["layers"]:
            blob(layer["digest"])
    return Image(d, archive, d / "rootfs", index, manifest, config)


def test_oci_archive_config(image: Image) -> None:
    """A valid OCI layout (digests checked) whose one manifest is tagged with the version; the config runs
    `corral serve` as the non-root user 10001 with corral on PATH."""
    desc = image.index["manifests"][0]
    assert desc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == VERSION
    assert image.manifest["schemaVersion"] == 2
    assert image.manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert image.manifest["layers"]
    assert all(la["mediaType"].startswith("application/vnd.oci.image.layer.v1.tar") for la in image.manifest["layers"])
    assert image.config["os"] == "linux" and image.config["architecture"] == "amd64"
    c = image.config["config"]
    assert c["User"] == f"{UID}:{UID}"
    assert c["Entrypoint"] == ["corral"]
    assert c["Cmd"] == ["serve", "--host", "0.0.0.0"]
    assert c["WorkingDir"] == "/var/lib/corral"
    env = dict(e.split("=", 1) for e in c["Env"])
    assert env["PATH"].split(":")[0] == "/opt/corral/bin"
    assert env["CORRAL_DATA_DIR"] == "/var/lib/corral"
    assert c["Labels"]["org.opencontainers.image.version"] == VERSION
    assert "8265/tcp" in c["ExposedPorts"]


def test_rootfs_user_and_no_compiler(image: Image) -> None:
    """The user corral is uid/gid 10001 and owns its data dir; no C compiler, assembler or linker is installed."""
    r = image.rootfs
    passwd = {line.split(":")[0]: line.split(":") for line in (r / "etc/passwd").read_text().splitlines()}
    assert passwd["corral"][2:4] == [str(UID), str(UID)]
    assert passwd["corral"][5] == "/var/lib/corral"
    st = (r / "var/lib/corral").stat()
    assert (st.st_uid, st.st_gid) == (UID, UID)
    assert os.readlink(r / "usr/local/bin/corral") == "/opt/corral/bin/corral"
    assert (r / "opt/corral/bin/corral").is_file()
    found = []
    for d in ("usr/bin", "bin", "usr/local/bin", "usr/sbin", "opt/corral/bin"):
        for p in (r / d).iterdir() if (r / d).is_dir() else ():
            if re.fullmatch(
                r"(.*-)?(gcc|g\+\+|cc|c\+\+|cpp|clang|clang\+\+|tcc|as|ld|ld\.bfd|ld\.gold)(-[0-9.]+)?", p.name
            ):
                found.append(f"/{d}/{p.name}")
    assert found == [], f"compilers or linkers in the image: {found}"
    status = (r / "var/lib/dpkg/status").read_text()
    packages = set(re.findall(r"^Package: (\S+)", status, re.M))
    assert "python3" in packages
    assert not packages & {"gcc", "gcc-12", "cpp", "cpp-12", "binutils", "build-essential", "clang", "libc6-dev"}
    assert not (r / "opt/corral/bin/pip").exists()


def _containerfile() -> dict[str, list[str]]:
    """Instructions of the Containerfile's final stage: name -> arguments (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Containerfile").read_text())
    stages: list[dict[str, list[str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "FROM":
            stages.append({})
        stages[-1].setdefault(word.upper(), []).append(rest.strip())
    return stages[-1]


def test_containerfile_in_step_with_the_image(image: Image) -> None:
    """The Containerfile (for builders with a registry) declares what scripts/image's config says."""
    cf = _containerfile()
    c = image.config["config"]
    assert cf["USER"] == [c["User"]]
    assert cf["WORKDIR"] == [c["WorkingDir"]]
    assert [json.loads(cf["ENTRYPOINT"][0])] == [c["Entrypoint"]]
    assert [json.loads(cf["CMD"][0])] == [c["Cmd"]]
    assert cf["EXPOSE"] == list(c["ExposedPorts"])
    declared = dict(kv.split("=", 1) for kv in shlex.split(" ".join(cf["ENV"])))
    assert declared == dict(e.split("=", 1) for e in c["Env"])
    labels = dict(kv.split("=", 1) for kv in shlex.split(" ".join(cf["LABEL"])))
    assert labels == c["Labels"]


def test_chart_default_image_is_this_one(image: Image) -> None:
    """The chart's default image is repository corral tagged with its appVersion, the version this image has."""
    chart = yaml.safe_load((ROOT / "charts/corral/Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts/corral/values.yaml").read_text())
    assert values["image"]["repository"] == "corral"
    assert values["image"]["tag"] in ("", chart["appVersion"])
    assert chart["appVersion"] == VERSION == image.config["config"]["Labels"]["org.opencontainers.image.version"]


# --- running the image -------------------------------------------------------------------------------------


class Runner:
    """Runs commands in the image: podman (runc) on the OCI archive, or a chroot of the unpacked root fs."""

    def __init__(self, image: Image, work: Path) -> None:
        self.image, self.work = image, work
        self.podman = shutil.which("podman") is not None and shutil.which("runc") is not None
        self.how = "podman run (runc) of the OCI archive" if self.podman else "chroot into the unpacked rootfs"
        self.runroot = Path(tempfile.mkdtemp(prefix="corral-image-", dir="/tmp"))  # podman: at most 50 characters
        self.base = [
            "podman",
            "--root",
            str(work / "storage"),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "overlay",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            "--runtime",
            "runc",
        ]
        self.ref = f"oci-archive:{image.archive}"
        self.env = dict(e.split("=", 1) for e in image.config["config"]["Env"])

    def argv(self, args: list[str], env: dict[str, str], data_dir: Path | None, name: str | None = None) -> list[str]:
        if self.podman:
            # podman's default limits (above this machine's hard limits) cannot be set here: ask for modest ones.
            nofile, nproc = (
                min(resource.getrlimit(lim)[1] % (1 << 62), 4096)
                for lim in (resource.RLIMIT_NOFILE, resource.RLIMIT_NPROC)
            )
            cmd = [
                *self.base,
                "run",
                "--rm",
                "--network",
                "host",
                "--read-only",
                "--tmpfs",
                "/tmp",
                "--ulimit",
                f"nofile={nofile}:{nofile}",
                "--ulimit",
                f"nproc={nproc}:{nproc}",
            ]
            if name:
                cmd += ["--name", name]
            if data_dir is not None:
                cmd += ["-v", f"{data_dir}:/var/lib/corral"]
            for k, v in env.items():
                cmd += ["-e", f"{k}={v}"]
            return [*cmd, self.ref, *args]
        # The image's entrypoint and environment, by hand.
        r = self.image.rootfs
        inner = [
            "chroot",
            f"--userspec={UID}:{UID}",
            str(r),
            "/usr/bin/env",
            "-i",
            *(f"{k}={v}" for k, v in {**self.env, **env}.items()),
            "sh",
            "-c",
            'cd "$HOME" && exec "$@"',
            "-",
            "corral",
            *args,
        ]
        mount = (
            f"mount --bind {shlex.quote(str(data_dir))} {shlex.quote(str(r / 'var/lib/corral'))} && "
            if data_dir is not None
            else ""
        )
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mount}exec "$@"', "-", *inner]

    def close(self) -> None:
        if self.podman:
            subprocess.run([*self.base, "rm", "--all", "--force"], capture_output=True, timeout=60)
            # Faster than `podman system reset`: unmount whatever podman left mounted there, then delete.
            for d in (self.work, self.runroot):
                mounts = [
                    ln.split()[1]
                    for ln in Path("/proc/self/mounts").read_text().splitlines()
                    if ln.split()[1].startswith(f"{d}/")
                ]
                for m in sorted(mounts, key=len, reverse=True):
                    subprocess.run(["umount", "--lazy", m], capture_output=True, timeout=30)
            shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)


@pytest.fixture(scope="module")
def runner(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    if os.geteuid() != 0:
        msg = "running the image needs root here (podman's storage, or a chroot)"
        if os.environ.get("CORRAL_REQUIRE_IMAGE") == "1":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    r = Runner(image, tmp_path_factory.mktemp("image-run"))
    print(f"running the image by {r.how}")
    yield r
    r.close()


def test_corral_on_path_in_the_image(runner: Runner) -> None:
    """The entry point `corral` (on PATH) runs in the image as uid 10001."""
    out = subprocess.run(runner.argv(["--help"], {}, None), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"{runner.how}: {out.stdout}\n{out.stderr}"
    assert "serve" in out.stdout


def test_corral_version_in_the_image(runner: Runner) -> None:
    """`corral --version` in the image prints the version the image and the chart are tagged with."""
    out = subprocess.run(runner.argv(["--version"], {}, None), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"{runner.how}: {out.stdout}\n{out.stderr}"
    assert VERSION in out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_readyz(runner: Runner, tmp_path: Path) -> None:
    """`corral serve` in the image (read-only root fs, SQLite in a temporary data dir owned by 10001, settings as
    CORRAL_* variables) answers /readyz 200 on 127.0.0.1; its files belong to uid 10001."""
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, UID, UID)
    port = _free_port()
    env = {"CORRAL_HOST": "127.0.0.1", "CORRAL_PORT": str(port), "CORRAL_DATA_DIR": "/var/lib/corral"}
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        runner.argv(["serve"], env, data, name=f"corral-test-{port}"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        status, body = 0, b""
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                    status, body = resp.status, resp.read()
                if status == 200:
                    break
            time.sleep(0.5)
        log.seek(0)
        assert status == 200, f"{runner.how}: no /readyz 200 (exit {proc.poll()}):\n{log.read()[-3000:]}"
        assert json.loads(body)["ready"] is True
        assert (data / "corral.db").stat().st_uid == UID
    finally:
        if runner.podman:
            subprocess.run(
                [*runner.base, "stop", "--time", "10", f"corral-test-{port}"], capture_output=True, timeout=60
            )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
        log.close()
