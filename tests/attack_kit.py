"""The attack suite's tally: every attack a test tries is counted by item, so RELIABILITY.md can give its figures.

A test calls `attempt("2 non-finite numbers")` once per hostile request or action it makes, then asserts the attack
failed. At the end of a run the tally is printed (and written as JSON when CORRAL_ATTACK_TALLY names a file).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

TALLY: Counter[str] = Counter()  # item of issue 21 (its number and a few words) -> attacks tried


def attempt(item: str, n: int = 1) -> None:
    """Count `n` attacks on `item`; the calling test fails if any of them succeeds."""
    TALLY[item] += n


def report() -> str | None:
    """The tally as lines for the terminal summary (None when no attack ran); also written to
    $CORRAL_ATTACK_TALLY as JSON."""
    if not TALLY:
        return None
    path = os.environ.get("CORRAL_ATTACK_TALLY")
    if path:
        Path(path).write_text(json.dumps(dict(sorted(TALLY.items())), indent=1) + "\n")
    lines = [f"{n:7d}  {item}" for item, n in sorted(TALLY.items())]
    return "\n".join([*lines, f"{sum(TALLY.values()):7d}  attacks in all, over {len(TALLY)} items"])
