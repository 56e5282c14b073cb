"""The append-only audit history of the model registry, hash chained so that tampering is detected.

Each entry's hash covers the previous entry's hash and the entry's own fields, so changing a row breaks its
own hash, and removing or reordering rows breaks the link from the next row. The service stores the rows;
this module only computes and checks hashes (no database, no clock: `at` is passed in).

Removing the newest rows leaves a shorter chain that is still intact, and someone who can write the table can
rewrite it all with fresh hashes; pass a head hash kept elsewhere (the service logs each new head and shows it
in /metrics) as `verify(rows, head=...)` to detect both. `alias_problems` replays the stage aliases' moves
recorded in the chain and compares them with the alias table, so an alias changed in the database shows too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64
FIELDS = ("seq", "at", "actor", "action", "model", "detail")
_ROW_KEYS = (*FIELDS, "prev_hash", "hash")
REPAIR = "version.repair"  # a version's fields changed by Corral itself (migration 0007), recorded in the chain
VERSION_FIELDS = ("digest", "artifact_uri", "metrics", "eval_set")  # what the gates read, compared by verify


def _at(value: Any) -> Any:
    """Datetimes as ISO-8601 in UTC, so the hash survives a database round trip.

    SQLite hands back naive datetimes (we stored UTC) and PostgreSQL aware ones in the session's zone: both
    normalise to the same text. Strings and numbers are hashed as they are.
    """
    if isinstance(value, datetime):
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return aware.isoformat()
    return value


def canonical(entry: Mapping[str, Any]) -> bytes:
    """The entry's fields as canonical JSON: sorted keys, no spaces, ASCII only, no NaN.

    NaN is refused because it is not JSON: a JSON column would reject or rewrite it, and the hash with it.
    """
    missing = [k for k in FIELDS if k not in entry]
    if missing:
        raise ValueError(f"audit entry lacks {', '.join(missing)}")
    fields = {k: _at(entry[k]) if k == "at" else entry[k] for k in FIELDS}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.encode("ascii")


def entry_hash(prev_hash: str, entry: Mapping[str, Any]) -> str:
    """sha256 over the previous hash (ASCII hex), a newline, then the entry's canonical JSON."""
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + canonical(entry)).hexdigest()


def next_entry(
    last: Mapping[str, Any] | None, *, at: Any, actor: str, action: str, model: str, detail: Mapping[str, Any]
) -> dict[str, Any]:
    """The row to append after `last` (None for the first entry): the fields plus seq, prev_hash and hash."""
    seq = 1 if last is None else int(last["seq"]) + 1
    prev = GENESIS if last is None else str(last["hash"])
    row: dict[str, Any] = {
        "seq": seq,
        "at": at,
        "actor": actor,
        "action": action,
        "model": model,
        "detail": dict(detail),
    }
    row["prev_hash"] = prev
    row["hash"] = entry_hash(prev, row)
    return row


def verify(rows: Iterable[Mapping[str, Any]], head: str | None = None) -> list[str]:
    """Every problem in the chain (rows in seq order, starting at seq 1); empty when it is intact.

    `head`, a hash kept earlier outside the database, must be one of the rows' hashes: rows appended since are
    fine, but removing the newest rows, or rewriting the chain and recomputing every hash, loses it. (Once the
    links all check, holding the head means everything up to it is as it was when the head was kept.)"""
    problems: list[str] = []
    prev_hash, prev_seq = GENESIS, 0
    seen: set[str] = set()  # hashes of the rows read: a head kept earlier may have newer rows after it
    for row in rows:
        missing = [k for k in _ROW_KEYS if k not in row]
        if missing:
            problems.append(f"row after seq {prev_seq}: missing {', '.join(missing)}")
            continue
        seq = row["seq"]
        if seq != prev_seq + 1:
            what = "a gap (rows removed?)" if isinstance(seq, int) and seq > prev_seq else "out of order"
            problems.append(f"seq {seq} follows seq {prev_seq}: {what}")
        if row["prev_hash"] != prev_hash:
            problems.append(
                f"seq {seq}: prev_hash does not link to the row before it "
                f"(expected {prev_hash[:12]}…, found {str(row['prev_hash'])[:12]}…): "
                "a row was removed, inserted or reordered"
            )
        try:
            recomputed = entry_hash(str(row["prev_hash"]), row)
        except (TypeError, ValueError) as err:
            problems.append(f"seq {seq}: cannot be hashed: {err}")
        else:
            if recomputed != row["hash"]:
                problems.append(f"seq {seq}: hash does not match the row's contents: the row was changed")
        prev_hash, prev_seq = str(row["hash"]), seq if isinstance(seq, int) else prev_seq
        seen.add(prev_hash)
    if head is not None and head not in seen:
        problems.append(
            f"the known head {head[:12]}… is not in the chain (it ends at seq {prev_seq}, hash "
            f"{prev_hash[:12]}…): its newest rows were removed, or the chain was rewritten"
        )
    return problems


