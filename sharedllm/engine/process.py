# SPDX-License-Identifier: AGPL-3.0-or-later
"""The parent's handle on an engine process: start it, run calls on it (many at once), turn its death into errors.

Every call has an id and an inbox. There is no reader thread: a call waiting for its next frame reads the child's
pipe itself, in its own thread (``call``, ``stream``) or event loop (``acall``, ``astream``), unless another call
already does (leader and followers): frames for other calls go to their inboxes, and when the reader gets its own it
hands the pipe to a waiting call. A lone request thus reads the pipe with nothing in between, as before calls could
run at once (a hand-over between threads waits for a free core). A call that stops early (the caller stopped reading,
its task was cancelled) tells the child to cancel it and goes: the child stops that request between two tokens and
frees its sequence; the other calls go on.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from sharedllm import effects
from sharedllm.effects import Core
from sharedllm.engine.framing import FrameReader, write_frame
from sharedllm.engine.inbox import END_OF_PIPE, Inbox
from sharedllm.engine.load import LoadProgress
from sharedllm.engine.spec import EngineSpec, probe_stages
from sharedllm.engine.standby import Standby, spawn_child
from sharedllm.errors import EngineError, InvalidModel, MeshError, ModelBusy, ModelClosed, WorkerLost

logger = logging.getLogger(__name__)

class Engine:
    """Client-side handle on one engine process.

    ``load_timeout`` bounds model loading (uploading weights to every rpc-server) and a request's wait for its first
    token; ``token_timeout`` bounds the gap between two streamed tokens. An rpc-server that hangs (the RPC protocol
    has no timeouts) is detected by them, or sooner by the ``watchdog`` when one is given. Calls from many threads
    and tasks run at once: as sequences of one batch when ``spec.parallel > 1``, one after the other in the child
    otherwise.
    """

    def __init__(
        self,
        spec: EngineSpec,
        *,
        load_timeout: float = 600.0,
        token_timeout: float = 120.0,
        on_progress: Callable[[LoadProgress], None] | None = None,
        probe: Callable[[EngineSpec], tuple[str, str] | None] | None = None,
        watchdog: Callable[[], tuple[str, str] | None] | None = None,
        watch_after: float = 2.0,
        standby: Standby | None = None,
    ):
        self.spec = spec
        # A process started ahead (see Standby): start() loads the model in it instead of starting one, unless it died.
        self._standby = standby if standby is not None and standby.alive else None
        if standby is not None and self._standby is None:
            standby.close()
        self.load_timeout = load_timeout
        self.token_timeout = token_timeout
        # While a call hears nothing for more than ``watch_after`` seconds, ``watchdog()`` is asked every second
        # whether a machine is known to be gone or stuck: (machine, why), else None. A stopped or cut-off machine
        # is then found in seconds instead of at ``token_timeout`` (the RPC protocol has no timeouts of its own).
        self.watchdog = watchdog
        self.watch_after = watch_after
        self.on_progress = on_progress
        self._probe = probe or probe_stages
        self._log = self._standby.log if self._standby else tempfile.NamedTemporaryFile(
            prefix="sharedllm-engine-", suffix=".log", delete=False)
        self.info: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}  # the batch scheduler's last report: running, waiting, batch size...
        self._measured = threading.Event()  # the engine's "measured" frame came
        self._proc: subprocess.Popen | None = None
        self._reader: FrameReader | None = None
        self._inboxes: dict[int, Inbox] = {}
        self._pipe = threading.Lock()  # held by the call that reads the child's pipe now
        self._followers: set[Inbox] = set()  # calls waiting for a frame while another reads
        self._rids = itertools.count(1)
        self._eof = False
        self._send_lock = threading.Lock()
        self._fail_lock = threading.Lock()
        self._failed: MeshError | None = None  # why the engine is gone, worked out once for every call
        self._watched: tuple[float, tuple[str, str] | None] = (0.0, None)  # the watchdog's last answer, and when
        self._closing = False  # close() was called: a call still running ends with ModelClosed

    @property
    def log_path(self) -> str:
        return self._log.name

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def in_flight(self) -> int:
        """Calls running or waiting in the engine."""
        return len(self._inboxes)

    def start(self) -> dict[str, Any]:
        """Start the child (or take the standby) and load the model. Returns what the child reports (devices, load
        time, n_ctx...)."""
        spawned = time.monotonic()  # CLOCK_MONOTONIC is system-wide: the child's timestamps compare with it
        if self._standby is not None:
            self._proc, self._standby = self._standby.proc, None
        else:
            self._proc = spawn_child(self._log)
        self._reader = FrameReader(self._proc.stdout.fileno())
        self._send({"op": "init", "spec": self.spec, "sent_at": time.monotonic()})
        deadline = time.monotonic() + self.load_timeout
        while True:
            msg = effects.run(self._receiving(self._reader.reading, deadline - time.monotonic(), "loading the model"))
            if msg[0] == "progress":
                if self.on_progress:
                    self.on_progress(LoadProgress(*msg[1:4]))
            elif msg[0] == "ready":
                self.info = msg[1]
                phases = self.info.get("phases")
                if phases is not None and "started_at" in phases:
                    phases["spawn"] = max(0.0, phases.pop("started_at") - spawned)  # 0: a standby, started ahead
                    logger.debug("engine load phases (s): %s", phases)
                return self.info
            elif msg[0] == "error":
                why = _load_error(self.log_tail()) if msg[1] == "model" else None  # before close() removes the log
                self.close()
                raise _rebuild(msg[1], why or msg[2], self.spec)

    def _route(self, msg: tuple) -> None:
        """A frame read from the pipe, to its call's inbox (or the statistics)."""
        if msg[0] == "stats":
            self.stats = msg[1]
        elif msg[0] == "measured":  # taken while idle after the load (sharedllm.engine.measuring)
            self.info.update(msg[1], measured_by="engine")
            self._measured.set()
        elif (inbox := self._inboxes.get(msg[1])) is not None:
            inbox.put((msg[0], *msg[2:]))

    def poll_stats(self) -> dict[str, Any]:
        """The batch scheduler's last report. The pipe is read by the calls waiting on it; when none does (an idle
        engine), the reports already in it are read here, or the last ones would wait for the next call."""
        if self._reader is not None and not self._eof and self._pipe.acquire(blocking=False):
            try:
                while self._reader.ready():
                    self._route(self._reader.read(timeout=1.0))
            except (EOFError, OSError, ValueError, TimeoutError):
                pass  # the next call finds the end of the pipe, or the rest of the frame
            finally:
                self._pipe.release()
                self._hand_over()
        return self.stats

    def measured(self, timeout: float) -> dict | None:
        """The exact mode's measures (``info["invariance"]``), waiting up to ``timeout`` seconds for an engine that
        takes them while idle (``info["measured_by"] == "measuring"``); None when it has not by then."""
        deadline = time.monotonic() + timeout
        while self.info.get("measured_by") == "measuring" and self.alive and time.monotonic() < deadline:
            self.poll_stats()  # the frame is read by a call waiting on the pipe, or here when none does
            self._measured.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        return self.info.get("invariance")

    def _pipe_ended(self) -> None:
        self._eof = True
        for inbox in list(self._inboxes.values()):
            inbox.put(END_OF_PIPE)

    def _hand_over(self) -> None:
        """The reader leaves the pipe: wake one follower to take it."""
        for inbox in list(self._followers):
            inbox.poke()
            return

    def _arrived(self, inbox: Inbox, deadline: float) -> tuple | None:
        """The call's frame if it has come (handing on a pipe its reader left), else None; ``TimeoutError`` past
        ``deadline``. The first step of ``_getting``."""
        if (msg := inbox.take()) is not None:
            if self._followers and not self._pipe.locked():
                self._hand_over()  # this call was woken by its frame: the pipe must not stay without a reader
            return msg
        if deadline - time.monotonic() <= 0:
            raise TimeoutError
        return None

    def _getting(self, inbox: Inbox, timeout: float) -> Core[tuple]:
        """The call's next frame, read from the pipe by this call (its thread, or its event loop) when no other call
        reads it; ``TimeoutError`` after ``timeout`` seconds, ``EOFError`` at the end of the pipe."""
        deadline = time.monotonic() + timeout
        while True:
            if (msg := self._arrived(inbox, deadline)) is not None:
                return msg
            if self._pipe.acquire(blocking=False):
                try:
                    while (msg := inbox.take()) is None and (left := deadline - time.monotonic()) > 0:
                        try:
                            self._route((yield from self._reader.reading(left)))
                        except TimeoutError:
                            break
                        except (EOFError, OSError, ValueError):  # ValueError: the pipe was closed under the read
                            self._pipe_ended()
                            break
                finally:
                    self._pipe.release()
                    self._hand_over()
                if msg is not None:
                    return msg
                continue
            self._followers.add(inbox)
            try:
                if self._pipe.locked():  # else its reader left meanwhile: take the pipe at once
                    yield inbox.waiting(deadline - time.monotonic())
            finally:
                self._followers.discard(inbox)

    def _open(self, method: str, kwargs: dict[str, Any], stream: bool) -> tuple[int, Inbox]:
        rid, inbox = next(self._rids), Inbox()
        self._inboxes[rid] = inbox
        if self._eof:
            inbox.put(END_OF_PIPE)
        try:
            self._send({"op": "call", "rid": rid, "method": method, "kwargs": kwargs, "stream": stream})
        except BaseException:
            self._inboxes.pop(rid, None)
            raise
        return rid, inbox

    def _finish(self, rid: int, ended: bool) -> None:
        """The call is over for its caller: forget its inbox; tell the child to stop it unless it ended there."""
        self._inboxes.pop(rid, None)
        if not ended and self.alive and not self._closing:
            with contextlib.suppress(MeshError):
                self._send({"op": "cancel", "rid": rid})

    def calling(self, method: str, kwargs: dict[str, Any]) -> Core[Any]:
        """Run ``Llama.<method>(**kwargs)`` without streaming: its result (an :mod:`sharedllm.effects` core).
        Stopping the core early (a cancelled task) stops the generation in the engine, between two tokens."""
        rid, inbox = self._open(method, kwargs, stream=False)
        ended = False
        try:
            while True:
                msg = yield from self._receiving(functools.partial(self._getting, inbox), self.load_timeout, method)
                ended = msg[0] in _CALL_ENDS
                if (result := _result(msg, self.spec)) is not _NO_RESULT:
                    return result
        finally:
            self._finish(rid, ended)

    def call(self, method: str, kwargs: dict[str, Any]) -> Any:
        """Run ``Llama.<method>(**kwargs)`` without streaming and return its result."""
        return effects.run(self.calling(method, kwargs))

    async def acall(self, method: str, kwargs: dict[str, Any]) -> Any:
        """``call`` for asyncio, read in the running event loop. Cancelling the awaiting task stops the generation
        in the engine (between two tokens)."""
        return await effects.arun(self.calling(method, kwargs))

    def streaming(self, method: str, kwargs: dict[str, Any], on_accepted: Callable[[], None] | None = None
                  ) -> Core[None]:
        """Run ``Llama.<method>(**kwargs, stream=True)``: a streamed core (:mod:`sharedllm.effects`) of its chunks
        as the child produces them, each with the number of tokens generated so far (as the engine counts them).

        ``on_accepted`` is called once llama-cpp-python has checked the request and starts evaluating the prompt.
        """
        rid, inbox = self._open(method, kwargs, stream=True)
        call = _StreamedCall(self, on_accepted)
        try:
            while not call.finished:
                msg = yield from self._receiving(functools.partial(self._getting, inbox), call.timeout, method)
                if (chunk := call.take(msg)) is not None:
                    yield chunk, call.generated
        finally:
            self._finish(rid, call.finished)

    def stream(self, method: str, kwargs: dict[str, Any], on_accepted: Callable[[], None] | None = None
               ) -> Iterator[tuple[dict, int]]:
        """The chunks of ``streaming``, read in this thread."""
        return effects.iterate(self.streaming(method, kwargs, on_accepted))

    def astream(self, method: str, kwargs: dict[str, Any], on_accepted: Callable[[], None] | None = None
                ) -> AsyncIterator[tuple[dict, int]]:
        """The chunks of ``streaming``, taken in the running event loop."""
        return effects.aiterate(self.streaming(method, kwargs, on_accepted))

    def _send(self, msg: dict) -> None:
        if self._closing:
            raise ModelClosed("the model was closed; load it again")
        if not self.alive:
            raise self._failure("the engine is not running")
        try:
            with self._send_lock:
                write_frame(self._proc.stdin.fileno(), msg)
        except (OSError, ValueError):
            raise self._failure("the engine stopped accepting requests") from None

    def _receiving(self, getting: Callable[[float], Core[tuple]], timeout: float, during: str) -> Core[tuple]:
        """The next frame ``getting`` gets, within ``timeout`` seconds, asking the watchdog between waits; the
        engine's failure (typed, naming the machine when known) when it died, hung, or lost a machine."""
        deadline = time.monotonic() + max(timeout, 0.0)
        for wait in self._waits(deadline):
            try:
                return (yield from getting(wait))
            except TimeoutError:
                # The watchdog and the culprit's probe use the network: an asyncio caller runs them in a thread.
                if (lost := (yield effects.in_thread(self._watch, deadline, timeout, during))) is not None:
                    raise lost from None
            except EOFError as exc:
                raise (yield effects.in_thread(self._lost, exc, timeout, during)) from None
        raise AssertionError("unreachable")

    def _waits(self, deadline: float) -> Iterator[float]:
        """How long each read waits: ``watch_after`` seconds, then a second at a time with the watchdog between
        them, up to ``deadline``; the whole time at once without a watchdog."""
        step = self.watch_after if self.watchdog is not None else None
        while True:
            left = max(deadline - time.monotonic(), 0.0)
            yield left if step is None else min(step, left)
            step = None if step is None else 1.0

    def _watch(self, deadline: float, timeout: float, during: str) -> MeshError | None:
        """After a read that timed out: the error to raise (the deadline passed, or the watchdog names a machine
        that is gone or stuck: the engine is killed), or None to wait on."""
        if time.monotonic() >= deadline:
            return self._lost(TimeoutError(), timeout, during)
        with self._fail_lock:
            if self._failed is not None:
                return _again(self._failed)
            asked_at, suspect = self._watched
            if time.monotonic() - asked_at >= 0.9:  # many waiting calls ask the mesh once a second, not each
                suspect = self.watchdog() if self.watchdog is not None else None
                self._watched = (time.monotonic(), suspect)
            if suspect is None:
                return None
            machine, why = suspect
            self._kill()
            endpoint = next((s.endpoint for s in self.spec.stages if s.machine_id == machine), None)
            lost = WorkerLost(f"machine {machine} {why} while {during}; the session must be reloaded on the "
                              "remaining machines", machine=machine, endpoint=endpoint)
            lost.alive = True  # its processes may still exist (stopped, cut off): not a crash to diagnose
            self._failed = lost
            return _again(lost)

    def _lost(self, exc: TimeoutError | EOFError, timeout: float, during: str) -> MeshError:
        """The error for an engine that did not answer in time (killed now) or died."""
        if self._closing:  # close() from another thread stopped it under this call
            return ModelClosed(f"the model was closed while {during}; load it again")
        if isinstance(exc, TimeoutError):
            self._kill()
            return self._failure(f"no answer for {timeout:.0f}s while {during}", hung=True)
        self._proc.wait()
        return self._failure(f"the engine died while {during}")

    def _failure(self, what: str, hung: bool = False) -> MeshError:
        """Turn a dead or hung engine into a typed error that names the machine that caused it, when known; worked
        out once (the first call to see it probes the machines), the same for every call that was running."""
        with self._fail_lock:
            if self._failed is None:
                self._failed = self._diagnose(what, hung)
            return _again(self._failed)

    def _diagnose(self, what: str, hung: bool) -> MeshError:
        self._kill()
        tail = self.log_tail()
        culprit = self._probe(self.spec) if self.spec.stages else None
        code = self._proc.returncode if self._proc else None
        if culprit:
            endpoint, state = culprit
            machine = next((s.machine_id for s in self.spec.stages if s.endpoint == endpoint), "") or endpoint
            return WorkerLost(
                f"machine {machine} (rpc-server {endpoint}) {state}: {what}; the session must be reloaded on the "
                "remaining machines",
                machine=machine,
                endpoint=endpoint,
            )
        lines = tail.strip().splitlines()
        last = lines[-1] if lines else "no output"
        assertion = next((ln.strip() for ln in reversed(lines) if "GGML_ASSERT" in ln), None)
        if assertion and not hung:  # llama.cpp asserted on the model in this process (its layers on the client)
            return InvalidModel(f"{self.spec.model_path}: llama.cpp aborted on this model ({assertion}) while {what}; "
                                "the file is damaged or malformed, get it again from its source", self.spec.model_path)
        if hung:
            return EngineError(f"engine {what}; raise token_timeout if the model is this slow (log: {self.log_path})")
        return EngineError(f"engine exited with status {code} {what}: {last} (log: {self.log_path})")

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def close(self, replaced: bool = False) -> None:
        """Stop the child (politely, then by force) and remove its log. Calls running in other threads (or tasks)
        end with ``ModelClosed``; with ``replaced`` (the engine failed and its handle recovers), with the engine's
        failure, which their handle recovers from."""
        self._closing = not replaced
        if self._standby is not None:  # never started: the standby it was given goes with it
            self._standby.close()
            self._standby = None
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(Exception), self._send_lock:
                write_frame(proc.stdin.fileno(), {"op": "close"})
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
        with contextlib.suppress(Exception):
            proc.stdin.close()  # stdout: the reader thread reads the end of it, and the garbage collector closes it
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)
        self._proc = None


