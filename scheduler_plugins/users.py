# SPDX-License-Identifier: AGPL-3.0-or-later
"""The people who use the mesh and what they did: users with roles and keys (only the keys' verifiers are kept, see
:mod:`sharedllm.security`), who is calling an operation (:class:`Caller`), and the audit trail of admin actions.
No Dask."""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from sharedllm import security
from sharedllm.errors import MeshError

ROLES = ("user", "admin")
ANONYMOUS = "anonymous"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


@dataclass(frozen=True)
class Caller:
    """Who calls an operation, as the connection proved it: a user (by name) and the role they hold, or a machine.
    ``via``: ``user-port`` or ``dask`` (an operator's Dask client), ``address``: where from."""

    name: str
    role: str  # "user", "admin", "machine", or "anonymous"
    via: str = "user-port"
    address: str = ""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def describe(self) -> str:
        return f"{'user' if self.role in ROLES else self.role} {self.name!r}"


@dataclass
class UserRecord:
    """A user of the mesh: name, role, the verifiers of their key (never the key), optional limits of their own."""

    name: str
    role: str
    key_id: str
    stored_key: str
    server_key: str
    created: float = field(default_factory=time.time)
    limits: dict[str, float] | None = None  # requests_per_minute, tokens_per_minute, concurrent_leases

    def public(self) -> dict:
        """What ``users list`` shows: no verifier."""
        return {"name": self.name, "role": self.role, "key_id": self.key_id, "created": self.created,
                "limits": self.limits}


class UserRegistry:
    """The mesh's users, by name and by key id."""

    def __init__(self) -> None:
        self.users: dict[str, UserRecord] = {}

    def _by_key(self, key_id: str) -> UserRecord | None:
        return next((u for u in self.users.values() if u.key_id == key_id), None)

    def add(self, name: str, role: str = "user", limits: dict | None = None, key: str | None = None) -> str:
        """Add a user; their key's text (shown once: only its verifiers are kept). ``key``: a key made elsewhere
        (``sharedllm.security.new_user_key``), taken as theirs instead of a new one."""
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == ANONYMOUS:
            raise MeshError(f"a user name is 1-64 letters, digits and ._@- (and not {ANONYMOUS!r}), got {name!r}")
        if name in self.users:
            raise MeshError(f"user {name!r} exists already; `sharedllm users rotate {name}` gives them a new key")
        self._check_role(role)
        if key is not None:
            key_id, text = security.parse_user_key(key)[0], key.strip()
            if self._by_key(key_id) is not None:
                raise MeshError(f"a user holds a key with the id {key_id} already; make a new key")
        else:
            key_id, text = security.new_user_key()
        stored, server = security.key_verifiers(text)
        self.users[name] = UserRecord(name, role, key_id, stored, server, limits=_limits(limits))
        return text

    def remove(self, name: str) -> UserRecord:
        return self.users.pop(self.get(name).name)

    def rotate(self, name: str) -> str:
        """A new key for ``name``; the old one stops working."""
        user = self.get(name)
        user.key_id, text = security.new_user_key()
        user.stored_key, user.server_key = security.key_verifiers(text)
        return text

    def grant(self, name: str, role: str) -> UserRecord:
        self._check_role(role)
        user = self.get(name)
        user.role = role
        return user

    def set_limits(self, name: str, limits: dict | None) -> UserRecord:
        user = self.get(name)
        user.limits = _limits(limits)
        return user

    def get(self, name: str) -> UserRecord:
        user = self.users.get(name)
        if user is None:
            known = ", ".join(sorted(self.users)) or "none"
            raise MeshError(f"no user {name!r} (the mesh has {known}); `sharedllm users list` shows them")
        return user

    def verify(self, key_id: str, message: bytes, proof: str) -> UserRecord | None:
        """The user whose key made ``proof`` over ``message``, else None."""
        user = self._by_key(key_id) if isinstance(key_id, str) else None
        if user is None or not security.check_user_proof(user.stored_key, message, proof):
            return None
        return user

    def admins(self) -> list[UserRecord]:
        return [u for u in self.users.values() if u.role == "admin"]

    def to_dict(self) -> dict:
        return {name: asdict(u) for name, u in self.users.items()}

    def load(self, d: dict) -> None:
        self.users = {name: UserRecord(**rec) for name, rec in (d or {}).items()}

    @staticmethod
    def _check_role(role: str) -> None:
        if role not in ROLES:
            raise MeshError(f"a role is one of {', '.join(ROLES)}, got {role!r}")


def _limits(limits: dict | None) -> dict | None:
    if not limits:
        return None
    allowed = ("requests_per_minute", "tokens_per_minute", "concurrent_leases")
    out = {}
    for k, v in limits.items():
        k = k.replace("-", "_")
        if k == "max_leases":
            k = "concurrent_leases"
        if k not in allowed:
            raise MeshError(f"unknown limit {k!r}; the limits are requests-per-minute, tokens-per-minute, max-leases")
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise MeshError(f"limit {k} must be a number, got {v!r}") from None
        if out[k] < 0:
            raise MeshError(f"limit {k} must be >= 0, got {v!r}")
    return out


@dataclass
class AuditEntry:
    """One admin action: who, what, when, from where, and whether it was done or refused."""

    time: float
    who: str
    role: str
    action: str  # "catalog add", "trust ban", "users add", ...
    target: str | None
    via: str
    address: str
    outcome: str  # "done" or "refused: ..."

    def to_dict(self) -> dict:
        return asdict(self)


class AuditLog:
    """The trail of admin actions (and of refused attempts at them), newest last; kept with the scheduler's state."""

    def __init__(self, size: int = 2000) -> None:
        self.entries: deque[AuditEntry] = deque(maxlen=size)

    def record(self, caller: Caller, action: str, target: Any, outcome: str = "done") -> AuditEntry:
        entry = AuditEntry(time.time(), caller.name, caller.role, action, None if target is None else str(target),
                           caller.via, caller.address, outcome)
        self.entries.append(entry)
        return entry

    def recent(self, limit: int = 100) -> list[dict]:
        return [e.to_dict() for e in list(self.entries)[-limit:]]

    def to_list(self) -> list[dict]:
        return [e.to_dict() for e in self.entries]

    def load(self, entries: list[dict] | None) -> None:
        self.entries.clear()
        for e in entries or ():
            self.entries.append(AuditEntry(**e))
