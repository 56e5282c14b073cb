"""The append-only audit history of the model registry, hash chained so that tampering is detected.

Each entry's hash covers the previous entry's hash and the entry's own fields, so changing a row breaks its
own hash, and removing or reordering rows breaks the link from the next row. The service stores the rows;
this module only computes and checks hashes (no database, no clock: `at` is passed in).

Removing the newest rows leaves a shorter chain that is still intact; pass the last known hash (published
elsewhere, e.g. in logs or a release note) as `verify(rows, head=...)` to detect that as well.
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


def next_entry(last: Mapping[str, Any] | None, *, at: Any, actor: str, action: str, model: str,
               detail: Mapping[str, Any]) -> dict[str, Any]:
    """The row to append after `last` (None for the first entry): the fields plus seq, prev_hash and hash."""
    seq = 1 if last is None else int(last["seq"]) + 1
    prev = GENESIS if last is None else str(last["hash"])
    row: dict[str, Any] = {"seq": seq, "at": at, "actor": actor, "action": action, "model": model,
                           "detail": dict(detail)}
    row["prev_hash"] = prev
    row["hash"] = entry_hash(prev, row)
    return row


def verify(rows: Iterable[Mapping[str, Any]], head: str | None = None) -> list[str]:
    """Every problem in the chain (rows in seq order, starting at seq 1); empty when it is intact."""
    problems: list[str] = []
    prev_hash, prev_seq = GENESIS, 0
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
            problems.append(f"seq {seq}: prev_hash does not link to the row before it "
                            f"(expected {prev_hash[:12]}…, found {str(row['prev_hash'])[:12]}…): "
                            "a row was removed, inserted or reordered")
        try:
            recomputed = entry_hash(str(row["prev_hash"]), row)
        except (TypeError, ValueError) as err:
            problems.append(f"seq {seq}: cannot be hashed: {err}")
        else:
            if recomputed != row["hash"]:
                problems.append(f"seq {seq}: hash does not match the row's contents: the row was changed")
        prev_hash, prev_seq = str(row["hash"]), seq if isinstance(seq, int) else prev_seq
    if head is not None and prev_hash != head:
        problems.append(f"the chain ends at seq {prev_seq}, hash {prev_hash[:12]}…, not at the known head "
                        f"{head[:12]}…: newest rows removed or the head is from another log")
    return problems
