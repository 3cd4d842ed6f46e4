# SPDX-License-Identifier: AGPL-3.0-or-later
"""The scheduler's durable state: an SQLite file that outlives a restart (even ``kill -9``).

What is persisted is history and policy: every machine ever seen (with its last report), sessions (with their
topology: open ones go on after a restart when their client reclaims them), and policy such as drained machines, the
trust records and the relay master key. Live state (which workers are connected, which rpc-servers are ready) is
rebuilt from the workers as they rejoin. Each save is one transaction, so a crash leaves either the previous or the
new state, never a mix. The file holds a secret (the relay master key): it is readable by its owner only.

The schema carries a version. A file of an older version is migrated in place when it is opened (``MIGRATIONS``, one
transaction per step); a file of a newer version is refused. A release that changes the schema adds a step here and a
fixture written by the release before it (``tests/data/state-vN.sqlite``).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("sharedllm.scheduler")

SCHEMA_VERSION = 3

# The schema of a new file: version 1's, then every migration.
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS machines (
    machine_id TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, client TEXT, model TEXT, machines TEXT, opened REAL, closed REAL,
    tokens INTEGER, requests INTEGER, recoveries INTEGER, reason TEXT);
CREATE TABLE IF NOT EXISTS policy (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# version -> the statements that take a file from that version to the next.
MIGRATIONS: dict[int, list[str]] = {
    # 2: a session's topology, so that an open session can go on after a restart (sessions of version 1 files have
    # none: they stay interrupted).
    1: ["ALTER TABLE sessions ADD COLUMN topology TEXT"],
    # 3: whether a session serves other users too (a server's): it stays so after a restart. The policy table gained
    # the users (their keys' verifiers) and the audit trail in this release too, as keys of their own: no statement.
    2: ["ALTER TABLE sessions ADD COLUMN shared INTEGER NOT NULL DEFAULT 0"],
}
_COLUMNS = ["session_id", "client", "model", "machines", "opened", "closed", "tokens", "requests", "recoveries",
            "reason", "topology", "shared"]


class StateStore:
    """A small SQLite store. Thread-safe; every method is one short transaction."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # SQLite gives its -wal/-shm the same mode
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA_V1)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
            version = int(row[0]) if row else 1
            if version > SCHEMA_VERSION:
                raise ValueError(f"scheduler state file {self.path} has schema {version}, newer than this SharedLLM "
                                 f"({SCHEMA_VERSION}); upgrade SharedLLM or use another --state-path")
            self.migrated_from = version if row is not None and version < SCHEMA_VERSION else None  # None: new
            for v in range(version, SCHEMA_VERSION):
                self._migrate(v)
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"scheduler state file {self.path} is not a usable SQLite database ({exc}); move it "
                             "away or pass another --state-path") from exc
        if self.migrated_from is not None:
            logger.info("scheduler state file %s migrated from schema %d to %d", self.path, self.migrated_from,
                        SCHEMA_VERSION)

    def _migrate(self, version: int) -> None:
        """Take the file from ``version`` to the next, in one transaction."""
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[version]:
                cur.execute(statement)
            cur.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version + 1),))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def load(self) -> dict[str, Any]:
        """Everything persisted: ``machines`` (id -> record), ``sessions`` (newest last), ``policy``."""
        with self._lock:
            machines = {
                mid: {**json.loads(rec), "first_seen": first, "last_seen": last}
                for mid, first, last, rec in self._db.execute("SELECT machine_id, first_seen, last_seen, record "
                                                              "FROM machines")
            }
            sessions = []
            for row in self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM sessions ORDER BY opened"):
                d = dict(zip(_COLUMNS, row, strict=True))
                d["machines"] = json.loads(d["machines"] or "[]")
                d["topology"] = json.loads(d["topology"]) if d["topology"] else None
                d["shared"] = bool(d["shared"])
                sessions.append(d)
            policy = {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM policy")}
        return {"machines": machines, "sessions": sessions, "policy": policy}

    def save(self, machines: list[dict], sessions: list[dict], policy: dict[str, Any], now: float | None = None,
             keep_sessions: int = 1000) -> None:
        """Upsert the live machines (``last_seen`` = now), the sessions, and the policy, in one transaction."""
        now = time.time() if now is None else now
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for m in machines:
                    record = json.dumps({k: m.get(k) for k in ("resources", "rpc", "build")}, default=str)
                    cur.execute(
                        "INSERT INTO machines VALUES (?, ?, ?, ?) ON CONFLICT(machine_id) DO UPDATE SET "
                        "last_seen=excluded.last_seen, record=excluded.record",
                        (m["machine_id"], now, now, record),
                    )
                for s in sessions:
                    cur.execute(
                        f"INSERT OR REPLACE INTO sessions ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * 12)})",
                        (s["session_id"], s.get("client"), s.get("model"), json.dumps(list(s.get("machines", []))),
                         s.get("opened"), s.get("closed"), s.get("tokens", 0), s.get("requests", 0),
                         s.get("recoveries", 0), s.get("reason"),
                         json.dumps(s["topology"]) if s.get("topology") else None, int(bool(s.get("shared")))),
                    )
                cur.execute("DELETE FROM sessions WHERE session_id NOT IN (SELECT session_id FROM sessions "
                            "ORDER BY opened DESC LIMIT ?)", (keep_sessions,))
                for k, v in policy.items():
                    cur.execute("INSERT OR REPLACE INTO policy VALUES (?, ?)", (k, json.dumps(v)))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
