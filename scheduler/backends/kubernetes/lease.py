"""Leader election on a coordination.k8s.io/v1 Lease, as Kubernetes' own controllers do it (client-go's leaderelection).

The holder renews the Lease every round; a follower takes it once the record it observed (holder, renewTime,
transitions) has not changed for `lease_s` by its own clock, never comparing clocks across machines. Every write
carries the resourceVersion it read, so two followers racing for an expired Lease make one 409, not two holders.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException


class Lease:
    """A coordination.k8s.io/v1 Lease (see the module's docstring)."""

    def __init__(
        self, api: Any, namespace: str, name: str, me: str, lease_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.api = client.CoordinationV1Api(api)
        self.namespace, self.name, self.me, self.lease_s, self.clock = namespace, name, me, lease_s, clock
        self.observed: tuple[Any, ...] | None = None  # (holder, renewTime, transitions) as last read
        self.observed_at = 0.0

    def try_acquire_or_renew(self) -> bool:
        # MicroTime wants exactly six fractional digits, which isoformat() leaves out on a whole second.
        now_iso = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "holderIdentity": self.me,
            "leaseDurationSeconds": round(self.lease_s),
            "renewTime": now_iso,
            "acquireTime": now_iso,
            "leaseTransitions": 0,
        }
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            try:
                made: Any = {"metadata": {"name": self.name}, "spec": body}
                self.api.create_namespaced_lease(self.namespace, made)
            except ApiException as e:
                if e.status == 409:  # another instance created it first
                    return False
                raise
            return True
        spec: Any = lease.spec
        record = (spec.holder_identity, spec.renew_time, spec.lease_transitions)
        if record != self.observed:
            self.observed, self.observed_at = record, self.clock()
        mine = spec.holder_identity == self.me
        if not mine and spec.holder_identity and self.clock() - self.observed_at < self.lease_s:
            return False  # held by another, renewed within the lease as we saw it
        spec.renew_time = now_iso
        if not mine:
            spec.holder_identity, spec.acquire_time = self.me, now_iso
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.lease_duration_seconds = round(self.lease_s)
        try:  # resourceVersion in the body: a concurrent taker makes this a 409, not a second holder
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True
