# SPDX-License-Identifier: AGPL-3.0-or-later
"""``python -m sharedllm.relay``: see :mod:`sharedllm.relay.cli`."""

import sys

from sharedllm.relay.cli import main

sys.exit(main())
