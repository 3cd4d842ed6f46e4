# SPDX-License-Identifier: AGPL-3.0-or-later
"""SharedLLM's operations and the role each needs. Every way in (the user port, an operator's Dask client) calls an
operation through :meth:`Operations.call` with the :class:`~sharedllm.scheduler_plugins.users.Caller` its connection
proved: the role is checked there, once; a refusal is a typed error that names the action, the role it needs and
who asked, logged as one line and counted; every admin action, done or refused, goes into the audit trail.

Roles, lowest first: ``anonymous`` (the user port with ``--allow-anonymous``: a user's operations, the tightest
limits), ``user`` (placement, leases, their own sessions and reports, catalog and trust reads), ``admin`` (everything:
bans, drains, catalog and trust changes, users, the audit trail). Machines prove the cluster secret and only register.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sharedllm.errors import MeshError, NotAuthorized
from sharedllm.scheduler_plugins.users import AuditLog, Caller

logger = logging.getLogger("sharedllm.scheduler")
audit_logger = logging.getLogger("sharedllm.audit")

RANK = {"anonymous": 1, "user": 1, "admin": 2}  # what a role may do; machines have no rank here
READS = ("list", None)  # the actions of catalog/trust/users/clients that read


@dataclass(frozen=True)
class Operation:
    """One operation: its handler, the role it needs (or a function of its arguments that says), whether the
    handler takes the caller (``caller=``), and whether it is an admin action for the audit trail."""

    handler: Callable[..., Awaitable[Any]]
    role: str | Callable[[dict], str] = "user"
    takes_caller: bool = False
    audited: bool | Callable[[dict], bool] = False
    target: str | None = None  # the argument the audit trail names as the action's object

    def needs(self, kwargs: dict) -> str:
        return self.role(kwargs) if callable(self.role) else self.role

    def audits(self, kwargs: dict) -> bool:
        return self.audited(kwargs) if callable(self.audited) else self.audited


def admin_unless_read(kwargs: dict) -> str:
    """``list`` reads are a user's; any other action is an admin's."""
    return "user" if kwargs.get("action", "list") in READS else "admin"


def changes(kwargs: dict) -> bool:
    return kwargs.get("action", "list") not in READS


class Operations:
    """The operations by name, called with a caller's role checked (see the module's docstring)."""

    def __init__(self, operations: dict[str, Operation], audit: AuditLog, persist: Callable[[], None]):
        self.operations = operations
        self.audit = audit
        self.persist = persist
        self.refusals: Counter[tuple[str, str]] = Counter()  # (action, role needed) -> refusals, for /metrics

    async def call(self, caller: Caller, name: str, kwargs: dict) -> Any:
        """Run operation ``name`` for ``caller``; ``NotAuthorized`` when its role is not enough."""
        op = self.operations.get(name)
        if op is None:
            raise MeshError(f"unknown operation {name!r}; this scheduler has {', '.join(sorted(self.operations))}")
        kwargs = dict(kwargs)
        action = _action(name, kwargs)
        need = op.needs(kwargs)
        if not allowed(caller, need):
            self.refuse(caller, action, need, op, kwargs)
        if op.takes_caller:
            kwargs["caller"] = caller
        try:
            result = await op.handler(**kwargs)
        except MeshError as exc:
            if op.audits(kwargs):
                self._record(caller, action, op, kwargs, f"failed: {exc}")
            raise
        if op.audits(kwargs):
            self._record(caller, action, op, kwargs, "done")
        return result

    def refuse(self, caller: Caller, action: str, need: str, op: Operation | None = None,
               kwargs: dict | None = None) -> None:
        """Raise ``NotAuthorized`` for ``caller`` doing ``action`` without role ``need``; log it, count it, and keep
        it in the audit trail when it was an admin action."""
        self.refusals[action, need] += 1
        why = f"{action!r} needs the {need} role; you are {caller.describe()}"
        logger.warning("refused: %s (from %s via %s)", why, caller.address or "?", caller.via)
        if need == "admin":
            self._record(caller, action, op, kwargs or {}, f"refused: needs the {need} role")
        raise NotAuthorized(why)

    def _record(self, caller: Caller, action: str, op: Operation | None, kwargs: dict, outcome: str) -> None:
        target = kwargs.get(op.target) if op is not None and op.target else None
        self.audit.record(caller, action, target, outcome)
        audit_logger.info("%s %s %s%s: %s", caller.describe(), caller.via, action,
                          f" {target}" if target is not None else "", outcome)
        self.persist()


def allowed(caller: Caller, need: str) -> bool:
    if need == "anyone":
        return True
    if need == "machine":
        return caller.role in ("machine", "admin")
    return RANK.get(caller.role, 0) >= RANK[need]


def _action(name: str, kwargs: dict) -> str:
    """How an operation is named to people: ``catalog add``, ``trust ban``, ``acquire``..."""
    action = kwargs.get("action")
    return f"{name.replace('_', ' ')} {action}" if isinstance(action, str) and action else name.replace("_", " ")
