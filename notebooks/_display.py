"""How jobs and logs show in Jupyter: Job's HTML card, and log text that displays as text, not as a repr."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from scheduler.service.core.states import JobState

# Jupyter's default palette has no state colours; these keep the card readable on light and dark themes.
STATE_COLOURS: dict[str, str] = {
    JobState.PENDING: "#b58900",
    JobState.STARTING: "#268bd2",
    JobState.RUNNING: "#268bd2",
    JobState.COMPLETED: "#2aa198",
    JobState.FAILED: "#dc322f",
    JobState.CANCELLED: "#93a1a1",
    JobState.REJECTED: "#dc322f",
}


def granted_gpus(data: Mapping[str, Any]) -> str:
    """The latest attempt's GPUs as "node: 0, 1"; "-" when the job never got any.

    The API answers a placement as [[node, [indices]], ...]; a mapping node -> indices is accepted too."""
    attempts = data.get("attempts") or []
    if not attempts:
        return "-"
    placement = attempts[-1].get("placement") or []
    pairs = placement.items() if isinstance(placement, Mapping) else placement
    parts = [f"{node}: {', '.join(str(i) for i in gpus)}" for node, gpus in pairs]
    return "; ".join(parts) or "-"


def job_html(data: Mapping[str, Any], reason: Mapping[str, Any] | None, note: str = "") -> str:
    """A small table for one job. Every value comes from users or the API and is escaped."""
    e = html.escape
    state = str(data.get("state", "?"))
    colour = STATE_COLOURS.get(state, "inherit")
    rows = [
        ("job", f"{e(str(data.get('id')))} <code>{e(str(data.get('name', '')))}</code>"),
        ("state", f'<b style="color:{colour}">{e(state)}</b>'),
        ("queue", e(str(data.get("queue", "")))),
        ("GPUs", f"{e(str(data.get('gpus', '?')))} requested; granted {e(granted_gpus(data))}"),
    ]
    if data.get("exit_code") is not None:
        rows.append(("exit code", e(str(data["exit_code"]))))
    if reason and reason.get("message"):
        rows.append(
            (
                "why" if state == JobState.PENDING else "reason",
                f"<code>{e(str(reason.get('rule', '')))}</code> {e(str(reason['message']))}",
            )
        )
    if note:
        rows.append(("note", e(note)))
    body = "".join(
        f'<tr><th style="text-align:left">{k}</th><td style="text-align:left">{v}</td></tr>' for k, v in rows
    )
    return f'<table class="corral-job">{body}</table>'


class LogText(str):
    """A job's log as a str. Shown in IPython as the text itself (not a quoted repr); when it was already
    printed while following, only a one-line summary, so the output is not shown twice."""

    shown: bool = False

    @classmethod
    def of(cls, text: str, shown: bool) -> LogText:
        out = cls(text)
        out.shown = shown
        return out

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        if self.shown:
            p.text(f"<{self.count(chr(10))} lines of output, shown above>")
        else:
            p.text(str(self))
