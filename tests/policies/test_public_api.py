"""The public surface of iosvc.policies, and the examples in its docstrings."""

from __future__ import annotations

import doctest

import pytest

import iosvc.policies
from iosvc.policies import _policy, _registry, _scheduler, _units

EXPECTED = {
    "expected_shares",
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
    "format_rate",
    "format_size",
    "get_policy_class",
    "load_policy",
    "parse_rate",
    "parse_size",
    "register_policy",
    "unregister_policy",
}


def test_exports() -> None:
    assert set(iosvc.policies.__all__) == EXPECTED
    for name in EXPECTED:
        obj = getattr(iosvc.policies, name)
        if callable(obj):
            assert obj.__doc__, f"{name} has no docstring"


@pytest.mark.parametrize("module", [_units, _registry, _scheduler, _policy])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.failed == 0
