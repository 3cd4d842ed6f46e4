# SPDX-License-Identifier: AGPL-3.0-or-later
"""Memory estimate. ``estimate_memory`` turns a GGUF file's tensor table into what each llama.cpp layer slot needs on
a mesh device: weights, KV cache and compute buffers."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sharedllm.gguf.reader import (
    BLOCK_NAME,
    GGUFFile,
    int_param,
    per_layer,
    ties_embeddings,
)


@dataclass(frozen=True)
class ModelEstimate:
    """What a model needs on the devices of a mesh, per layer slot.

    llama.cpp splits ``n_layer + 1`` slots over the devices: the repeating layers ``0..n_layer-1`` and the output
    layer (slot ``n_layer``). The input layer (token embeddings) always stays on the client's CPU.
    """

    path: str
    architecture: str
    n_layer: int
    n_ctx: int
    layer_weight_bytes: tuple[int, ...]  # len n_layer
    layer_kv_bytes: tuple[int, ...]  # len n_layer, KV cache for n_ctx
    output_bytes: int  # slot n_layer: output norm + output projection (a copy of token_embd when tied)
    input_bytes: int  # stays on the client
    compute_bytes: int  # the most a device's compute buffer needs, whichever layers it holds
    file_bytes: int
    # True: the output layer (norm and projection) runs on the client's CPU; slot n_layer holds nothing on the mesh.
    output_on_client: bool = False
    # What the device holding the output slot may need on top of compute_bytes: the logits beyond the layers' own
    # peak. compute_bytes and output_compute_bytes bound every stage (placement plans with them); ``buffers`` says
    # what each stage needs exactly (stage_compute_bytes).
    output_compute_bytes: int = 0
    buffers: ComputeBuffers | None = None

    def stage_compute_bytes(self, first_slot: int, end_slot: int, n_stages: int) -> int:
        """The compute buffer llama.cpp reserves on the device holding slots ``[first_slot, end_slot)`` of a split
        into ``n_stages`` stages. Without ``buffers`` (an estimate made by hand): the bound placement plans with."""
        has_output = end_slot == self.n_layer + 1
        if self.buffers is None:
            return self.compute_bytes + (self.output_compute_bytes if has_output else 0)
        return self.buffers.stage_bytes(range(first_slot, min(end_slot, self.n_layer)), has_output,
                                        first=first_slot == 0, n_stages=n_stages)

    def slot_bytes(self) -> tuple[int, ...]:
        """Bytes per slot (weights + KV), ``n_layer + 1`` entries, the output layer last."""
        pairs = zip(self.layer_weight_bytes, self.layer_kv_bytes, strict=False)
        return (*(w + k for w, k in pairs), self.output_bytes)

    @property
    def device_bytes(self) -> int:
        """Everything that lands on mesh devices, without the per-device compute buffers."""
        return sum(self.slot_bytes())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelEstimate:
        d = dict(d)
        d["layer_weight_bytes"] = tuple(d["layer_weight_bytes"])
        d["layer_kv_bytes"] = tuple(d["layer_kv_bytes"])
        if d.get("buffers") is not None:
            d["buffers"] = ComputeBuffers.from_dict(d["buffers"])
        return cls(**d)


@dataclass(frozen=True)
class ComputeBuffers:
    """What sets the compute buffer llama.cpp reserves on each stage of a split, in bytes (see ``_compute_buffers``).

    ggml's scheduler cuts the graph where the device changes. Each stage receives its inputs (from the client's CPU,
    or the previous device) into tensors of its own compute buffer; under pipeline parallelism (several devices, the
    output layer on the mesh) it keeps ``n_copies`` copies of each, for the whole graph. Beside them lies the peak of
    the stage's own tensors, which ggml-alloc reuses as the graph runs.
    """

    n_copies: int  # copies of every stage input: 4 under pipeline parallelism, else 1
    hidden: int  # one hidden state of the micro-batch (n_embd x n_ubatch F32)
    positions: int  # the token positions, received by every stage with layers
    attention_inputs: tuple[int, ...]  # per attention kind (one per KV cache): its KQ mask and K and V row indices
    layer_attention: tuple[int, ...]  # per layer: the index of its attention kind
    output_ids: int  # the rows to output, received by the stage with the last layer
    attention_peak: int  # a layer's own peak during attention
    feed_forward_peak: int  # a layer's own peak during the feed-forward
    output_peak: int  # the output layer's own peak: its norm and the logits (0: the output layer is on the client)

    def stage_bytes(self, layers: range, has_output: bool, first: bool, n_stages: int) -> int:
        """The compute buffer of a stage holding ``layers`` (and the output slot when ``has_output``).

        The inputs, from llama.cpp's graph split (``GGML_SCHED_DEBUG=1`` lists them per split):
        - the first stage receives the token embeddings from the client; every later stage with layers receives
          two hidden states, because the scheduler runs the next layer's input norm on the device before it: the
          residual stream (``l_out``) and its norm. A stage holding only the output layer receives its norm;
        - every stage with layers receives the positions, and for each attention kind its layers use (Gemma 3: the
          sliding-window cache, the global one, or both) the KQ mask and the K and V row indices;
        - the stage with the last layer receives the ids of the rows to output.
        With one copy (no pipeline parallelism) an input copy is freed after its last use: the hidden states are
        then part of the layers' peak, and the other inputs are gone by the feed-forward of a stage's only layer.
        A stage holding only the output slot of an output layer on the client gets no compute buffer at all.
        """
        copies = self.n_copies if n_stages > 1 else 1
        if not layers and not (has_output and self.output_peak):
            return 0
        kinds = {self.layer_attention[i] for i in layers}
        received = self.positions + sum(self.attention_inputs[k] for k in kinds) if layers else 0
        if layers and layers[-1] == len(self.layer_attention) - 1:
            received += self.output_ids
        # Beside the last layers the logits land above two holes those layers leave.
        output = self.output_peak + (2 * self.hidden if layers else 0) if has_output and self.output_peak else 0
        if copies > 1:
            hidden = self.hidden * (1 if first or not layers else 2)
            return copies * (hidden + received) + max(self.layer_peak if layers else 0, output)
        if len(layers) == 1:
            return max(received + self.attention_peak, self.feed_forward_peak, output)
        return max(received + self.layer_peak, output)

    @property
    def layer_peak(self) -> int:
        """A layer's own peak: attention or feed-forward, whichever is larger."""
        return max(self.attention_peak, self.feed_forward_peak)

    def bound(self) -> tuple[int, int]:
        """(what any stage with layers needs at most, what the stage with the output slot may need on top of it):
        a later stage with every attention kind and the last layer; the logits beyond the layers' peak."""
        every = range(len(self.layer_attention))
        layers = self.stage_bytes(every, False, first=False, n_stages=2)
        output = self.output_peak + 2 * self.hidden if self.output_peak else 0
        return layers, max(0, output - self.layer_peak)

    @classmethod
    def from_dict(cls, d: dict) -> ComputeBuffers:
        d = dict(d)
        d["attention_inputs"] = tuple(d["attention_inputs"])
        d["layer_attention"] = tuple(d["layer_attention"])
        return cls(**d)





