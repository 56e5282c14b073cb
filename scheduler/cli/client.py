"""How the `corral` service commands reach the API: connection settings, an httpx client, errors, output.

The URL comes from --url / CORRAL_URL; the token from --token / CORRAL_TOKEN, else from the admin-token file
that `corral serve` leaves in its data directory (so the CLI works on the server's machine without set-up).
Tests replace `make_http_client` with a factory that returns a FastAPI TestClient (an httpx.Client).
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from scheduler.service.api.models import History
from scheduler.service.core.settings import ADMIN_TOKEN_FILE, default_data_dir

DEFAULT_URL = "http://127.0.0.1:8265"
TIMEOUT = httpx.Timeout(30.0, read=60.0)  # read is long: a cycle under load can hold the lock a while

Url = Annotated[str, typer.Option("--url", envvar="CORRAL_URL", help="API base URL.", show_envvar=True)]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="CORRAL_TOKEN",
        show_envvar=True,
        show_default=False,
        help="API token (default: <data dir>/admin-token, written by `corral serve`).",
    ),
]


class Output(enum.StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


Fmt = Annotated[Output, typer.Option("-o", "--output", help="table, or the API's data as json or yaml.")]


def data_dir() -> Path:
    """Where `corral serve` keeps its files on this machine: CORRAL_DATA_DIR, else the user's data dir."""
    env = os.environ.get("CORRAL_DATA_DIR")
    return Path(env) if env else default_data_dir()


def resolve_token(token: str | None) -> tuple[str | None, str]:
    """The token to send and where it came from; (None, why) when there is none (the API then says 401)."""
    if token:
        return token, "--token or CORRAL_TOKEN"
    path = data_dir() / ADMIN_TOKEN_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None, f"no --token, no CORRAL_TOKEN and no {path}"
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror}"
    return (text or None), str(path)


def make_http_client(url: str, token: str | None) -> httpx.Client:
    """The HTTP client every command uses. Module-level on purpose: tests swap it for a TestClient."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT)


class ApiError(Exception):
    """An answer of 4xx/5xx (or no answer); str() is the one line the user sees."""


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _error_line(r: httpx.Response) -> str:
    """{"error": {"code", "message", "where", "detail"}} as one line; anything else by its status."""
    try:
        body = r.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or "message" not in err:
        text = r.text.strip().splitlines()[0][:200] if r.text.strip() else r.reason_phrase
        return f"HTTP {r.status_code}: {text}"
    where = f" (at {err['where']})" if err.get("where") and err["where"] not in err["message"] else ""
    line = f"{err['message']}{where} [{err.get('code', r.status_code)}]"
    detail = err.get("detail")
    # Queue-tree problems come as a list; the message may only summarise them, so name each one.
    if isinstance(detail, list) and detail and all(isinstance(d, dict) and "problem" in d for d in detail):
        missing = [f"{d.get('where')}: {d['problem']}" for d in detail if str(d["problem"]) not in err["message"]]
        if missing:
            line += ": " + "; ".join(missing)
    return line


@dataclass
class Api:
    """The /v1 API over one client. Methods answer the decoded JSON, or raise ApiError."""

    client: httpx.Client
    url: str
    token_source: str
    has_token: bool

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.client.request(method, path, **kw)
        except httpx.ConnectError as e:
            raise ApiError(
                f"cannot reach the Corral API at {self.url} ({e}); is it running? "
                "Start it with `corral serve`, or point --url / CORRAL_URL at it"
            ) from e
        except httpx.TimeoutException as e:
            raise ApiError(f"the Corral API at {self.url} did not answer in time ({e.__class__.__name__})") from e
        self.check(r)
        return r

    def check(self, r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        line = _error_line(r)
        if r.status_code == 401 and not self.has_token:
            line += f"; {self.token_source}"
        raise ApiError(line)

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean).json()

    def post(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        return self.request("POST", path, json=dict(body) if body is not None else None).json()

    @contextmanager
    def stream(self, path: str, **params: Any) -> Iterator[Iterator[bytes]]:
        """The answer's body as it arrives (log follow): no read timeout, since a quiet job sends nothing."""
        clean = {k: v for k, v in params.items() if v is not None}
        try:
            with self.client.stream("GET", path, params=clean, timeout=httpx.Timeout(30.0, read=None)) as r:
                if r.status_code >= 400:
                    r.read()
                    self.check(r)
                yield r.iter_bytes()
        except httpx.ConnectError as e:
            raise ApiError(
                f"cannot reach the Corral API at {self.url} ({e}); is it running? Start it with `corral serve`"
            ) from e


@contextmanager
def api(url: str, token: str | None) -> Iterator[Api]:
    """An Api for one command; an ApiError inside becomes one line on stderr and exit status 1."""
    secret, source = resolve_token(token)
    client = make_http_client(url, secret)
    try:
        # Not `with client`: entering a TestClient would also run the app's lifespan, which tests do not want.
        yield Api(client, url.rstrip("/"), source, secret is not None)
    except ApiError as e:
        fail(str(e))
    finally:
        client.close()


