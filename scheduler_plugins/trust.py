# SPDX-License-Identifier: AGPL-3.0-or-later
"""Admission, trust and rate limits: the scheduler's defences for a community mesh. Plain Python, no Dask.

- ``Admission`` issues one-time nonces and checks the workers' HMAC answers at registration.
- ``TrustRegistry`` keeps a record per machine (vouched, sessions and tokens served, failures, score, ban, labels);
  new machines start on probation. It persists with the scheduler state.
- ``RateLimiter`` keeps token buckets per client: requests per minute, generated tokens per minute, a cap on
  concurrent leases, and strikes for models that made rpc-servers abort (a few per hour, then no new lease).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field

from sharedllm import security

logger = logging.getLogger("sharedllm.scheduler")


class Admission:
    """Challenge-response admission of workers with the cluster secret."""

    def __init__(self, secret: bytes, nonce_ttl: float = 120.0):
        self.secret = secret
        self.nonce_ttl = nonce_ttl
        self._nonces: dict[str, float] = {}  # nonce -> expiry
        self.refused: list[dict] = []  # recent refusals, for the logs and the status

    def challenge(self) -> str:
        now = time.monotonic()
        self._nonces = {n: t for n, t in self._nonces.items() if t > now}
        if len(self._nonces) > 10_000:  # someone is asking for nonces in a loop: forget the oldest
            for n in sorted(self._nonces, key=self._nonces.get)[:5000]:
                del self._nonces[n]
        nonce = security.new_nonce()
        self._nonces[nonce] = now + self.nonce_ttl
        return nonce

    def check(self, proof: dict | None, address: str) -> str | None:
        """``None`` when the worker proved it knows the secret, else the reason to refuse it."""
        if not proof:
            why = "no cluster-secret proof (start the worker with --preload sharedllm.worker and the cluster secret)"
        else:
            nonce, mid, mac = proof.get("nonce", ""), proof.get("machine_id", ""), proof.get("proof", "")
            expiry = self._nonces.pop(nonce, None)  # single use: a replayed answer finds no nonce
            if expiry is None:
                why = "unknown or already used nonce (a replayed or stale registration)"
            elif expiry < time.monotonic():
                why = "expired nonce"
            elif not security.check_proof(self.secret, nonce, mid, mac):
                why = f"wrong cluster secret for machine {mid}"
            else:
                return None
        self.refused = [*self.refused[-99:], {"address": address, "reason": why, "time": time.time()}]
        return why


@dataclass
class TrustRecord:
    """What the mesh knows about one machine's behaviour."""

    machine_id: str
    vouched: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    sessions: int = 0
    tokens: int = 0
    failures: int = 0  # sessions that lost this machine (crash, hang, dropped lease)
    banned: bool = False
    labels: dict = field(default_factory=dict)

    PROBATION_SESSIONS = 5

    @property
    def probation(self) -> bool:
        return self.sessions < self.PROBATION_SESSIONS

    @property
    def score(self) -> float:
        """0..1: starts at 0.5, grows with sessions and tokens served, falls with failures."""
        good = self.sessions + self.tokens / 10_000
        return round(max(0.0, min(1.0, 0.5 + 0.05 * good - 0.2 * self.failures)), 3)

    def to_dict(self) -> dict:
        # What asdict gives, written out: asdict's recursive deep copy cost 80% of machines() (one record each).
        return {"machine_id": self.machine_id, "vouched": self.vouched, "last_seen": self.last_seen,
                "sessions": self.sessions, "tokens": self.tokens, "failures": self.failures, "banned": self.banned,
                "labels": copy.deepcopy(self.labels) if _nested(self.labels) else dict(self.labels),
                "score": self.score, "probation": self.probation}


def _nested(labels: dict) -> bool:
    return not all(isinstance(v, (str, int, float, bool, type(None))) for v in labels.values())


class TrustRegistry:
    PRIVACY_LEVELS = ("any", "trusted")
    TRUSTED_SCORE = 0.7

    def __init__(self):
        self.records: dict[str, TrustRecord] = {}

    def seen(self, machine_id: str, labels: dict | None = None) -> TrustRecord:
        rec = self.records.get(machine_id)
        if rec is None:
            rec = self.records[machine_id] = TrustRecord(machine_id)
            logger.info("machine %s vouched for; on probation", machine_id)
        rec.last_seen = time.time()
        if labels is not None:
            rec.labels = dict(labels)
        return rec

    def served(self, machines: list[str], tokens: int) -> None:
        for m in machines:
            rec = self.seen(m)
            rec.sessions += 1
            rec.tokens += tokens

    def failed(self, machine_id: str) -> None:
        self.seen(machine_id).failures += 1

    def set_banned(self, machine_id: str, banned: bool) -> TrustRecord:
        rec = self.seen(machine_id)
        rec.banned = banned
        return rec

    def qualifies(self, machine_id: str, privacy: str = "any", min_score: float | None = None,
                  labels: dict | None = None) -> str | None:
        """``None`` when the machine may serve the request, else why not."""
        rec = self.records.get(machine_id) or TrustRecord(machine_id)
        if rec.banned:
            return "banned"
        if privacy not in self.PRIVACY_LEVELS:
            raise ValueError(f"privacy must be one of {self.PRIVACY_LEVELS}, got {privacy!r}")
        if privacy == "trusted" and (rec.probation or rec.score < self.TRUSTED_SCORE):
            return f"not trusted (score {rec.score}, {'on probation' if rec.probation else 'below 0.7'})"
        if min_score is not None and rec.score < min_score:
            return f"trust score {rec.score} < {min_score}"
        for k, v in (labels or {}).items():
            if rec.labels.get(k) != v:
                return f"label {k}={rec.labels.get(k)!r}, need {v!r}"
        return None

    def to_dict(self) -> dict:
        return {m: asdict(r) for m, r in self.records.items()}

    def load(self, d: dict) -> None:
        for m, r in (d or {}).items():
            self.records[m] = TrustRecord(**{k: v for k, v in r.items() if k in TrustRecord.__dataclass_fields__})


