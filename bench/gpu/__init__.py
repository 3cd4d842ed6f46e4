# SPDX-License-Identifier: AGPL-3.0-or-later
"""GPU checks, for a session lent a CUDA machine; every one runs from the repository's own files.

    bash bench/gpu/build.sh                               # the CUDA build: SHAREDLLM_CUDA=1 scripts/setup.sh
    bash bench/gpu/check.sh                               # then mesh_check.py: a CUDA machine and a CPU machine
    bash bench/gpu/checks.sh batch_check.py big_check.py  # then the checks of issues #12 and #13

- ``mesh_check``: a CUDA rpc-server, and a mesh of one CUDA machine and one CPU machine generating from Gemma.
- ``batch_check``: 1, 8 and 32 concurrent greedy streams on a CUDA machine (issue #12).
- ``big_check``: the matrix on CUDA, an 8B shape on two CUDA rpc-servers, a 70B shape on CUDA and a CPU (issue #13).
"""
