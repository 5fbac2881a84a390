"""Target shares: what a policy promises each job when a given set of jobs is active."""

from __future__ import annotations

from collections.abc import Iterable

from iosvc.identity import JobIdentity
from iosvc.policies._policy import Policy, TreePolicy

__all__ = ["expected_shares"]


def expected_shares(
    policy: Policy, identities: Iterable[JobIdentity]
) -> dict[JobIdentity, float] | None:
    """Share of the device each job should get while exactly these jobs have work.

    Computed from ``policy.path()`` alone (not from a scheduler): at each level a parent's share
    is split among its distinct active children in proportion to their weights. ``None`` for
    policies that promise no shares (``fifo``; ``tbf``, which caps rates instead).
    """
    if not isinstance(policy, TreePolicy) or not policy.levels:
        return None
    paths = {identity: policy.path(identity) for identity in identities}
    out: dict[JobIdentity, float] = {}
    for identity, path in paths.items():
        share = 1.0
        for depth, step in enumerate(path):
            siblings = {
                p[depth].key: p[depth].weight for p in paths.values() if p[:depth] == path[:depth]
            }
            share *= step.weight / sum(siblings.values())
        out[identity] = share
    return out
