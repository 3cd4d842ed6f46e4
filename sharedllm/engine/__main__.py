# SPDX-License-Identifier: AGPL-3.0-or-later
"""``python -m sharedllm.engine <parent pid>``: the engine child (see :mod:`sharedllm.engine.child`)."""

import os
import sys

from sharedllm.engine.child import child_main

sys.exit(child_main(int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid()))