def estimate_memory(gguf: GGUFFile, n_ctx: int, *, n_ubatch: int = 512, kv_type_bytes: int = 2,
                    output_on_client: bool = False) -> ModelEstimate:
    """Bytes per llama.cpp layer slot for a context of ``n_ctx`` tokens (F16 KV cache by default).

    ``output_on_client``: the output layer stays on the client (see ``sharedllm.engine.OUTPUT_ON_CLIENT``): its
    slot weighs nothing on the mesh, the projection's bytes count as the client's (none when tied: the client maps
    token_embd anyway), and no mesh device holds the logits, the largest part of a compute buffer for a big vocabulary.
    """
    if n_ctx < 1 or n_ubatch < 1 or kv_type_bytes <= 0:
        raise ValueError(f"n_ctx {n_ctx}, n_ubatch {n_ubatch} and kv_type_bytes {kv_type_bytes} must be positive")
    n_layer = gguf.n_layer
    layer_weights = [0] * n_layer
    output = input_ = 0
    for t in gguf.tensors:
        m = BLOCK_NAME.match(t.name)
        if m:
            layer_weights[int(m[1])] += t.nbytes
        elif t.name.startswith(("output.", "output_norm.")):
            output += t.nbytes
        else:
            input_ += t.nbytes  # token_embd and the other global tensors stay on the client's CPU
    token_embd = gguf.tensor("token_embd.weight")
    if ties_embeddings(gguf) and not output_on_client:
        # Tied embeddings (Gemma...): llama.cpp loads a second copy of token_embd on the output layer's device.
        output += token_embd.nbytes
    if output_on_client:
        input_ += output
        output = 0

    n_embd = int_param(gguf, "embedding_length")
    n_heads = per_layer(gguf, "attention.head_count", 0)
    has_kv = gguf.get("attention.head_count_kv") is not None  # llama.cpp defaults it to head_count
    n_heads_kv = per_layer(gguf, "attention.head_count_kv", 0) if has_kv else n_heads
    n_head = max(n_heads)
    default_head_dim = n_embd // n_head if n_head else 0
    head_k = int_param(gguf, "attention.key_length", default_head_dim)
    head_v = int_param(gguf, "attention.value_length", default_head_dim)
    # Every layer gets the full n_ctx, sliding-window layers (Gemma 3: 5 of 6) included: llama-cpp-python's
    # default swa_full=True makes llama.cpp give them a full-size cache too ("using full-size SWA cache"), and the
    # 256-cell padding. A layer without KV heads (recurrent layers of hybrid models) gets no KV cache. Measured on the
    # synthetic models of bench/synth_gguf.py (bench/bench_matrix.py): equal to llama.cpp's "KV buffer size".
    n_kv_cells = -(-n_ctx // 256) * 256
    layer_kv = tuple(n_kv_cells * h * (head_k + head_v) * kv_type_bytes for h in n_heads_kv)

    n_vocab = token_embd.shape[1] if token_embd is not None and len(token_embd.shape) > 1 else 0
    n_ff = max(per_layer(gguf, "feed_forward_length", 0))
    n_ff_exp = gguf.get("expert_feed_forward_length")
    moe = type(n_ff_exp) is int and n_ff_exp > 0
    n_expert_used = int_param(gguf, "expert_used_count", 0) if moe else 0
    layer_attention = _attention_kinds(gguf)
    shape = _GraphShape(
        n_embd=n_embd, n_ff=n_ff, n_vocab=n_vocab, n_head=n_head, q_dim=n_head * head_k,
        v_dim=max(n_heads_kv) * head_v, n_kv=n_kv_cells, n_ubatch=min(n_ubatch, n_ctx),
        n_kinds=max(layer_attention) + 1,
        n_ff_exp=n_ff_exp if moe else 0, n_expert_used=n_expert_used,
        n_expert=int_param(gguf, "expert_count", 0) if moe else 0,
    )
    # Pipeline parallelism (several devices, no tensor overrides: the output layer is not moved to the client)
    # makes llama.cpp's scheduler keep 4 copies of every stage input.
    buffers = _compute_buffers(shape, layer_attention, n_copies=1 if output_on_client else 4,
                               output_on_mesh=not output_on_client)
    compute, output_compute = buffers.bound()

    return ModelEstimate(
        path=gguf.path,
        architecture=gguf.architecture,
        n_layer=n_layer,
        n_ctx=n_ctx,
        layer_weight_bytes=tuple(layer_weights),
        layer_kv_bytes=layer_kv,
        output_bytes=output,
        input_bytes=input_,
        compute_bytes=compute,
        file_bytes=gguf.file_size,
        output_on_client=output_on_client,
        output_compute_bytes=output_compute,
        buffers=buffers,
    )


# Architectures whose layers alternate sliding-window and global attention in llama.cpp (each kind has its own KV
# cache, KQ mask and row indices), and llama.cpp's default pattern: layer ``il`` slides when ``il % n < n - 1``
# (``llama_hparams::set_swa_pattern``); ``attention.sliding_window_pattern`` in the file overrides it. Phi-3 writes
# attention.sliding_window too, but llama.cpp disables its SWA.
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4}


