# SPDX-License-Identifier: AGPL-3.0-or-later
"""The engine: a disposable child process that holds the llama.cpp context.

llama.cpp calls ``GGML_ABORT`` (and the process exits with status 134) when an rpc-server dies, a handshake fails or
a tensor is malformed. So the context never lives in the user's interpreter: ``Engine`` starts
``python -m sharedllm.engine``, talks to it over its stdin/stdout with length-prefixed pickle frames, and turns its
death into a typed exception that names the machine or the file. Tokens are forwarded as the child produces them.

No Dask here: the engine knows endpoints and a tensor split, nothing about the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sharedllm.errors import EngineError, InvalidModel, MeshError, ModelClosed, WorkerLost

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<I")


@dataclass(frozen=True)
class EngineStage:
    """One device the engine loads layers onto: device ``device_index`` of the rpc-server at ``endpoint``.

    ``relay``: ``{"token": ..., "fingerprint": ...}`` when ``endpoint`` is the machine's relay (the default): the
    engine then tunnels to it (:class:`sharedllm.relay.ClientRelay`, in the engine process, where no other Python
    work competes for the GIL while llama.cpp waits on the network) and llama.cpp connects to the tunnel's local end.
    """

    endpoint: str
    device_index: int = 0
    machine_id: str = ""
    relay: dict | None = field(default=None, compare=False, hash=False, repr=False)  # holds a secret token

    def client_relay(self, **kwargs: Any):
        """A :class:`sharedllm.relay.ClientRelay` to this stage's machine, with its token and pinned certificate."""
        from sharedllm.relay import ClientRelay

        return ClientRelay(self.endpoint, self.relay["token"], fingerprint=self.relay["fingerprint"], **kwargs)


def probe_stage(stage: EngineStage, timeout: float = 5.0) -> tuple[int, int, int]:
    """RPC HELLO to a stage's rpc-server, through its relay when it has one; returns the protocol version.

    Raises ``TimeoutError`` (busy or hung), ``ConnectionError`` (unreachable, closed) or
    :class:`sharedllm.relay.TokenError` (the relay refused the token). No llama.cpp code runs.
    """
    from sharedllm.ggml import rpc_hello, rpc_hello_on

    if not stage.relay:
        return rpc_hello(stage.endpoint, timeout=timeout)
    with contextlib.closing(stage.client_relay(connect_timeout=timeout).open()) as tunnel:
        return rpc_hello_on(tunnel, stage.endpoint, timeout)


@dataclass
class EngineSpec:
    """Everything the child needs to build its ``llama_cpp.Llama``."""

    model_path: str
    stages: list[EngineStage] = field(default_factory=list)  # empty: a plain local model
    tensor_split: list[float] = field(default_factory=list)
    llama_kwargs: dict[str, Any] = field(default_factory=dict)
    use_extra_bufts: bool = False  # False: the same CPU kernels as an rpc-server (see NOTES, the oracle)
    # False: every request starts from an empty context. Reusing a cached prompt prefix re-evaluates the last prompt
    # token alone, and a batch of one takes other kernels than the full prompt: greedy text can then differ from a
    # fresh run. True trades that reproducibility for speed on long shared prefixes (chat).
    reuse_prompt_cache: bool = False
    output_on_client: bool = False  # see OUTPUT_ON_CLIENT


# --- framing, shared by both sides -------------------------------------------------------------------------------


