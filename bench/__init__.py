# SPDX-License-Identifier: AGPL-3.0-or-later
"""SharedLLM's benchmarks and the tools they share. Nothing in the library imports this package.

Each script runs as a file or as a module of the package, from the repository root::

    .venv/bin/python bench/bench_mesh.py --help
    .venv/bin/python -m bench.bench_mesh --help

No script imports another; what they share is in the tool modules.

Tools (imported as ``bench.NAME``):

- ``common``: what the benchmarks share: the model and prompt, timing a streamed completion, llama.cpp driven by
  hand (raw RPC), many streams at once, llama.cpp's buffers against the placement's estimate, a load's progress,
  the machine and its CPU, tables and results files.
- ``linkem``: the link emulator (latency and a bandwidth cap in user space), also the engine's tunnel hook
  (``mesh.load(..., tunnel_hook=linkem.hook(rtt_ms=20))``).
- ``synth_gguf``: synthetic GGUF models (random weights, real metadata and shapes), quantized by llama.cpp.
- ``synth_blocks``: full-size synthetic models written straight in quantized blocks (the 8B and 70B shapes).
- ``docs_pages``: renders the docs pages from ``bench/results/*.json`` and checks every page.

Benchmarks (results in ``bench/results/``, pages in ``docs/benchmarks/``):

- ``bench_mesh``: the mesh against raw llama.cpp RPC and a plain local model, on the same rpc-servers.
- ``bench_tunnel``: decode speed through the relay tunnel against direct llama.cpp RPC.
- ``bench_link``: raw llama.cpp RPC against the mesh over an emulated link.
- ``bench_load``: cold against warm model loads (the rpc-servers' tensor cache).
- ``bench_big``: a real-sized model that no N-1 of N emulated machines can hold.
- ``bench_matrix``: the architecture x quantization matrix: greedy text and memory against the estimate.
- ``bench_concurrency``: many users at once on one model, batched and one at a time.
- ``bench_stall``: a long prompt joining running streams.
- ``bench_first_token``: the first token of a prompt length the engine has not seen.
- ``bench_chat``: multi-turn chats, with and without the prompt cache.
- ``bench_logprobs``: what log-probabilities cost a generation.
- ``bench_openai``: the OpenAI-compatible endpoint against the Python API.
- ``bench_recovery``: the longest stall after a machine fails mid-stream.
- ``bench_faults``: every kind of fault mid-stream on a 3-machine mesh.
- ``soak``: requests for minutes with random faults.
- ``bench_scale``: the scheduler plugin with 10 to 1,000 simulated machines.
- ``decode_batch_floor``: llama.cpp's decode time for 1..N sequences in one process (no mesh).
- ``rpc_cache_floor``: what llama.cpp's RPC tensor cache costs by itself.

GPU checks, for a session lent a GPU machine: ``bench/gpu/`` (``bench.gpu``).
"""