def _again(exc: MeshError) -> MeshError:
    """A copy of ``exc`` to raise in one more thread (an exception object raised in two threads shares its
    traceback)."""
    new = copy.copy(exc)
    new.__dict__.update(exc.__dict__)
    return new


class _StreamedCall:
    """The messages of one streamed call, as ``Engine.stream`` and ``Engine.astream`` read them."""

    def __init__(self, engine: Engine, on_accepted: Callable[[], None] | None):
        self.engine, self.on_accepted = engine, on_accepted
        self.timeout = engine.load_timeout  # the first chunk waits for the prompt; later ones for one decode step
        self.finished = False  # the engine ended the call (done or error): nothing to cancel
        self.generated = 0  # tokens generated so far, as the engine counts them

    def take(self, msg: tuple) -> dict | None:
        """The chunk a message carries, else None; raises the engine's error."""
        kind = msg[0]
        if kind == "chunk":
            self.timeout = self.engine.token_timeout
            self.generated = msg[2]
            return msg[1]
        if kind in ("done", "error"):
            self.finished = True
            if kind == "error":
                raise _rebuild(msg[1], msg[2], self.engine.spec)
            self.generated = msg[1]
        elif kind == "accepted" and self.on_accepted is not None:
            self.on_accepted()
        return None


_CALL_ENDS = ("done", "error", "result")  # the messages that end a call in the engine
_NO_RESULT = object()