# ----- output -----


def console() -> Console:
    """A console per command, so COLUMNS (and a test runner's stdout) are read when the command runs."""
    return Console(highlight=False, soft_wrap=False)


def cells(*values: str | Text) -> list[Text]:
    """Table cells as plain text: names and messages come from users, and a `[red]` in a job name must show
    as typed, not as markup."""
    return [v if isinstance(v, Text) else Text(v) for v in values]


def emit(data: Any, fmt: Output) -> None:
    """json or yaml of the API's data (for table output, callers draw their own)."""
    if fmt is Output.JSON:
        typer.echo(json.dumps(data, indent=2, sort_keys=False))
    else:
        typer.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip("\n"))


def when(t: float | None) -> str:
    """Epoch seconds as local time, to the second; '-' for never."""
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def numbers(n: Mapping[str, Any] | None) -> str:
    return " ".join(f"{k}={_num(v)}" for k, v in (n or {}).items())


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: float) -> float:
    """Epoch seconds from '1717000000', an ISO date or datetime (local time unless it names a zone), 'now',
    or a span back from now: '90s', '30m', '24h', '7d', '2w'."""
    s = text.strip().lower()
    if s == "now":
        return now
    try:
        return float(s)
    except ValueError:
        pass
    m = _RELATIVE.match(s)
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        parsed = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a time: give epoch seconds, an ISO date (2024-05-01, "
            "2024-05-01T09:30) or a span back from now (24h, 7d)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()  # naive means the user's local time
    return parsed.timestamp()


def key_values(items: list[str] | None, what: str) -> dict[str, str]:
    """K=V options (--env, --label) as a dict; a malformed one is a usage error (exit 2)."""
    out: dict[str, str] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        out[k] = v
    return out


def read_document(path: Path) -> Any:
    """A YAML or JSON file (JSON is YAML); unreadable or malformed input exits 2 with the file named."""
    try:
        text = path.read_text()
    except OSError as e:
        fail(f"{path}: cannot read the file: {e.strerror}", 2)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        fail(f"{path}{where}: not valid YAML or JSON: {getattr(e, 'problem', None) or e}", 2)


def note(message: str) -> None:
    """A note for the person at the terminal that must not land in a pipe (stdout is for data)."""
    typer.echo(message, err=True)


def print_history(data: Mapping[str, Any], output: Output, counted: str) -> None:
    """The versions of a document applied like the queue tree: when, who, how many `counted` items, why."""
    if output is not Output.TABLE:
        emit(data, output)
        return
    table = Table("VERSION", "AT", "AUTHOR", counted.upper(), "COMMENT", box=None, pad_edge=False)
    for v in History.model_validate(data).versions:
        table.add_row(
            *cells(str(v.version), when(v.created_at), v.author, str(len(v.document.get(counted, []))), v.comment or "")
        )
    console().print(table)


def print_rollback(
    done: Mapping[str, Any], version: int, output: Output, show_diff: Callable[[list[dict[str, Any]]], None]
) -> None:
    """What a rollback (an earlier version applied again, as a new one) changed."""
    if output is not Output.TABLE:
        emit(done, output)
        return
    show_diff(done["diff"])
    if done["applied"]:
        typer.echo(f"rolled back to version {version}, now version {done['version']}")
    else:
        typer.echo(f"no changes: version {version} is what is in force (version {done['version']})")


def apply_document(
    url: str,
    token: str | None,
    path: str,
    doc: dict[str, Any],
    comment: str,
    dry_run: bool,
    yes: bool,
    output: Output,
    show_diff: Callable[[list[dict[str, Any]]], None],
    what: str,
) -> None:
    """Apply a whole document (`path`: /v1/queues or /v1/admission) the same way everywhere: the service answers
    the diff first (a dry run), the user confirms, then it is applied only over the version that diff was
    computed against, so what was shown is what changes (409 otherwise)."""
    with api(url, token) as a:
        plan = a.post(f"{path}/apply", {"document": doc, "comment": comment, "dry_run": True})
        if output is Output.TABLE:
            if not plan["diff"]:
                typer.echo(f"no changes: the {what} is already version {plan['version']}")
                return
            show_diff(plan["diff"])
        if dry_run or not plan["diff"]:
            if output is not Output.TABLE:
                emit(plan, output)
            return
        if not yes and not typer.confirm(f"apply {len(plan['diff'])} change(s)?", err=True):
            note("nothing applied")
            raise typer.Exit(1)
        done = a.post(f"{path}/apply", {"document": doc, "comment": comment, "expected_version": plan["version"]})
    if output is not Output.TABLE:
        emit(done, output)
    elif done["applied"]:
        typer.echo(f"applied as version {done['version']}")
    else:
        typer.echo(f"no changes: the {what} is already version {done['version']}")
