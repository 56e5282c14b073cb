"""Queues, quotas, limits, weights and fair share: the part of Corral that says who deserves which GPUs."""

from quotas.fairshare import PoolShares, fair_shares
from quotas.tree import UNLIMITED, Queue, QueueSpec, QueueTree, QuotaError

__all__ = ["PoolShares", "UNLIMITED", "Queue", "QueueSpec", "QueueTree", "QuotaError", "fair_shares"]
