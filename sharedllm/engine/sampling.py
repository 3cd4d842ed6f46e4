# SPDX-License-Identifier: AGPL-3.0-or-later
"""One native llama.cpp sampler chain per sequence, built from a request's parameters.

The chain is the one llama-cpp-python builds for ``Llama.generate`` (``Llama._init_sampler``), link for link, so a
batched sequence samples exactly as a request of the plain ``Llama`` would, with two differences that make it safe to
run many at once: the seed is the request's own (not the shared ``Llama._seed``), and ``logit_bias`` is llama.cpp's
``logit_bias`` sampler in the chain (llama-cpp-python copies the whole vocabulary into numpy for it on every token).
Every link runs in C on the logits llama.cpp holds: no per-token copy of the vocabulary into Python.
"""

from __future__ import annotations

import ctypes
from typing import Any


def sampler_chain(
    llm: Any,
    *,
    seed: int,
    top_k: int = 40,
    top_p: float = 0.95,
    min_p: float = 0.05,
    typical_p: float = 1.0,
    temp: float = 0.80,
    repeat_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    mirostat_mode: int = 0,
    mirostat_tau: float = 5.0,
    mirostat_eta: float = 0.1,
    grammar: Any = None,
    logit_bias: dict | None = None,
    **_unused: Any,  # tfs_z, penalize_nl, stopping_criteria...: llama-cpp-python ignores them too
) -> Any:
    """A ``llama_cpp._internals.LlamaSampler`` for one sequence (close it when the sequence ends)."""
    import llama_cpp
    from llama_cpp import _internals

    sampler = _internals.LlamaSampler()
    if logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(logit_bias))(
            *(llama_cpp.llama_logit_bias(int(tok), float(bias)) for tok, bias in logit_bias.items()))
        link = llama_cpp.llama_sampler_init_logit_bias(llm.n_vocab(), len(logit_bias), biases)
        llama_cpp.llama_sampler_chain_add(sampler.sampler, link)
    sampler.add_penalties(n_vocab=llm.n_vocab(), penalty_last_n=llm.last_n_tokens_size,
                          penalty_repeat=repeat_penalty, penalty_freq=frequency_penalty,
                          penalty_present=presence_penalty)
    if grammar is not None:
        sampler.add_grammar(llm._model, grammar)
    seed = ctypes.c_uint32(seed).value
    if temp < 0.0:
        sampler.add_dist(seed)
    elif temp == 0.0:
        sampler.add_greedy()
    elif mirostat_mode == 1:
        sampler.add_mirostat(llm.n_vocab(), seed, mirostat_tau, mirostat_eta, 100)
    elif mirostat_mode == 2:
        sampler.add_mirostat_v2(seed, mirostat_tau, mirostat_eta)
    else:
        sampler.add_top_k(top_k)
        sampler.add_typical(typical_p, 1)
        sampler.add_top_p(top_p, 1)
        sampler.add_min_p(min_p, 1)
        sampler.add_temp(temp)
        sampler.add_dist(seed)
    return sampler