def _result(msg: tuple, spec: EngineSpec) -> Any:
    """What a non-streamed call's message means: its result, ``_NO_RESULT`` (not the end yet), or the error raised."""
    if msg[0] == "result":
        return msg[1]
    if msg[0] == "error":
        raise _rebuild(msg[1], msg[2], spec)
    return _NO_RESULT


def _load_error(log: str) -> str | None:
    """Why llama.cpp refused a model, from the engine's log (its ``error loading model`` line), with the way out."""
    marker = "error loading model: "
    lines = [ln.split(marker, 1)[1].strip() for ln in log.splitlines() if marker in ln]
    if not lines:
        return None
    why = lines[-1]
    if "unknown model architecture" in why:
        import llama_cpp

        return (f"{why}: this llama.cpp (llama-cpp-python {llama_cpp.__version__}) does not support that architecture; "
                "upgrade llama-cpp-python on this client and every machine, or use a model of a supported architecture")
    return why


def _rebuild(kind: str, message: str, spec: EngineSpec) -> Exception:
    if kind == "model":
        return InvalidModel(f"{spec.model_path}: llama.cpp could not load the model: {message}", spec.model_path)
    if kind == "value":
        return ValueError(message)
    if kind == "busy":
        return ModelBusy(message)
    return EngineError(message)