def _attention_kinds(gguf: GGUFFile) -> tuple[int, ...]:
    """Per layer: 0 for global attention, 1 for sliding-window attention (a second KV cache in llama.cpp)."""
    n_layer = gguf.n_layer
    pattern = _SWA_PATTERN.get(gguf.architecture)
    if pattern is None or not gguf.get("attention.sliding_window"):
        return (0,) * n_layer
    value = gguf.get("attention.sliding_window_pattern")
    if isinstance(value, list) and len(value) == n_layer and all(type(v) is bool for v in value):
        return tuple(int(v) for v in value)
    if type(value) is int and value >= 0:
        pattern = value
    return tuple(int(pattern == 0 or il % pattern < pattern - 1) for il in range(n_layer))


@dataclass(frozen=True)
class _GraphShape:
    """The sizes that set llama.cpp's compute buffers (counts of elements; n_ubatch tokens per micro-batch)."""

    n_embd: int
    n_ff: int
    n_vocab: int
    n_head: int
    q_dim: int  # n_head * head_dim
    v_dim: int  # V width of one token in one layer (n_head_kv * head_dim_v), the widest layer's
    n_kv: int  # KV cells of the reserved graph (n_ctx padded)
    n_ubatch: int
    n_kinds: int  # attention kinds (KV caches): 2 when sliding-window and global layers alternate
    n_ff_exp: int = 0  # MoE: one expert's feed-forward width
    n_expert_used: int = 0
    n_expert: int = 0


