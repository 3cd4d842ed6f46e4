# SPDX-License-Identifier: AGPL-3.0-or-later
"""How many layer slots each chosen device gets: contiguous, in proportion to what each can hold, within it. Pure
numbers in, numbers out (the package's docstring says what a slot is)."""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right

log = logging.getLogger("sharedllm.placement")


def place_layers(chosen: list[int], capacity: list[float], prefix: list[int]) -> tuple[list[int], list[int]] | None:
    """Device order and slot counts for the devices ``chosen`` (in mesh order), or None when no split fits.

    The mesh order is kept whenever it admits a contiguous split. The output slot (often the largest) must sit on the
    last device used, so when the mesh order fails, each device that can hold it is tried at the end, largest first:
    a deterministic last resort that avoids refusing a model the mesh can hold.
    """
    counts = _split_in_order(prefix, [capacity[i] for i in chosen])
    if counts is not None:
        return chosen, counts
    output = prefix[-1] - prefix[-2]
    for last in sorted((i for i in chosen if capacity[i] >= output), key=lambda i: (-capacity[i], i)):
        if last == chosen[-1]:
            continue  # that is the mesh order, already tried
        order = [i for i in chosen if i != last] + [last]
        counts = _split_in_order(prefix, [capacity[i] for i in order])
        if counts is not None:
            return order, counts
    return None


def _split_in_order(prefix: list[int], caps: list[float]) -> list[int] | None:
    """Proportional slot counts for devices in this order; a balanced greedy fill when those do not fit."""
    counts = _proportional(prefix, caps)
    if _fits(prefix, counts, caps):
        return counts
    log.debug("proportional split %s does not fit; falling back to a greedy fill", counts)
    return _balanced_greedy(prefix, caps)


def _proportional(prefix: list[int], caps: list[float]) -> list[int]:
    """Slot counts whose cumulative bytes follow the cumulative capacity share, rounded to the nearest boundary."""
    n_slots = len(prefix) - 1
    total = prefix[-1]
    cap_total = sum(caps)
    counts = []
    cum_cap = 0.0
    prev = 0
    for d, c in enumerate(caps):
        cum_cap += c
        if d == len(caps) - 1:
            boundary = n_slots
        else:
            target = total * (cum_cap / cap_total)
            j = bisect_left(prefix, target)  # prefix[j-1] < target <= prefix[j]
            if j > n_slots:
                j = n_slots
            elif j > 0 and target - prefix[j - 1] < prefix[j] - target:
                j -= 1
            boundary = max(prev, j)
        counts.append(boundary - prev)
        prev = boundary
    return counts


def _fits(prefix: list[int], counts: list[int], caps: list[float]) -> bool:
    start = 0
    for n, c in zip(counts, caps, strict=True):
        if n and prefix[start + n] - prefix[start] > c:
            return False
        start += n
    return True


def _greedy(prefix: list[int], caps: list[float], ratio: float) -> list[int] | None:
    """Each device in order takes as many slots as fit in ``ratio`` of its capacity; None when some are left."""
    n_slots = len(prefix) - 1
    counts = []
    start = 0
    for c in caps:
        # The furthest boundary j with prefix[j] - prefix[start] <= ratio * c.
        end = bisect_right(prefix, prefix[start] + ratio * c, lo=start) - 1
        end = min(max(end, start), n_slots)
        counts.append(end - start)
        start = end
    return counts if start == n_slots else None


def _balanced_greedy(prefix: list[int], caps: list[float]) -> list[int] | None:
    """The greedy fill with the smallest per-device fill ratio that still places every slot.

    A plain greedy fill (ratio 1) packs the first devices full; searching the ratio down spreads the slots as evenly
    as contiguity allows. Greedy at a given ratio is optimal for a fixed device order, so ratio 1 failing means no
    contiguous split exists.
    """
    best = _greedy(prefix, caps, 1.0)
    if best is None:
        return None
    lo, hi = 0.0, 1.0
    # 30 halvings pin the ratio to ~1e-9; the count is fixed so planning time stays bounded.
    for _ in range(30):
        mid = (lo + hi) / 2
        counts = _greedy(prefix, caps, mid)
        if counts is None:
            lo = mid
        else:
            hi, best = mid, counts
    return best
