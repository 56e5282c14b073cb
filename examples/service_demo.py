"""The README demo: Corral's embedded service (SQLite, local executor) on 4 declared GPUs, driven by the CLI.

A newcomer sees GPUs assigned to real processes, a job waiting with its reason, a preemption that gives a
team its guarantee back (the victim saves a checkpoint on SIGTERM and is requeued), and the usage report.
Everything lives in a temporary directory and the server stops at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TRAIN = """
import os, signal, sys, time
name, seconds = sys.argv[1], float(sys.argv[2])
def checkpoint(*_):
    print(f"{name}: SIGTERM received, checkpoint saved at step {step}", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, checkpoint)
print(f"{name}: training on GPUs {os.environ['CUDA_VISIBLE_DEVICES']} (queue {os.environ['CORRAL_QUEUE']})", flush=True)
step, end = 0, time.time() + seconds
while time.time() < end:
    step += 1
    time.sleep(0.1)
print(f"{name}: done after {step} steps", flush=True)
"""


def corral_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "corral"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "scheduler.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Demo:
    def __init__(self, home: Path, port: int):
        self.home, self.url = home, f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "CORRAL_DATA_DIR": str(home / "data"),
            "CORRAL_URL": self.url,
            "CORRAL_GRACE_S": "5",
            "CORRAL_TICK_S": "0.2",
            "COLUMNS": "130",
            # Every demo job is the admin's and runs this checkout's Python, which other accounts may not
            # reach (under /root, say): run them as the demo's own user (docs/service.md, Trust model).
            "CORRAL_RUN_AS": "service",
        }
        self.env.pop("CORRAL_DATABASE_URL", None)
        self.script = home / "train.py"
        self.script.write_text(TRAIN)

    def say(self, text: str) -> None:
        print(f"\n\033[1m# {text}\033[0m", flush=True)

    def corral(self, *args: str, quiet: bool = False) -> str:
        if not quiet:
            print(f"$ corral {' '.join(args)}", flush=True)
        out = subprocess.run(corral_cmd() + list(args), env=self.env, capture_output=True, text=True)
        text = out.stdout + out.stderr
        if not quiet:
            print(text.rstrip(), flush=True)
        if out.returncode != 0:
            raise SystemExit(f"corral {args[0]} failed")
        return out.stdout.strip()

    def train(self, queue: str, gpus: int, name: str, seconds: float, *extra: str) -> str:
        return self.corral(
            "submit",
            "--queue",
            queue,
            "--gpus",
            str(gpus),
            "--name",
            name,
            *extra,
            "--",
            sys.executable,
            str(self.script),
            name,
            str(seconds),
        )

    def state(self, job: str) -> str:
        out = self.corral("ps", "--all", "-o", "json", quiet=True)
        return next(j["state"] for j in json.loads(out)["jobs"] if str(j["id"]) == job)

    def wait(self, job: str, *states: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while self.state(job) not in states:
            if time.monotonic() > end:
                raise SystemExit(f"job {job} did not reach {states}")
            time.sleep(0.3)


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="corral-demo-"))
    port = free_port()
    demo = Demo(home, port)
    demo.say("Start the embedded service: SQLite in a temporary directory, 4 declared GPUs, the demo queues")
    print(f"$ corral serve --demo --gpus 4 --gpu-model virtual --port {port}", flush=True)
    server = subprocess.Popen(
        corral_cmd() + ["serve", "--demo", "--gpus", "4", "--gpu-model", "virtual", "--port", str(port)], env=demo.env
    )
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{demo.url}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        demo.say("Two departments share the GPUs; ranking may borrow up to 4, ads has no guarantee")
        demo.corral("queue", "ls")

        demo.say("ranking starts a 4-GPU training job: 2 within its quota, 2 borrowed from research")
        big = demo.train("ranking", 4, "ranking-train", 60, "--label", "team=ranking")
        demo.wait(big, "running")
        time.sleep(1)
        demo.corral("top")
        demo.corral("logs", big)

        demo.say("nlp wants its guaranteed GPU back: the borrower is preempted (SIGTERM, checkpoint, requeued)")
        nlp = demo.train("nlp", 1, "nlp-finetune", 20)  # long enough that ads starts while it runs
        demo.wait(nlp, "running")
        demo.corral("logs", big, "--attempt", "1")

        demo.say("ranking's job waits for 4 GPUs again; explain says which rule holds it and why it was preempted")
        demo.corral("explain", big)

        demo.say("Meanwhile ads (no quota) borrows GPUs nobody uses; they are preemptible")
        ads = demo.train("ads", 2, "ads-eval", 3)
        demo.wait(ads, "running", "completed")
        demo.corral("ps")

        demo.say("When the others finish, ranking's job starts again (attempt 2) and picks up its checkpoint")
        # On a slow machine nlp's 5-second job can end before ads is even submitted: ranking's job then starts again
        # at once (4 GPUs free) and may have finished by now; both are the scheduler doing its job.
        demo.wait(big, "running", "completed", timeout=90)
        demo.corral("top")
        if demo.state(big) == "running":
            demo.corral("cancel", big)
            demo.wait(big, "cancelled")
        demo.corral("ps", "--all")
        demo.corral("usage")
        print(f"\nEverything above is in {home} (data/corral.db, data/runs/<job>/<attempt>/). The server stops now.")
    finally:
        server.terminate()
        server.wait(timeout=20)
        if os.environ.get("CORRAL_DEMO_KEEP") is None:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
