"""Fair-share scheduling: sharing policies and the scheduler that enforces them.

Pure Python with no I/O: the server owns the queues' clock and dispatch; this package only decides
*which* queued request goes next.

* :class:`Policy` and its presets map a request's :class:`~iosvc.identity.JobIdentity` to a path in
  a share tree (``fifo``, ``job-fair``, ``user-fair``, ``size-fair``, ``user-then-size-fair``,
  ``user-then-job-fair``, ``group-user-size-fair``, and the rate-capping baseline ``tbf``).
* :func:`load_policy` reads a preset name, a TOML policy file, TOML text or a description dict.
* :class:`FairScheduler` queues requests and hands them out by hierarchical start-time fair queuing
  charged by bytes.

Policies are looked up in one registry by short name; third parties register more through the
``iosvc.policies`` entry-point group (see :func:`register_policy`).
"""

from __future__ import annotations

from ._policy import (
    DEFAULT_OP_COST,
    FifoPolicy,
    GroupUserSizeFairPolicy,
    JobFairPolicy,
    Policy,
    ShareLevel,
    SizeFairPolicy,
    TokenBucketPolicy,
    TreePolicy,
    UserFairPolicy,
    UserThenJobFairPolicy,
    UserThenSizeFairPolicy,
)
from ._registry import (
    available_policies,
    get_policy_class,
    load_policy,
    register_policy,
    unregister_policy,
)
from ._scheduler import DEFAULT_IDLE_TIMEOUT, FairScheduler, SchedulerSnapshot, ShareNode
from ._shares import expected_shares
from ._units import format_rate, format_size, parse_rate, parse_size

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_OP_COST",
    "FairScheduler",
    "FifoPolicy",
    "GroupUserSizeFairPolicy",
    "JobFairPolicy",
    "Policy",
    "SchedulerSnapshot",
    "ShareLevel",
    "ShareNode",
    "SizeFairPolicy",
    "TokenBucketPolicy",
    "TreePolicy",
    "UserFairPolicy",
    "UserThenJobFairPolicy",
    "UserThenSizeFairPolicy",
    "available_policies",
    "expected_shares",
    "format_rate",
    "format_size",
    "get_policy_class",
    "load_policy",
    "parse_rate",
    "parse_size",
    "register_policy",
    "unregister_policy",
]