def _write_frame(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    buf = _HEADER.pack(len(data)) + data
    while buf:
        n = os.write(fd, buf)
        buf = buf[n:]


class _FrameReader:
    """Reads frames from a pipe with an optional deadline; ``EOFError`` when the other side is gone.

    ``read`` blocks its thread; ``aread`` waits in the running event loop (no thread between the pipe and the loop).
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()

    def _take(self) -> Any:
        """The next whole frame in the buffer, or ``_NO_FRAME``."""
        if len(self.buf) < _HEADER.size:
            return _NO_FRAME
        (size,) = _HEADER.unpack_from(self.buf)
        if len(self.buf) < _HEADER.size + size:
            return _NO_FRAME
        data = bytes(self.buf[_HEADER.size : _HEADER.size + size])
        del self.buf[: _HEADER.size + size]
        return pickle.loads(data)

    def _append(self, data: bytes) -> None:
        if not data:
            raise EOFError
        self.buf += data

    def read(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (msg := self._take()) is _NO_FRAME:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                    raise TimeoutError
            self._append(os.read(self.fd, 65536))
        return msg

    async def aread(self, timeout: float | None = None) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while (msg := self._take()) is _NO_FRAME:
            readable = loop.create_future()
            loop.add_reader(self.fd, _resolve, readable)
            try:
                await asyncio.wait_for(readable, None if deadline is None else max(deadline - time.monotonic(), 0))
            finally:
                loop.remove_reader(self.fd)
            self._append(os.read(self.fd, 65536))  # readable: returns at once
        return msg

    def ready(self) -> bool:
        return len(self.buf) >= _HEADER.size or bool(select.select([self.fd], [], [], 0)[0])


_NO_FRAME = object()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


# --- parent side -------------------------------------------------------------------------------------------------


class Engine:
    """Client-side handle on one engine process.

    ``load_timeout`` bounds model loading (uploading weights to every rpc-server); ``token_timeout`` bounds the gap
    between two streamed tokens. An rpc-server that hangs (the RPC protocol has no timeouts) is detected by them, or
    sooner by the ``watchdog`` when one is given.
    """

    def __init__(
        self,
        spec: EngineSpec,
        *,
        load_timeout: float = 600.0,
        token_timeout: float = 120.0,
        on_progress: Callable[[float], None] | None = None,
        probe: Callable[[EngineSpec], tuple[str, str] | None] | None = None,
        watchdog: Callable[[], tuple[str, str] | None] | None = None,
        watch_after: float = 2.0,
    ):
        self.spec = spec
        self.load_timeout = load_timeout
        self.token_timeout = token_timeout
        # While the child is silent for more than ``watch_after`` seconds, ``watchdog()`` is asked every second
        # whether a machine is known to be gone or stuck: (machine, why), else None. A stopped or cut-off machine
        # is then found in seconds instead of at ``token_timeout`` (the RPC protocol has no timeouts of its own).
        self.watchdog = watchdog
        self.watch_after = watch_after
        self.on_progress = on_progress
        self._probe = probe or _probe_stages
        self._lock = threading.Lock()
        self._log = tempfile.NamedTemporaryFile(prefix="sharedllm-engine-", suffix=".log", delete=False)
        self.info: dict[str, Any] = {}
        self._proc: subprocess.Popen | None = None
        self._reader: _FrameReader | None = None
        self.generated = 0  # tokens the current (or last) streamed call generated, as the engine counts them
        self._closing = False  # close() was called: a call still running ends with ModelClosed

    @property
    def log_path(self) -> str:
        return self._log.name

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> dict[str, Any]:
        """Start the child and load the model. Returns what the child reports (devices, load time, n_ctx...)."""
        # GGML_NO_BACKTRACE: on abort, ggml would attach gdb to print a backtrace, which takes seconds.
        env = dict(os.environ, PYTHONUNBUFFERED="1", GGML_NO_BACKTRACE="1")
        # The engine's own CPU work is tiny (embedding rows, sampling) between network waits: its OpenMP threads
        # should sleep soon after, not spin ~300k times and take the CPU from the rest of the user's process.
        env.setdefault("GOMP_SPINCOUNT", "10000")
        spawned = time.monotonic()  # CLOCK_MONOTONIC is system-wide: the child's timestamps compare with it
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "sharedllm.engine", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            start_new_session=True,  # Ctrl-C in the user's terminal reaches the user's code, not the engine
        )
        self._reader = _FrameReader(self._proc.stdout.fileno())
        self._send({"op": "init", "spec": self.spec})
        deadline = time.monotonic() + self.load_timeout
        while True:
            msg = self._recv(deadline - time.monotonic(), during="loading the model")
            if msg[0] == "progress":
                if self.on_progress:
                    self.on_progress(msg[1])
            elif msg[0] == "ready":
                self.info = msg[1]
                phases = self.info.get("phases")
                if phases is not None and "started_at" in phases:
                    phases["spawn"] = phases.pop("started_at") - spawned
                    logger.debug("engine load phases (s): %s", phases)
                return self.info
            elif msg[0] == "error":
                why = _load_error(self.log_tail()) if msg[1] == "model" else None  # before close() removes the log
                self.close()
                raise _rebuild(msg[1], why or msg[2], self.spec)

    def call(self, method: str, kwargs: dict[str, Any]) -> Any:
        """Run ``Llama.<method>(**kwargs)`` without streaming and return its result."""
        with self._lock:
            self._send({"op": "call", "method": method, "kwargs": kwargs, "stream": False})
            while True:
                msg = self._recv(self.load_timeout, during=f"{method}")
                if (result := _result(msg, self.spec)) is not _NO_RESULT:
                    return result

    async def acall(self, method: str, kwargs: dict[str, Any]) -> Any:
        """``call`` for asyncio, read in the running event loop. Cancelling the awaiting task stops the generation
        in the engine (between two tokens) and waits until the engine is idle again."""
        async with self._alocked():
            self._send({"op": "call", "method": method, "kwargs": kwargs, "stream": False})
            finished = False
            try:
                while True:
                    msg = await self._arecv(self.load_timeout, during=method)
                    finished = msg[0] in ("result", "error")
                    if (result := _result(msg, self.spec)) is not _NO_RESULT:
                        return result
            finally:
                if not finished and self.alive:
                    await _to_the_end(self._acancel())

    def stream(self, method: str, kwargs: dict[str, Any], on_accepted: Callable[[], None] | None = None
               ) -> Iterator[dict]:
        """Run ``Llama.<method>(**kwargs, stream=True)`` and yield its chunks as the child produces them.

        ``on_accepted`` is called once llama-cpp-python has checked the request and starts evaluating the prompt.
        """
        with self._lock:
            self._send({"op": "call", "method": method, "kwargs": kwargs, "stream": True})
            call = _StreamedCall(self, on_accepted)
            try:
                while not call.finished:
                    if (chunk := call.take(self._recv(call.timeout, during=method))) is not None:
                        yield chunk
            finally:
                if not call.finished and self.alive and not self._closing:
                    self._cancel()

    async def astream(self, method: str, kwargs: dict[str, Any], on_accepted: Callable[[], None] | None = None
                      ) -> AsyncIterator[dict]:
        """``stream`` for asyncio: the chunks are read from the child's pipe in the running event loop."""
        async with self._alocked():
            self._send({"op": "call", "method": method, "kwargs": kwargs, "stream": True})
            call = _StreamedCall(self, on_accepted)
            try:
                while not call.finished:
                    if (chunk := call.take(await self._arecv(call.timeout, during=method))) is not None:
                        yield chunk
            finally:
                if not call.finished and self.alive and not self._closing:
                    # Cancelled or closed early: the engine must be idle again before the lock goes to the next call.
                    await _to_the_end(self._acancel())

    @contextlib.asynccontextmanager
    async def _alocked(self) -> AsyncIterator[None]:
        """The engine's lock, taken without blocking the event loop."""
        while not self._lock.acquire(blocking=False):  # a call from another thread runs: wait, the loop keeps going
            await asyncio.sleep(0.005)
        try:
            yield
        finally:
            self._lock.release()

    def _cancel(self) -> None:
        # The caller stopped reading: stop generating, then drain what is in flight so the next call starts clean.
        try:
            self._send({"op": "cancel"})
            while self._recv(self.token_timeout, during="cancelling")[0] not in _CALL_ENDS:
                pass
        except MeshError:
            pass

    async def _acancel(self) -> None:
        try:
            self._send({"op": "cancel"})
            while (await self._arecv(self.token_timeout, during="cancelling"))[0] not in _CALL_ENDS:
                pass
        except MeshError:
            pass

    def _send(self, msg: dict) -> None:
        if self._closing:
            raise ModelClosed("the model was closed; load it again")
        if not self.alive:
            raise self._failure("the engine is not running")
        try:
            _write_frame(self._proc.stdin.fileno(), msg)
        except OSError:
            raise self._failure("the engine stopped accepting requests") from None

    def _recv(self, timeout: float, during: str) -> tuple:
        deadline = time.monotonic() + max(timeout, 0.0)
        for wait in self._waits(deadline):
            try:
                return self._reader.read(timeout=wait)
            except TimeoutError:
                if (lost := self._watch(deadline, timeout, during)) is not None:
                    raise lost from None
            except EOFError as exc:
                raise self._lost(exc, timeout, during) from None
        raise AssertionError("unreachable")

    async def _arecv(self, timeout: float, during: str) -> tuple:
        deadline = time.monotonic() + max(timeout, 0.0)
        for wait in self._waits(deadline):
            try:
                return await self._reader.aread(timeout=wait)
            except TimeoutError:
                # The watchdog and the culprit's probe use the network: not in the event loop.
                if (lost := await asyncio.to_thread(self._watch, deadline, timeout, during)) is not None:
                    raise lost from None
            except EOFError as exc:
                raise await asyncio.to_thread(self._lost, exc, timeout, during) from None
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
        suspect = self.watchdog() if self.watchdog is not None else None
        if suspect is None:
            return None
        machine, why = suspect
        self._kill()
        endpoint = next((s.endpoint for s in self.spec.stages if s.machine_id == machine), None)
        lost = WorkerLost(f"machine {machine} {why} while {during}; the session must be reloaded on the remaining "
                          "machines", machine=machine, endpoint=endpoint)
        lost.alive = True  # its processes may still exist (stopped, cut off): not a crash to diagnose
        return lost

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
        """Turn a dead or hung engine into a typed error that names the machine that caused it, when known."""
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

    def close(self) -> None:
        """Stop the child (politely, then by force) and remove its log. A call running in another thread (or task)
        ends with ``ModelClosed``: the child stops between two tokens, and the pipes are closed only once that call
        has let go of the engine."""
        self._closing = True
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(Exception):
                _write_frame(proc.stdin.fileno(), {"op": "close"})
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
        # A call in another thread reads the child's exit and lets go at once; one on this thread's own event loop
        # cannot: after a short wait, leave its pipe open (the garbage collector closes it) rather than pull it away.
        idle = self._lock.acquire(timeout=2.0)
        try:
            for f in (proc.stdin, proc.stdout) if idle else (proc.stdin,):
                with contextlib.suppress(Exception):
                    f.close()
        finally:
            if idle:
                self._lock.release()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)
        self._proc = None


