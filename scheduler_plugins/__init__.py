# SPDX-License-Identifier: AGPL-3.0-or-later
"""Scheduler-side plugins of SharedLLM (installed as ``sharedllm.scheduler_plugins``)."""

from sharedllm.scheduler_plugins.mesh import MeshPlugin

__all__ = ["MeshPlugin"]