def replay_aliases(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], tuple[int, int | None]]:
    """Where every stage alias should point, replayed from the chain: (model, stage) -> (version, previous).

    Registration moves `candidate`, a promotion its stage, a rollback its stage back; each keeps the version it
    replaced as `previous`, as the service's alias table does."""
    out: dict[tuple[str, str], tuple[int, int | None]] = {}
    for row in rows:
        detail, model = row.get("detail") or {}, str(row.get("model"))
        try:
            if row.get("action") == "version.register":
                key = (model, "candidate")
                out[key] = (int(detail["version"]), out[key][0] if key in out else None)
            elif row.get("action") == "model.promote":
                key = (model, str(detail["stage"]))
                out[key] = (int(detail["version"]), out[key][0] if key in out else None)
            elif row.get("action") == "model.rollback":
                out[(model, str(detail["stage"]))] = (int(detail["version"]), int(detail["rolled_back"]))
        except (KeyError, TypeError, ValueError):
            continue  # a row verify() already reports (changed, or missing fields): no move to replay from it
    return out


def alias_problems(rows: Iterable[Mapping[str, Any]], table: Iterable[Mapping[str, Any]]) -> list[str]:
    """Aliases (rows of model, stage, version, previous) that differ from what the chain's moves lead to: the
    alias table was changed without going through the registry."""
    expected = replay_aliases(rows)
    found = {(str(r["model"]), str(r["stage"])): (int(r["version"]), r["previous"]) for r in table}
    problems = []
    for key in sorted(expected.keys() | found.keys()):
        want, have = expected.get(key), found.get(key)
        if want != have:
            problems.append(
                f"alias {key[0]}/{key[1]} is {_alias_text(have)} but the audit chain's moves lead to "
                f"{_alias_text(want)}: the alias table was changed outside the registry"
            )
    return problems


def _alias_text(v: tuple[int, int | None] | None) -> str:
    return "none" if v is None else f"v{v[0]} (previous {'none' if v[1] is None else f'v{v[1]}'})"


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON documents: NaN (which equals nothing in Python, itself included) is equal to NaN here, so a
    version still holding the NaN it was registered with is not reported as changed."""
    if a == b:
        return True
    try:
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    except (TypeError, ValueError):
        return False


def version_problems(rows: Iterable[Mapping[str, Any]], table: Iterable[Mapping[str, Any]]) -> list[str]:
    """Versions (rows of model_versions) whose digest, artifact, metrics or eval set differ from what their
    registration entry in the chain recorded, as later `version.repair` entries changed it (migration 0007
    removing non-finite metrics), and versions with no registration entry: the gates read these rows, so a
    changed metric or digest in the database must show. Fields an entry lacks, written by an older Corral, are
    not compared."""
    recorded: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        detail = row.get("detail") or {}
        if not isinstance(detail, Mapping) or "version" not in detail:
            continue
        key = (str(row.get("model")), int(detail["version"]))
        if row.get("action") == "version.register":
            recorded[key] = dict(detail)
        elif row.get("action") == REPAIR and key in recorded:
            recorded[key] |= {f: detail[f] for f in VERSION_FIELDS if f in detail}
    problems = []
    for v in table:
        key = (str(v["model"]), int(v["version"]))
        entry = recorded.get(key)
        if entry is None:
            problems.append(f"version {key[0]} v{key[1]} has no registration entry in the audit chain")
            continue
        changed = [f for f in VERSION_FIELDS if f in entry and not _same(entry[f], v[f])]
        if changed:
            problems.append(
                f"version {key[0]} v{key[1]}: {', '.join(changed)} differ from its registration entry "
                "in the audit chain: the version was changed outside the registry"
            )
    return problems
