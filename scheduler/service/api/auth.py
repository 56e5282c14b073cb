"""API tokens (stored hashed) and the role rules every endpoint applies: who may see and change what."""

from __future__ import annotations

import enum
import hashlib
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from quotas import QueueTree
from scheduler.backends.base import CLUSTER_OWNER

TOKEN_PREFIX = "corral_"
DEFAULT_TOKEN_DAYS = 90.0  # people's tokens expire, recovery tokens too: a leaked one is not a key for ever


class Role(enum.StrEnum):
    PLATFORM_ADMIN = "platform-admin"  # everything, everywhere
    TEAM_ADMIN = "team-admin"  # the queues below its scope: their jobs, quotas and tokens
    MEMBER = "member"  # submit to and see the queues of its scope; cancel its own jobs
    MODEL_OWNER = "model-owner"  # a member who also promotes, approves and rolls back its team's models
    VIEWER = "viewer"  # read-only, within its scope (everything when it has none)


# What a team admin may grant: never model-owner (an approver) nor platform-admin.
TEAM_GRANTABLE = frozenset({Role.TEAM_ADMIN, Role.MEMBER, Role.VIEWER})
# User names Corral itself acts under (the cluster's own jobs): no token is ever made for one.
RESERVED_PREFIX = CLUSTER_OWNER.partition(":")[0] + ":"  # "system:"


def reserved_name(name: str) -> bool:
    return name.strip().lower().startswith(RESERVED_PREFIX)


@dataclass(frozen=True)
class NameRecord:
    """What a user name has stood for so far: its tokens (every one ever made, revoked and expired included) as
    (role, scope), the queues of the jobs and models it owns, and whether it requested or approved promotions."""

    tokens: tuple[tuple[str, str | None], ...] = ()
    queues: frozenset[str] = frozenset()
    promotions: bool = False


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """What the database keeps: a token cannot be read back from it."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user with one role, over a queue's subtree (scope) or over everything (None)."""

    user: str
    role: Role
    scope: str | None = None

    @property
    def admin(self) -> bool:
        return self.role is Role.PLATFORM_ADMIN

    def covers(self, tree: QueueTree, queue: str) -> bool:
        """`queue` is the scope or below it (everything, when the token has no scope)."""
        if self.admin or self.scope is None:
            return True
        if queue not in tree or self.scope not in tree:
            return False
        return any(q.name == self.scope for q in tree[queue].path)

    def visible(self, tree: QueueTree, queues: Iterable[str]) -> list[str]:
        return [q for q in queues if self.covers(tree, q)]

    def may_read_job(self, tree: QueueTree, queue: str, owner: str) -> bool:
        return owner == self.user or self.covers(tree, queue)

    def may_submit(self, tree: QueueTree, queue: str) -> bool:
        return self.role is not Role.VIEWER and self.covers(tree, queue)

    def may_cancel(self, tree: QueueTree, queue: str, owner: str) -> bool:
        if self.admin:
            return True
        if self.role is Role.TEAM_ADMIN:
            return self.covers(tree, queue)
        return self.role in (Role.MEMBER, Role.MODEL_OWNER) and owner == self.user and self.covers(tree, queue)

    def may_promote(self, tree: QueueTree, queue: str) -> bool:
        """Promotions, approvals, rollbacks and policies of a team's models: its model owners (and admins)."""
        return self.admin or (self.role is Role.MODEL_OWNER and self.covers(tree, queue))

    def may_change_queue(self, tree: QueueTree, queue: str) -> bool:
        """Platform admins change any queue; a team admin changes queues strictly below its scope (its own
        quota is set from above, so it cannot grant itself more)."""
        if self.admin:
            return True
        return (
            self.role is Role.TEAM_ADMIN and self.scope is not None and queue != self.scope and self.covers(tree, queue)
        )

    def may_change_queues(self) -> bool:
        return self.role in (Role.PLATFORM_ADMIN, Role.TEAM_ADMIN)

    def may_grant(self, tree: QueueTree, role: Role | str, scope: str | None) -> bool:
        """Tokens: platform admins make any; team admins make member, viewer and team-admin tokens
        inside their scope. Never model-owner: approvals of production promotions must come from someone a team
        admin did not make up."""
        if self.admin:
            return True
        return (
            self.role is Role.TEAM_ADMIN and role in TEAM_GRANTABLE and scope is not None and self.covers(tree, scope)
        )

    def may_revoke(self, tree: QueueTree, role: Role | str, scope: str | None) -> bool:
        """Tokens: platform admins revoke any; team admins any but a platform admin's inside their scope, model
        owners' included (a team admin cannot make an approver, but must be able to stop a leaked one at once)."""
        if self.admin:
            return True
        return (
            self.role is Role.TEAM_ADMIN
            and role != Role.PLATFORM_ADMIN
            and scope is not None
            and self.covers(tree, scope)
        )

    def may_take_name(self, tree: QueueTree, name: str, seen: NameRecord, hub: bool) -> str | None:
        """Whether a token may be made for `name` by this caller (who already may grant the role and scope):
        None if so, else why not. A name belongs to whoever it was first made for, so a team admin may use it
        only while everything it ever stood for lies inside its subtree and within what it could grant."""
        if reserved_name(name):
            return f"{name!r} is reserved for Corral's own records (names starting {RESERVED_PREFIX!r})"
        if self.admin:
            return None  # platform admins may; the audit log records it
        for role, scope in seen.tokens:
            if not self.may_grant(tree, role, scope):
                return (
                    f"{name!r} already has a {role} token for {scope or 'every queue'}: the name belongs to "
                    "someone outside what you may grant"
                )
        if seen.promotions:
            return f"{name!r} has requested or approved model promotions: only a platform admin may reissue it"
        outside = sorted(q for q in seen.queues if not self.covers(tree, q))
        if outside:
            return f"{name!r} already acts in queues outside your scope ({', '.join(outside)})"
        if hub and not seen.tokens:
            # Corral cannot list the hub's users, and a hub user and a Corral token of one name are one identity:
            # a new name might be a hub user's (another team's, or an approver), so only a platform admin makes it.
            return (
                f"{name!r} has no Corral token yet, and with JupyterHub in use it may be a hub user's name: "
                "a platform admin makes tokens for new names"
            )
        return None