class _StreamedCall:
    """The messages of one streamed call, as ``Engine.stream`` and ``Engine.astream`` read them."""

    def __init__(self, engine: Engine, on_accepted: Callable[[], None] | None):
        self.engine, self.on_accepted = engine, on_accepted
        self.timeout = engine.load_timeout  # the first chunk waits for the prompt; later ones for one decode step
        self.finished = False  # the engine ended the call (done or error): nothing to cancel
        engine.generated = 0

    def take(self, msg: tuple) -> dict | None:
        """The chunk a message carries, else None; raises the engine's error."""
        kind = msg[0]
        if kind == "chunk":
            self.timeout = self.engine.token_timeout
            self.engine.generated = msg[2]
            return msg[1]
        if kind in ("done", "error"):
            self.finished = True
            if kind == "error":
                raise _rebuild(msg[1], msg[2], self.engine.spec)
            self.engine.generated = msg[1]
        elif kind == "accepted" and self.on_accepted is not None:
            self.on_accepted()
        return None


_CALL_ENDS = ("done", "error", "result")  # the messages that end a call: the engine is idle after them
_NO_RESULT = object()


def _result(msg: tuple, spec: EngineSpec) -> Any:
    """What a non-streamed call's message means: its result, ``_NO_RESULT`` (not the end yet), or the error raised."""
    if msg[0] == "result":
        return msg[1]
    if msg[0] == "error":
        raise _rebuild(msg[1], msg[2], spec)
    return _NO_RESULT


