"""Seeded, group-aware train/val/test splits for datasets that ship without official ones."""

from __future__ import annotations

import random

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def group_split(groups: list[str], strata: list[int], seed: int, fractions=DEFAULT_FRACTIONS) -> dict[str, str]:
    """Map each group to train/val/test.

    Whole groups (patients, lesions) go to one split so correlated images never straddle train and
    test. Groups are shuffled with ``seed`` within each stratum (the group's majority class), so
    every split sees every class even on small data; the cut points are exact per stratum.
    """
    by_stratum: dict[int, list[str]] = {}
    stratum_of: dict[str, list[int]] = {}
    for g, s in zip(groups, strata):
        stratum_of.setdefault(g, []).append(s)
    for g in sorted(stratum_of):
        by_stratum.setdefault(max(stratum_of[g]), []).append(g)
    rng = random.Random(seed)
    out: dict[str, str] = {}
    for s in sorted(by_stratum):
        gs = by_stratum[s]
        rng.shuffle(gs)
        n = len(gs)
        n_test = round(n * fractions[2])
        n_val = round(n * fractions[1])
        if n >= 3:  # at least one group per split when the stratum can afford it
            n_test = max(n_test, 1) if fractions[2] > 0 else 0
            n_val = max(n_val, 1) if fractions[1] > 0 else 0
        for i, g in enumerate(gs):
            out[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out
