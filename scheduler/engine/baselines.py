"""Baseline policies for comparison, run by the same simulator: fifo, strict-quota, las."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from quotas import QueueTree
from scheduler.engine.engine import Engine
from scheduler.engine.model import NodeSpec, Settings

POLICIES = ("corral", "fifo", "strict-quota", "las")


def make_policy(name: str, tree: QueueTree, nodes: Iterable[NodeSpec],
                domains: Mapping[str, Mapping[str, Iterable[str]]], settings: Settings) -> Engine:
    if name == "corral":
        return Engine(tree, nodes, domains, settings)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