async def _to_the_end(work: Any) -> None:
    """Await ``work`` to its end even if the awaiting task is cancelled meanwhile (then re-raise the cancellation)."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
        raise


def first_failing_stage(stages: list[EngineStage], timeout: float) -> tuple[EngineStage, str, Exception] | None:
    """Probe each rpc-server of ``stages`` once (:func:`probe_stage`); the first that fails, with how: ``"timeout"``
    (it accepted but did not answer: busy or hung), ``"token"`` (its relay refused the token) or ``"unreachable"``.
    None when every server answers."""
    from sharedllm.relay import TokenError

    for stage in {s.endpoint: s for s in stages}.values():
        try:
            probe_stage(stage, timeout=timeout)
        except TimeoutError as exc:
            return stage, "timeout", exc
        except TokenError as exc:
            return stage, "token", exc
        except OSError as exc:
            return stage, "unreachable", exc
    return None


def _probe_stages(spec: EngineSpec) -> tuple[str, str] | None:
    """After the engine is gone, find the rpc-server that refuses or hangs. None when every server answers."""
    failed = first_failing_stage(spec.stages, timeout=3.0)
    if failed is None:
        return None
    stage, how, exc = failed
    state = {"timeout": "stopped answering", "unreachable": "is unreachable"}.get(how)
    return stage.endpoint, state or f"refused the session's token ({exc.reason})"


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
    return EngineError(message)


# --- child side --------------------------------------------------------------------------------------------------


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(0.5)


# The output layer's tensors (its norm, and the projection: ``output.weight``, or ``token_embd.weight`` loaded a second
# time when the embeddings are tied) as a ``tensor_buft_overrides`` pattern. With them on the client's CPU the mesh's
# last machine returns the final hidden state (n_embd floats) instead of the logits (n_vocab floats: 1 MiB a token
# for a 262k vocabulary) and holds neither the projection nor the logits' compute buffer; the client computes the
# projection with the same CPU kernels an rpc-server would, so greedy output is unchanged. Tied embeddings cost the
# client no extra weight memory: the duplicate maps the same file pages as the input embeddings.
OUTPUT_ON_CLIENT = r"^(output|output_norm|token_embd)\.weight$"


def build_llama(model_path: str, *, devices: list[int] = (), use_extra_bufts: bool = False, progress=None,
                output_on_client: bool = False, **kwargs):
    """Construct ``llama_cpp.Llama`` with the model parameters its constructor does not expose.

    ``devices`` (raw ggml device handles) become ``llama_model_params.devices``; ``use_extra_bufts=False`` gives the
    CPU kernels an rpc-server uses, which makes local greedy output the oracle for mesh output (see NOTES).
    ``output_on_client`` keeps the output layer on this process's CPU (:data:`OUTPUT_ON_CLIENT`).
    Call it in a process that may die: with RPC devices llama.cpp aborts on a lost server.
    """
    import ctypes

    import llama_cpp
    import llama_cpp.llama_cpp as lib

    class _Override(ctypes.Structure):  # struct llama_model_tensor_buft_override
        _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

    dev_array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
    overrides = None
    if output_on_client and devices:
        from sharedllm import ggml

        overrides = (_Override * 2)(_Override(OUTPUT_ON_CLIENT.encode(), ggml.cpu_buffer_type()), _Override(None, None))
    original = lib.llama_model_default_params

    def patched():
        params = original()
        if devices:
            params.devices = ctypes.cast(dev_array, ctypes.c_void_p)
        if overrides is not None:
            params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        params.use_extra_bufts = use_extra_bufts
        if progress is not None:
            params.progress_callback = progress
        return params

    kwargs.setdefault("verbose", False)
    lib.llama_model_default_params = patched
    try:
        llm = llama_cpp.Llama(model_path=model_path, **kwargs)
    finally:
        lib.llama_model_default_params = original
    llm._sharedllm_keepalive = (dev_array, overrides, progress)  # the C side keeps pointers to them
    if "chat_format" not in kwargs and "chat_handler" not in kwargs:
        fallback = _fallback_chat_format(llm.metadata)
        if fallback:
            llm.chat_format = fallback  # create_chat_completion resolves the format by name at call time
    return llm


def _build_llama(spec: EngineSpec, out_fd: int, phases: dict[str, float]):
    """Build the engine's ``Llama``. ``phases`` receives monotonic timestamps: ``imported`` (llama-cpp-python),
    ``connected`` (every rpc-server added), ``weights_start``/``weights_end`` (first and last progress callback: the
    weights being uploaded, or mapped for a local model) and ``built`` (context created)."""
    import ctypes

    import llama_cpp  # noqa: F401  (numpy, jinja2, the chat formats: a fixed cost worth seeing on its own)

    from sharedllm import ggml

    phases["imported"] = time.monotonic()
    handles: list[int] = []
    devices: list[dict] = []
    servers: dict[str, list] = {}
    local = _open_tunnels(spec)
    for st in spec.stages:
        if st.endpoint not in servers:
            servers[st.endpoint] = ggml.add_server(local.get(st.endpoint, st.endpoint))
        devs = servers[st.endpoint]
        if st.device_index >= len(devs):
            raise RuntimeError(f"rpc-server {st.endpoint} has {len(devs)} device(s), no device {st.device_index}")
        dev, h = devs[st.device_index]
        handles.append(h)
        devices.append({"endpoint": st.endpoint, "machine_id": st.machine_id, **dev.to_dict()})
    phases["connected"] = time.monotonic()

    @ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_float, ctypes.c_void_p)
    def progress(fraction, _user):
        now = time.monotonic()
        phases.setdefault("weights_start", now)
        phases["weights_end"] = now
        _write_frame(out_fd, ("progress", float(fraction)))
        return True

    kwargs = dict(spec.llama_kwargs)
    if handles:
        kwargs["n_gpu_layers"] = -1
        kwargs["tensor_split"] = spec.tensor_split or None
        if spec.output_on_client:
            # The projection is the client's largest matmul (Gemma 3 270M: 168M of its 268M weights); llama-cpp-python
            # would give it half the cores. The rest of a token's time the client waits on the network.
            kwargs.setdefault("n_threads", os.cpu_count() or 1)
    llm = build_llama(spec.model_path, devices=handles, use_extra_bufts=spec.use_extra_bufts, progress=progress,
                      output_on_client=spec.output_on_client, **kwargs)
    phases["built"] = time.monotonic()
    return llm, devices


def _phase_seconds(started_at: float, init_at: float, marks: dict[str, float]) -> dict[str, float]:
    """Durations of the child's load phases from its timestamps (see ``_build_llama``); ``started_at`` stays a
    timestamp, for the parent to turn into the spawn time (interpreter start and imports before ``_child_main``)."""
    order = [("init", init_at), *((k, marks[k]) for k in ("imported", "connected", "weights_start", "weights_end",
                                                             "built") if k in marks)]
    names = {"imported": "import", "connected": "connect", "weights_start": "model_metadata",
             "weights_end": "weights", "built": "context"}
    out = {"started_at": started_at, "wait_init": init_at - started_at}
    for (_, prev), (key, t) in itertools.pairwise(order):
        out[names[key]] = t - prev
    return out


_TUNNELS: list = []  # the engine's client relays: they live as long as the engine process


def _open_tunnels(spec: EngineSpec) -> dict[str, str]:
    """Start a client relay for every stage behind a relay; ``{machine endpoint: local endpoint}`` for llama.cpp.

    The tokens were checked by the parent (:func:`probe_stage`) just before; a relay that refuses now would make
    llama.cpp abort, which the parent turns into ``WorkerLost`` like any other lost machine."""
    local: dict[str, str] = {}
    for st in spec.stages:
        if st.relay and st.endpoint not in local:
            cr = st.client_relay().start()
            _TUNNELS.append(cr)
            local[st.endpoint] = cr.endpoint
    return local


def _fallback_chat_format(metadata: dict[str, str]) -> str | None:
    """A chat format for GGUFs that carry no ``tokenizer.chat_template`` (llama-cpp-python would pick llama-2).

    ``metadata`` is ``Llama.metadata``: the scalar keys llama.cpp read while loading, so the file is not parsed twice.
    """
    if metadata.get("tokenizer.chat_template"):
        return None
    arch = metadata.get("general.architecture") or ""
    return "gemma" if arch.startswith("gemma") else None


def _child_main(parent_pid: int) -> int:
    started_at = time.monotonic()
    # Frames go out on a private copy of stdout; anything else printed (llama.cpp, Python) lands in the log (stderr).
    out_fd = os.dup(1)
    os.dup2(2, 1)
    in_fd = 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s engine %(levelname)s %(message)s")
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    reader = _FrameReader(in_fd)
    try:
        init = reader.read()
    except EOFError:
        return 0
    spec: EngineSpec = init["spec"]
    t0 = time.perf_counter()
    init_at = time.monotonic()
    marks: dict[str, float] = {}
    try:
        llm, devices = _build_llama(spec, out_fd, marks)
    except ValueError as exc:  # llama-cpp-python: "Failed to load model from file"
        _write_frame(out_fd, ("error", "model", str(exc)))
        return 1
    except Exception as exc:
        _write_frame(out_fd, ("error", "engine", f"{type(exc).__name__}: {exc}"))
        return 1
    info = {
        "load_seconds": time.perf_counter() - t0,
        "phases": _phase_seconds(started_at, init_at, marks),
        "devices": devices,
        "n_ctx": llm.n_ctx(),
        "n_vocab": llm.n_vocab(),
        "pid": os.getpid(),
        "metadata": dict(llm.metadata),
    }
    _write_frame(out_fd, ("ready", info))
    while True:
        try:
            msg = reader.read()
        except EOFError:
            return 0
        op = msg.get("op")
        if op == "close":
            return 0
        if op != "call":  # a late "cancel" for a call that already ended needs no answer
            continue
        fn = getattr(llm, msg["method"])
        if not spec.reuse_prompt_cache:
            llm.reset()
        with _Call(llm, reader, out_fd) as call:
            try:
                if not msg["stream"]:
                    end = ("result", fn(**msg["kwargs"]))
                else:
                    for chunk in fn(**msg["kwargs"], stream=True):
                        _write_frame(out_fd, ("chunk", chunk, call.tokens))
                        if call.stopped():
                            break
                    end = ("done", call.tokens)
            except (ValueError, TypeError) as exc:  # bad arguments, prompt longer than the context...
                end = ("error", "value", str(exc))
            except Exception as exc:
                end = ("error", "engine", f"{type(exc).__name__}: {exc}")
        if call.stop == "close":  # closed mid-call: no answer, the parent takes the exit for the end of the model
            return 0
        _write_frame(out_fd, end)


class _Call:
    """One request in the engine child, around ``Llama.generate`` (which llama-cpp-python's completion methods call
    once per request, after their checks: context length, logprobs...):

    - it writes an ``("accepted",)`` frame when generation starts: from then on the request can only fail in the
      engine itself, and the OpenAI endpoint sends its response headers (so the client's work on them overlaps the
      prompt's evaluation);
    - it counts the tokens generated (end-of-generation tokens excluded, as in ``usage.completion_tokens``): the
      parent reports tokens, not stream chunks;
    - between two tokens it reads a ``cancel`` (or ``close``) from the parent and stops generating, streamed or not:
      llama-cpp-python then ends the request as it would at ``max_tokens``.
    """

    def __init__(self, llm: Any, reader: _FrameReader, out_fd: int):
        self.llm, self.reader, self.out_fd = llm, reader, out_fd
        self.tokens = 0
        self.stop: str | None = None  # "cancel" or "close" once the parent asked

    def stopped(self) -> bool:
        """Whether the parent asked to stop (reads what it sent meanwhile, without waiting)."""
        while self.stop is None and self.reader.ready():
            op = self.reader.read().get("op")
            if op in ("cancel", "close"):
                self.stop = op
        return self.stop is not None

    def _generate(self, *args: Any, **kwargs: Any) -> Iterator[int]:
        import llama_cpp

        self.llm.__dict__.pop("generate", None)  # once per request
        _write_frame(self.out_fd, ("accepted",))
        vocab = self.llm._model.vocab
        for token in self._original(*args, **kwargs):
            if self.stopped():
                return
            if not llama_cpp.llama_vocab_is_eog(vocab, token):
                self.tokens += 1
            yield token

    def __enter__(self) -> _Call:
        self._original = self.llm.generate
        self.llm.generate = self._generate
        return self

    def __exit__(self, *exc: Any) -> None:
        self.llm.__dict__.pop("generate", None)


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid()))