class TokenCache:
    """Recently checked tokens, so that each request does not read the token table. Revoking through the API
    clears it at once; a token revoked in the database by other means stops working within `ttl_s`."""

    def __init__(self, ttl_s: float = 60.0):
        self.ttl_s = ttl_s
        self._known: dict[str, tuple[Principal, float]] = {}  # key -> (who, until)

    def get(self, key: str, now: float) -> Principal | None:
        hit = self._known.get(key)
        if hit is None:
            return None
        if now >= hit[1]:
            del self._known[key]  # expired entries go, so rotating tokens do not grow the cache
            return None
        return hit[0]

    def put(self, key: str, who: Principal, now: float, expires_at: float | None = None) -> None:
        """Remember `who` for ttl_s, and never past the token's own expiry."""
        self._known[key] = (who, min(now + self.ttl_s, expires_at if expires_at is not None else math.inf))

    def clear(self) -> None:
        self._known.clear()


NO_TEAM = "(no team)"  # the scope of a hub user in no mapped group: it covers no queue
HUB_ADMIN, HUB_SUBMIT, HUB_PROMOTE = "custom:corral:admin", "custom:corral:submit", "custom:corral:promote"


def hub_principal(
    name: str, groups: Iterable[str], scopes: Iterable[str], group_queues: Mapping[str, str]
) -> Principal:
    """A JupyterHub user as Corral sees it. Custom scopes granted to hub groups (roles in the hub) decide the
    role; the user's first group (by name) that maps to a queue is its team. A scope with a filter
    (`custom:corral:submit!group=x`) counts like the scope itself."""
    held = {s.split("!", 1)[0] for s in scopes}
    if HUB_ADMIN in held:
        return Principal(name, Role.PLATFORM_ADMIN)
    team = next((group_queues[g] for g in sorted(groups) if g in group_queues), NO_TEAM)
    role = Role.MODEL_OWNER if HUB_PROMOTE in held else Role.MEMBER if HUB_SUBMIT in held else Role.VIEWER
    return Principal(name, role, team)