def _compute_buffers(g: _GraphShape, layer_attention: tuple[int, ...], n_copies: int,
                     output_on_mesh: bool) -> ComputeBuffers:
    """The compute buffers of the worst-case graph llama.cpp reserves: n_ubatch tokens attending to every KV cell,
    flash attention off (what "auto" picks on the CPU), so the V cache is stored transposed.

    Inputs (exact, from the graph's input tensors): a hidden state is n_embd x n_ubatch F32; the positions n_ubatch
    I32; per attention kind, the KQ mask n_kv x n_ubatch F32, the K row indices n_ubatch I64 and the V ones
    n_ubatch x v_dim I64 (one per element of the transposed V); the output ids n_ubatch I32 (one output per token).

    The peaks follow ggml-alloc, which reuses freed tensors (best fit, in place where it can) but cannot fit a large
    tensor into the small holes earlier ones leave:
    - attention: KQ (n_head x n_kv x n_ubatch), allocated beside the residual stream and Q, above the holes left by
      the layer's norm and the previous layer's Q: KQ + 2 hidden + 2 Q;
    - feed-forward: gate, up and their product (3 x n_ff) beside the residual stream, the attention's output and
      its norm (3 hidden), above the hole of the attention's widest output (Q); for MoE, instead of 3 x n_ff, the
      routed experts' activations (and their down projections, n_embd per expert used) and the router's logits and
      probabilities;
    - the output layer: the logits (n_vocab x n_ubatch: llama.cpp reserves one output per token) beside the final
      norm; on a device that also ran layers, above two holes they leave.
    Measured against what rpc-server CPU devices allocated (llama-cpp-python 0.3.36; bench/bench_matrix.py reads
    llama.cpp's "compute buffer size", ``GGML_RPC_DEBUG=1`` makes each rpc-server log its buffers to the byte) on the
    synthetic shapes of bench/synth_gguf.py split 2, 3 and 4 ways at n_ctx 256, 1024 and 4096, and Gemma 3 270M on
    one device: the inputs match to the byte, and so do the attention peak of the Llama, Qwen and Gemma shapes (Phi-3's
    fused QKV needs less) and the output peak; the feed-forward peak, which dominates at n_ctx 256, bounds every shape
    by at most 3 hidden states. The MoE feed-forward peak is not measured: attention dominates in every shape here.
    """
    f32, i32, i64 = 4, 4, 8
    t = g.n_ubatch
    hidden = t * g.n_embd * f32
    attention = t * f32 * (g.n_head * g.n_kv + 2 * g.q_dim + 2 * g.n_embd)
    if g.n_ff_exp:
        experts = g.n_expert_used * max(3 * g.n_ff_exp, g.n_ff_exp + g.n_embd) + 2 * g.n_expert
        feed_forward = t * f32 * (experts + 3 * g.n_embd + g.q_dim)
    else:
        feed_forward = t * f32 * (3 * g.n_ff + 3 * g.n_embd + g.q_dim)
    attention_inputs = t * (g.n_kv * f32 + i64 + g.v_dim * i64)
    return ComputeBuffers(
        n_copies=n_copies,
        hidden=hidden,
        positions=t * i32,
        attention_inputs=(attention_inputs,) * g.n_kinds,
        layer_attention=layer_attention,
        output_ids=t * i32,
        attention_peak=attention,
        feed_forward_peak=feed_forward,
        output_peak=t * f32 * (g.n_vocab + g.n_embd) if output_on_mesh else 0,
    )


def placement_estimates(gguf: GGUFFile, n_ctx: int, output_layer: str = "auto"
                        ) -> tuple[ModelEstimate, ModelEstimate | None]:
    """What a placement needs to know of a model: its estimate with the output layer on the mesh (``output_layer``
    ``"mesh"`` or ``"auto"``) or on the client (``"client"``); and, with ``"auto"`` for a model that ties its
    embeddings, the estimate with it on the client too, for the scheduler to choose as it places the model (the
    client when the machines it may use serve CPUs only: see ``sharedllm.placement.output_on_client``)."""
    if output_layer == "client":
        return estimate_memory(gguf, n_ctx, output_on_client=True), None
    on_mesh = estimate_memory(gguf, n_ctx, output_on_client=False)
    if output_layer == "auto" and ties_embeddings(gguf):
        return on_mesh, estimate_memory(gguf, n_ctx, output_on_client=True)
    return on_mesh, None