@dataclass
class Bucket:
    capacity: float
    refill_per_s: float
    level: float = -1.0
    stamp: float = 0.0

    def __post_init__(self):
        if self.level < 0:
            self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + max(0.0, now - self.stamp) * self.refill_per_s)
        self.stamp = now

    def take(self, n: float = 1.0) -> float:
        """Take ``n``; return 0 on success, else the seconds until ``n`` would be available."""
        self._refill()
        if self.level >= n:
            self.level -= n
            return 0.0
        return (n - self.level) / self.refill_per_s if self.refill_per_s > 0 else float("inf")

    def charge(self, n: float) -> None:
        """Record usage that already happened (tokens generated); the level may go negative."""
        self._refill()
        self.level -= n


@dataclass
class Limits:
    requests_per_minute: float = 120.0
    tokens_per_minute: float = 60_000.0
    concurrent_leases: int = 4
    invalid_models_per_hour: int = 3  # models that made an rpc-server abort; at the limit, no new lease for a while


class RateLimiter:
    """Token buckets per client. ``check_request`` returns ``None`` or (reason, retry_after seconds)."""

    def __init__(self, limits: Limits | None = None, anonymous: Limits | None = None):
        self.limits = limits or Limits()
        # Anonymous callers (``anonymous@ADDRESS``) get the tightest limits; a user may have limits of their own.
        self.anonymous = anonymous or Limits(requests_per_minute=min(self.limits.requests_per_minute, 10.0),
                                             tokens_per_minute=min(self.limits.tokens_per_minute, 2_000.0),
                                             concurrent_leases=1, invalid_models_per_hour=1)
        self.overrides: dict[str, Limits] = {}
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}
        self.banned: set[str] = set()
        self._strikes: dict[str, list[float]] = {}  # client -> when its models made rpc-servers abort (monotonic)

    STRIKE_WINDOW = 3600.0

    def strike(self, client: str) -> int:
        """Count a model of ``client`` that made an rpc-server abort; returns its strikes within the window."""
        self._strikes[client] = [*self._recent_strikes(client), time.monotonic()]
        return len(self._strikes[client])

    def _recent_strikes(self, client: str) -> list[float]:
        now = time.monotonic()
        return [t for t in self._strikes.get(client, []) if now - t < self.STRIKE_WINDOW]

    def strikes(self, client: str) -> int:
        """``client``'s strikes within the window (see ``strike``)."""
        return len(self._recent_strikes(client))

    def limits_for(self, client: str) -> Limits:
        """``client``'s limits: its own, the anonymous ones, or the mesh's."""
        if client in self.overrides:
            return self.overrides[client]
        return self.anonymous if client.startswith("anonymous@") else self.limits

    def set_limits(self, client: str, limits: Limits | None) -> None:
        """Give ``client`` limits of its own (None: the mesh's again); its buckets start anew."""
        if limits is None:
            self.overrides.pop(client, None)
        else:
            self.overrides[client] = limits
        self._requests.pop(client, None)
        self._tokens.pop(client, None)

    def _buckets(self, client: str) -> tuple[Bucket, Bucket]:
        lim = self.limits_for(client)
        if client not in self._requests:
            self._requests[client] = Bucket(lim.requests_per_minute, lim.requests_per_minute / 60)
            self._tokens[client] = Bucket(lim.tokens_per_minute, lim.tokens_per_minute / 60)
        return self._requests[client], self._tokens[client]

    def check_request(self, client: str, leases: int = 0, new_lease: bool = False) -> tuple[str, float] | None:
        """None when the request may go on, else (why not, seconds until it may). Bans are the caller's check."""
        lim = self.limits_for(client)
        strikes = self._recent_strikes(client)
        if new_lease and len(strikes) >= lim.invalid_models_per_hour:
            wait = strikes[len(strikes) - lim.invalid_models_per_hour] + self.STRIKE_WINDOW - time.monotonic()
            return (f"client {client} loaded {len(strikes)} models in the last hour that made rpc-servers abort "
                    "(invalid models); check the model files", max(wait, 1.0))
        if new_lease and leases >= lim.concurrent_leases:
            return f"client {client} already holds {leases} leases (limit {lim.concurrent_leases})", 5.0
        requests, tokens = self._buckets(client)
        if tokens.level < 0:
            wait = -tokens.level / tokens.refill_per_s
            return f"client {client} generated more than {lim.tokens_per_minute:.0f} tokens/minute", wait
        wait = requests.take()
        if wait:
            return f"client {client} sent more than {lim.requests_per_minute:.0f} requests/minute", wait
        return None

    def charge_tokens(self, client: str, n: int) -> None:
        self._buckets(client)[1].charge(n)
