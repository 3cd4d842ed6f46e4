# SPDX-License-Identifier: AGPL-3.0-or-later
"""How a model is loaded on the mesh, as one value: :class:`LoadOptions`, shared by ``Mesh.load`` and ``Mesh.plan``,
``Replicas``, the command line and ``sharedllm serve``. No Dask.

    opts = LoadOptions(n_ctx=4096, parallel=8, machines=("a", "b"))
    mesh.load("gemma-3-270m", options=opts)                # or mesh.load("gemma-3-270m", n_ctx=4096, parallel=8)

Keyword arguments that are not options go to ``llama_cpp.Llama`` in the engine (``n_threads``, ``seed``, ...):
:meth:`LoadOptions.build` keeps them in ``llama``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

OUTPUT_LAYERS = ("auto", "client", "mesh")
STRATEGIES = ("spread", "pack")
PRIVACY = ("any", "trusted")
# The most drafts a sequence takes in a step, by default (llama-server's --draft-max is 16). The adaptive length takes
# fewer as they pay (sharedllm.engine.drafting); a pass of draft_max + 1 rows is measured exact at load, and fewer
# where that measure finds a pass of that many rows computes otherwise. Behind a link a long quote pays for long
# drafts: Gemma 3 270M, RTT 20 ms, the rewrite workload with lookup: 54-72 tok/s at 16, 70-85 at 32, 68-81 at 64
# (a pass of 64 rows changes kernels on a CPU: 63 rows measured exact).
DRAFT_MAX = 32
# Flash attention, llama-server's default (it picks it on CPUs and GPUs alike): on 2 CPU cores one stream decoded 8%
# faster with it through the mesh. The oracle of every greedy text is local llama-cpp-python with the same parameters
# (sharedllm.engine.build_llama defaults to it as well); flash_attn=False loads without it.
FLASH_ATTN = True


@dataclass(frozen=True)
class LoadOptions:
    """Everything ``Mesh.load`` takes besides the model (see its docstring for what each option does)."""

    n_ctx: int = 2048  # tokens of context of each sequence
    # --- placement: where the layers go ---
    strategy: str = "spread"
    headroom: float = 0.10
    machines: tuple[str, ...] | None = None
    max_devices: int | None = None
    privacy: str = "any"
    min_trust: float | None = None
    labels: dict[str, str] | None = None
    output_layer: str = "auto"
    # --- serving: how the engine runs requests ---
    parallel: int = 1
    max_waiting: int = 64
    exact_batches: bool = True
    max_stall_ms: float = 500.0
    prompt_cache: bool = True
    # Speculative decoding: "lookup" (n-gram prompt lookup), a draft model (a path, URL or catalog name; Mesh.load
    # makes it a sharedllm.models.Model, run on this machine's CPU), or None; and the most drafts per step.
    draft: Any = None
    draft_max: int = DRAFT_MAX
    draft_min: int = 0  # the fewest drafts a sequence takes when its drafter offers them, paying or not
    # Benchmarks: a function the engine calls with its tunnel to every machine (see EngineSpec.tunnel_hook;
    # bench/linkem.py's hook(rtt_ms=20) emulates a link there)
    tunnel_hook: tuple[str, str | None, dict] | None = None
    # Other users of the mesh may have this model generate for them (a server's: ``sharedllm serve``), each admitted
    # under their own limits and bans and charged their own tokens (``admit_as=`` on a request).
    shared: bool = False
    # --- resilience: waits, timeouts and recoveries ---
    wait_timeout: float = 60.0
    load_timeout: float = 600.0
    token_timeout: float = 60.0
    max_recoveries: int = 3
    # --- llama_cpp.Llama's own arguments (n_threads, n_batch, seed, chat_format, ...) ---
    llama: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.n_ctx, int) or isinstance(self.n_ctx, bool) or self.n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive number of tokens (each sequence's context), got {self.n_ctx!r}")
        if not isinstance(self.parallel, int) or isinstance(self.parallel, bool) or self.parallel < 1:
            raise ValueError(f"parallel must be an integer >= 1, got {self.parallel!r}")
        if self.output_layer not in OUTPUT_LAYERS:
            raise ValueError(f"output_layer must be one of {', '.join(OUTPUT_LAYERS)}, got {self.output_layer!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.privacy not in PRIVACY:
            raise ValueError(f"privacy must be one of {', '.join(PRIVACY)}, got {self.privacy!r}")
        if not isinstance(self.draft_max, int) or isinstance(self.draft_max, bool) or self.draft_max < 1:
            raise ValueError(f"draft_max must be an integer >= 1 (the most drafts per step), got {self.draft_max!r}")
        if not isinstance(self.draft_min, int) or not 0 <= self.draft_min <= self.draft_max:
            raise ValueError(f"draft_min must be an integer from 0 to draft_max ({self.draft_max}), "
                             f"got {self.draft_min!r}")
        if self.draft is not None and self.llama.get("flash_attn") is False:
            raise ValueError("a draft needs flash attention (its verification passes keep the arithmetic of one token "
                             "at a time only with it): drop flash_attn=False, or the draft")
        if self.max_recoveries < 0:
            raise ValueError(f"max_recoveries must be >= 0, got {self.max_recoveries}")
        if self.machines is not None:
            if isinstance(self.machines, str):
                raise ValueError(f"machines must be a list of machine ids, got the string {self.machines!r}")
            object.__setattr__(self, "machines", tuple(self.machines) or None)
        if self.labels is not None:
            object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "llama", dict(self.llama))

    @classmethod
    def build(cls, options: LoadOptions | None = None, **kwargs: Any) -> LoadOptions:
        """``options`` (or the defaults) with ``kwargs`` on top: those naming an option set it, the others go to
        ``llama_cpp.Llama`` (``llama``)."""
        base = options or cls()
        names = {f.name for f in dataclasses.fields(cls)} - {"llama"}
        ours = {k: v for k, v in kwargs.items() if k in names}
        llama = {**base.llama, **kwargs.get("llama", {}), **{k: v for k, v in kwargs.items()
                                                             if k not in names and k != "llama"}}
        return dataclasses.replace(base, **ours, llama=llama)

    def replace(self, **changes: Any) -> LoadOptions:
        return dataclasses.replace(self, **changes)

    @property
    def context(self) -> int:
        """The tokens of context of all ``parallel`` sequences together, for the memory estimate."""
        return self.n_ctx * self.parallel

    def placement(self) -> dict[str, Any]:
        """What the scheduler's planning takes (``sharedllm_plan``/``sharedllm_acquire`` arguments)."""
        return {"strategy": self.strategy, "headroom": self.headroom,
                "machines": list(self.machines) if self.machines else None, "max_devices": self.max_devices,
                "privacy": self.privacy, "min_trust": self.min_trust, "labels": self.labels}

    def llama_kwargs(self) -> dict[str, Any]:
        """``llama_cpp.Llama``'s arguments in the engine: flash attention unless ``flash_attn=False`` (a draft needs
        it: see ``engine.speculative``)."""
        return {"n_ctx": self.n_ctx, "flash_attn": FLASH_ATTN, **self.llama}

    @property
    def draft_ref(self) -> str | None:
        """What the engine drafts with: ``"lookup"``, a draft model's local path, or None."""
        if self.draft is None or isinstance(self.draft, (str, tuple)):
            return self.draft
        return str(getattr(self.draft, "path", self.draft))

    def engine_options(self) -> dict[str, Any]:
        """The ``EngineSpec`` fields these options set beside the model, its stages and ``llama_kwargs``."""
        return {"parallel": self.parallel, "max_waiting": self.max_waiting, "exact_batches": self.exact_batches,
                "max_stall_ms": self.max_stall_ms, "prompt_cache": self.prompt_cache, "tunnel_hook": self.tunnel_hook,
                "draft": self.draft_ref, "draft_max": self.draft_max, "draft_min": self.draft_min}
