# SPDX-License-Identifier: AGPL-3.0-or-later
"""What an engine loads and where: its stages (one device of one rpc-server each) and the probes of those servers."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from sharedllm.options import DRAFT_MAX


@dataclass(frozen=True)
class EngineStage:
    """One device the engine loads layers onto: device ``device_index`` of the rpc-server at ``endpoint``.

    ``relay``: ``{"token": ..., "fingerprint": ...}`` (and ``"hub"``, ``"via_hub"`` for a machine registered at the
    relay hub, see :class:`sharedllm.relay.ClientRelay`) when ``endpoint`` is the machine's relay (the default): the
    engine then tunnels to it (:class:`sharedllm.relay.ClientRelay`, in the engine process, where no other Python
    work competes for the GIL while llama.cpp waits on the network) and llama.cpp connects to the tunnel's local end.
    """

    endpoint: str
    device_index: int = 0
    machine_id: str = ""
    cpu: bool = False  # the device is the machine's CPU (its client relay answers allocation sizes for it)
    relay: dict | None = field(default=None, compare=False, hash=False, repr=False)  # holds a secret token

    def client_relay(self, **kwargs: Any):
        """A :class:`sharedllm.relay.ClientRelay` to this stage's machine, with its token and pinned certificate
        (``kwargs``: the relay's options, ``cpu_devices`` for one)."""
        from sharedllm.relay import ClientRelay

        return ClientRelay(self.endpoint, self.relay["token"], fingerprint=self.relay["fingerprint"],
                           hub=self.relay.get("hub"), via_hub=self.relay.get("via_hub", False), **kwargs)


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
    # False: the same CPU kernels as an rpc-server (see NOTES, the oracle). Fast batches (unified_kv) take llama.cpp's
    # default kernels (repacked weights) whatever this says.
    use_extra_bufts: bool = False
    # False: every request starts from an empty context. Reusing a cached prompt prefix re-evaluates the last prompt
    # token alone, and a batch of one takes other kernels than the full prompt: greedy text can then differ from a
    # fresh run. True trades that reproducibility for speed on long shared prefixes (chat).
    reuse_prompt_cache: bool = False
    # True: a request keeps the cells of the context that its prompt shares with an earlier one's wherever that
    # leaves its text as it is alone (those written by the passes a fresh context would make; fast batches: any), and
    # reads only the rest: a chat's history is not read again every turn. False: every request reads its whole prompt.
    prompt_cache: bool = True
    output_on_client: bool = False  # see OUTPUT_ON_CLIENT
    # Sequences decoded together (continuous batching, sharedllm.engine.batch); 1: one request at a time through
    # llama-cpp-python's own generate. llama_kwargs["n_ctx"] is each sequence's context.
    parallel: int = 1
    prefill_chunk: int = 0  # prompt tokens evaluated per step of the batch; 0: n_batch
    # While sequences are decoding, a step reads no more prompt tokens than keep it within this or two decode-only
    # steps' time, whichever is longer (measured as it goes; at least sharedllm.engine.batch.MIN_PREFILL): a long
    # prompt does not freeze the running streams. 0: no limit but prefill_chunk.
    max_stall_ms: float = 500.0
    max_waiting: int = 64  # requests that may wait for a sequence of the batch; more get ModelBusy
    # True: a decode step holds no more sequences than leave each one's arithmetic as it is alone (measured at load:
    # sharedllm.engine.invariance), so a batched greedy request yields its solo text. False: llama-server's way, one
    # KV cache shared by the sequences and one pass per step, every running sequence's next token and the waiting
    # prompts together (faster, first tokens sooner; a batched text may differ from its solo text).
    exact_batches: bool = True
    # What an earlier engine of this session measured of these machines' kernels (sharedllm.engine.invariance; the
    # engine's "ready" info gives it): a recovery onto machines that took part in that session takes it instead of
    # measuring again before its replay (0.6-2.3 s). None: taken from the disk where an earlier load kept them
    # (sharedllm.engine.measures), else measured at load.
    invariance: dict | None = None
    # The key under which the measures are kept on disk between loads (sharedllm.engine.measures.key, made by the
    # client, once its kernels' fingerprint is known). None: measured at every load.
    measures_key: str | None = None
    # Benchmarks and tools: ``("module:function", sys.path entry or None, kwargs)``, called in the engine process with
    # the local endpoint of every machine and the engine's client relays before llama.cpp connects; it returns the
    # endpoints to connect to instead (bench/linkem.py puts an emulated link there). None: nothing between.
    tunnel_hook: tuple[str, str | None, dict] | None = None
    # Speculative decoding (sharedllm.engine.speculative): "lookup" (n-gram prompt lookup), the path of a draft model
    # (a GGUF with the target's vocabulary, run on this machine's CPU), a drafter of one's own as a hook
    # ("module:function", sys.path entry, kwargs) called with this spec in the engine and returning a
    # speculative.Drafter, or None; the most drafts a sequence takes in one step (the engine takes fewer where a pass
    # would change its kernels, and as drafting pays).
    draft: str | tuple[str, str | None, dict] | None = None
    draft_max: int = DRAFT_MAX
    draft_min: int = 0  # the fewest drafts a sequence takes when its drafter offers them (paying or not)
    # The bytes of tensor data in the GGUF (what llama.cpp's load progress counts), from the header the client read
    # already; None: the child reads the header for it.
    tensor_bytes: int | None = None

    @property
    def unified_kv(self) -> bool:
        """Fast batches: one KV cache shared by the sequences (``kv_unified``, see ``sharedllm.engine.batch``)."""
        return self.parallel > 1 and not self.exact_batches


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


def probe_stages(spec: EngineSpec) -> tuple[str, str] | None:
    """After the engine is gone, find the rpc-server that refuses or hangs. None when every server answers."""
    failed = first_failing_stage(spec.stages, timeout=3.0)
    if failed is None:
        return None
    stage, how, exc = failed
    state = {"timeout": "stopped answering", "unreachable": "is unreachable"}.get(how)
    return stage.endpoint, state or f"refused the session's token ({exc.reason})"

