"""The plots of `corral sim report`: wait CDF, GPUs in use per queue, idle-wait GPU-hours per queue."""

from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scheduler.sim.outcome import Report


def _time_unit(horizon: float) -> tuple[float, str]:
    return (86400.0, "days") if horizon > 3 * 86400 else (3600.0, "hours") if horizon > 3 * 3600 else (1.0, "s")


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no global pyplot state
    fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_wait_cdf(rep: Report, path: Path) -> None:
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for r in rep.runs:
        w = sorted(r.metrics.overall.waits)
        if w:
            ax.step(w, [(i + 1) / len(w) for i in range(len(w))], where="post", label=r.policy)
    ax.set_xscale("symlog", linthresh=1.0)  # most waits are 0; the tail spans days
    ax.set_xlabel("wait (s, symlog)")
    ax.set_ylabel("fraction of started jobs")
    ax.set_ylim(0, 1.01)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("Wait CDF per policy")
    _save(fig, path)


def plot_gpus_in_use(rep: Report, path: Path) -> None:
    n = max(1, len(rep.runs))
    fig = Figure(figsize=(11, 2.8 * n))
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    horizon = max((r.metrics.span for r in rep.runs), default=0.0)
    scale, unit = _time_unit(horizon)
    queues = sorted({q for r in rep.runs for q in r.series[1]})
    colours = [colormaps["tab20"](i % 20) for i in range(len(queues))]  # 20 distinct; Philly has 15 queues
    for ax, r in zip(axes, rep.runs, strict=False):
        starts, per_q = r.series
        x = [s / scale for s in starts]
        ax.stackplot(x, *[per_q.get(q, [0.0] * len(x)) for q in queues], labels=queues, colors=colours, step="post")
        ax.axhline(rep.capacity, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel("GPUs in use")
        ax.set_title(f"{r.policy}: utilisation {r.metrics.overall.utilisation:.1%}", fontsize=10)
        ax.set_ylim(0, rep.capacity * 1.05 or 1)
    axes[-1].set_xlabel(f"time ({unit})")
    if queues:
        axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    _save(fig, path)


def plot_idle_wait(rep: Report, path: Path) -> None:
    """Idle-wait GPU-hours per queue, a bar per policy."""
    queues = sorted({q for r in rep.runs for q in r.waste.idle_queues})
    fig = Figure(figsize=(max(6.0, 0.6 * len(queues) * max(1, len(rep.runs)) + 2), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(rep.runs))
    for i, r in enumerate(rep.runs):
        hours = [r.waste.idle_queues[q].gpu_seconds / 3600 if q in r.waste.idle_queues else 0.0 for q in queues]
        ax.bar([k + (i - (len(rep.runs) - 1) / 2) * width for k in range(len(queues))], hours, width, label=r.policy)
    ax.set_xticks(range(len(queues)), queues, rotation=45 if len(queues) > 6 else 0, ha="right")
    ax.set_yscale("symlog", linthresh=1.0)  # one policy's idle waits can be 1000x another's
    ax.set_ylabel("idle-wait GPU-hours (symlog)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    ax.set_title("GPU-hours waited while the pool had room, per queue")
    _save(fig, path)
