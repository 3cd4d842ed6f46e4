# SPDX-License-Identifier: AGPL-3.0-or-later
"""The ``sharedllm`` command line (installed as ``sharedllm.cli``)."""
