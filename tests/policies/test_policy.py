"""Policy presets, policy files, descriptions and the registry."""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any, ClassVar

import pytest

from iosvc.errors import InvalidArgument
from iosvc.identity import JobIdentity
from iosvc.policies import (
    DEFAULT_OP_COST,
    FairScheduler,
    FifoPolicy,
    GroupUserSizeFairPolicy,
    JobFairPolicy,
    Policy,
    ShareLevel,
    SizeFairPolicy,
    TokenBucketPolicy,
    UserFairPolicy,
    UserThenJobFairPolicy,
    UserThenSizeFairPolicy,
    available_policies,
    get_policy_class,
    load_policy,
    register_policy,
    unregister_policy,
)
from iosvc.policies._registry import Registry

from ._sim import ident

BUILTIN = [
    "fifo",
    "job-fair",
    "user-fair",
    "size-fair",
    "user-then-size-fair",
    "user-then-job-fair",
    "group-user-size-fair",
    "tbf",
]

ALICE42 = JobIdentity(job_id="42", user="alice", group="climate", nodes=4)


# -- presets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fifo", ()),
        ("job-fair", (("job", "42", 1.0),)),
        ("size-fair", (("job", "42", 4.0),)),
        ("user-fair", (("user", "alice", 1.0), ("job", "42", 1.0))),
        ("user-then-job-fair", (("user", "alice", 1.0), ("job", "42", 1.0))),
        ("user-then-size-fair", (("user", "alice", 1.0), ("job", "42", 4.0))),
        (
            "group-user-size-fair",
            (("group", "climate", 1.0), ("user", "alice", 1.0), ("job", "42", 4.0)),
        ),
    ],
)
def test_preset_paths(name: str, expected: tuple[tuple[str, str, float], ...]) -> None:
    policy = load_policy(name)
    assert policy.name == name
    path = policy.path(ALICE42)
    assert path == expected
    assert all(isinstance(step, ShareLevel) for step in path)
    assert policy.levels == tuple(step[0] for step in expected)
    assert policy.op_cost == DEFAULT_OP_COST


@pytest.mark.parametrize("name", [n for n in BUILTIN if n != "tbf"])
def test_router_agrees_with_path(name: str) -> None:
    """The fast route key must separate exactly the identities path() separates."""
    policy = load_policy(name)
    route = policy.router()
    people = [
        ident(job, user, group, nodes)
        for job in ("1", "2")
        for user in ("ann", "bob")
        for group in ("g1", "g2")
        for nodes in (1, 3)
    ]
    for a in people:
        for b in people:
            same_keys = [s.key for s in policy.path(a)] == [s.key for s in policy.path(b)]
            assert (route(a) == route(b)) == same_keys, (a, b)


def test_preset_classes_are_registered_by_short_name() -> None:
    assert set(BUILTIN) <= set(available_policies())
    classes = {
        "fifo": FifoPolicy,
        "job-fair": JobFairPolicy,
        "user-fair": UserFairPolicy,
        "size-fair": SizeFairPolicy,
        "user-then-size-fair": UserThenSizeFairPolicy,
        "user-then-job-fair": UserThenJobFairPolicy,
        "group-user-size-fair": GroupUserSizeFairPolicy,
        "tbf": TokenBucketPolicy,
    }
    for name, cls in classes.items():
        assert get_policy_class(name) is cls


def test_tbf_needs_a_rate() -> None:
    with pytest.raises(ValueError, match=r"\[tbf\] table"):
        load_policy("tbf")
    policy = TokenBucketPolicy(default_rate=100e6, key="user", rates={"alice": "1GB/s"})  # type: ignore[dict-item]
    assert policy.path(ALICE42) == (("user", "alice", 1.0),)
    assert policy.rate_for("alice") == 1e9
    assert policy.rate_for("bob") == 100e6


# -- policy files ----------------------------------------------------------------------------------

BRIEF_EXAMPLE = """
policy = "group-user-size-fair"
op_cost = 65536           # bytes charged per operation on top of its bytes
[users]
alice = 2
[groups]
climate = 3
[jobs]
"42" = 5
"""

TBF_EXAMPLE = """
policy = "tbf"
[tbf]
key = "job"
default_rate = "100MB/s"
burst = "1MiB"
[tbf.rates]
"42" = "200MB/s"
"7" = "unlimited"
"""


def test_policy_file_with_explicit_weights() -> None:
    policy = load_policy(BRIEF_EXAMPLE)
    assert isinstance(policy, GroupUserSizeFairPolicy)
    assert policy.op_cost == 65536
    assert policy.path(ALICE42) == (
        ("group", "climate", 3.0),
        ("user", "alice", 2.0),
        ("job", "42", 5.0),  # [jobs] overrides the node count
    )
    other = ident("43", "bob", "bio", nodes=8)
    assert policy.path(other) == (("group", "bio", 1.0), ("user", "bob", 1.0), ("job", "43", 8.0))


def test_tbf_file() -> None:
    policy = load_policy(TBF_EXAMPLE)
    assert isinstance(policy, TokenBucketPolicy)
    assert policy.key == "job"
    assert policy.default_rate == 100e6
    assert policy.rate_for("42") == 200e6
    assert policy.rate_for("7") == math.inf
    assert policy.burst == 1 << 20


def test_load_policy_from_file(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(BRIEF_EXAMPLE)
    assert load_policy(path) == load_policy(BRIEF_EXAMPLE)
    assert load_policy(str(path)) == load_policy(BRIEF_EXAMPLE)
    with pytest.raises(FileNotFoundError, match=r"missing\.toml"):
        load_policy(str(tmp_path / "missing.toml"))


def test_op_cost_accepts_sizes() -> None:
    assert load_policy('policy = "size-fair"\nop_cost = "64KiB"').op_cost == 65536
    assert load_policy('policy = "size-fair"\nop_cost = 0').op_cost == 0


def test_burst_credit_parses_sizes_and_round_trips() -> None:
    policy = load_policy('policy = "job-fair"\nburst_credit = "8MiB"')
    assert policy.burst_credit == 8 * 1024 * 1024
    assert load_policy(policy.to_dict()).burst_credit == policy.burst_credit
    assert load_policy("job-fair").burst_credit == 0
    assert "burst_credit" not in load_policy("job-fair").to_dict()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('policy = "size-fair"\nweights = 3', r"unknown field 'weights'.*known fields: policy"),
        ("op_cost = 4", "no 'policy' field"),
        ("policy = 3", "expected a preset name"),
        ('policy = "sized-fair"', r"unknown policy 'sized-fair'; known policies: .*size-fair"),
        ('policy = "size-fair"\nop_cost = -1', "op_cost"),
        ('policy = "size-fair"\nop_cost = "4K"', "op_cost: ambiguous unit"),
        ('policy = "job-fair"\nburst_credit = -1', "burst_credit"),
        ('policy = "job-fair"\nburst_credit = true', "burst_credit"),
        ('policy = "job-fair"\nburst_credit = "lots"', "burst_credit"),
        ('policy = "user-fair"\n[users]\nalice = -2', r"\[users\] 'alice': weight must be"),
        ('policy = "user-fair"\n[users]\nalice = 0', r"\[users\] 'alice'"),
        ('policy = "user-fair"\n[users]\nalice = "two"', r"\[users\] 'alice'"),
        ('policy = "user-fair"\n[users]\nalice = true', r"\[users\] 'alice'"),
        ('policy = "user-fair"\nusers = 3', r"\[users\] must be a table"),
        ('policy = "size-fair"\n[users]\nalice = 2', r"\[users\].*'size-fair' has no user level"),
        ('policy = "user-fair"\n[groups]\nbio = 2', r"\[groups\].*no group level"),
        ('policy = "fifo"\n[jobs]\n"1" = 2', r"\[jobs\].*no job level"),
        ('policy = "tbf"\n[tbf]\nkey = "job"', "tbf.default_rate: missing"),
        ('policy = "tbf"\n[tbf]\ndefault_rate = "1MB/s"\nkey = "group"', "tbf.key"),
        ('policy = "tbf"\n[tbf]\ndefault_rate = "fast"', "tbf.default_rate: cannot parse"),
        ('policy = "tbf"\n[tbf]\ndefault_rate = 0', "tbf.default_rate"),
        ('policy = "tbf"\n[tbf]\ndefault_rate = 1\nrate = 2', r"unknown field 'rate' in \[tbf\]"),
        ('policy = "tbf"\n[tbf]\ndefault_rate = 1\n[tbf.rates]\n"9" = "1Q"', "tbf.rates.9"),
        ('policy = "tbf"\n[tbf]\ndefault_rate = 1\nburst = -1', "tbf.burst"),
        ('policy = "tbf"\n[tbf]\ndefault_rate = 1\n[users]\na = 1', "unknown field 'users'"),
        ('policy = "size-fair"\n[jobs\n', "not valid TOML"),
    ],
)
def test_invalid_policy_files(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        load_policy(text)
    assert isinstance(info.value, InvalidArgument)


def test_invalid_policy_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('policy = "user-fair"\n[users]\nalice = -1\n')
    with pytest.raises(ValueError, match=r"bad\.toml.*\[users\] 'alice'"):
        load_policy(path)


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        load_policy("fairest")
    for name in BUILTIN:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="known policies"):
        FairScheduler("fairest")
    with pytest.raises(ValueError, match="known policies"):
        get_policy_class("fairest")


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="op_cost"):
        SizeFairPolicy(op_cost=-1)
    with pytest.raises(ValueError, match=r"\[users\] 'a'"):
        UserFairPolicy(users={"a": math.nan})
    with pytest.raises(ValueError, match=r"\[jobs\] 'x'"):
        JobFairPolicy(jobs={"x": math.inf})


# -- descriptions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        *[n for n in BUILTIN if n != "tbf"],
        BRIEF_EXAMPLE,
        TBF_EXAMPLE,
        'policy = "user-then-size-fair"\n[users]\nbob = 0.5\n[jobs]\n"1" = 3',
    ],
)
def test_to_dict_round_trips(spec: str) -> None:
    policy = load_policy(spec)
    data = policy.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON types, no inf
    again = Policy.from_dict(data)
    assert again == policy
    assert type(again) is type(policy)
    assert load_policy(data) == policy
    assert policy.name in policy.describe()


def test_describe() -> None:
    text = load_policy(BRIEF_EXAMPLE).describe()
    assert text == (
        "group-user-size-fair: group(weight 1, climate=3) > user(weight 1, alice=2) > "
        "job(weight nodes, 42=5); op_cost 64KiB"
    )
    assert "per-job cap 100MB/s, 42=200MB/s, 7=unlimited" in load_policy(TBF_EXAMPLE).describe()


def test_from_dict_rejects_non_mappings() -> None:
    with pytest.raises(ValueError, match="must be a table"):
        Policy.from_dict(["size-fair"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a TokenBucketPolicy"):
        TokenBucketPolicy.from_dict({"policy": "size-fair"})


# -- registry --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EveryoneEqualPolicy(Policy):
    """A third-party policy: one level keyed by group, weight 1."""

    name: ClassVar[str] = "group-fair"
    op_cost: int = 0

    @property
    def levels(self) -> tuple[str, ...]:
        return ("group",)

    def path(self, identity: JobIdentity) -> tuple[ShareLevel, ...]:
        return (ShareLevel("group", identity.group, 1.0),)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "op_cost": self.op_cost}

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> EveryoneEqualPolicy:
        return cls(op_cost=int(options.get("op_cost", 0)))


def test_register_policy_and_clobber() -> None:
    register_policy("group-fair", EveryoneEqualPolicy)
    try:
        assert "group-fair" in available_policies()
        policy = load_policy("group-fair")
        assert isinstance(policy, EveryoneEqualPolicy)
        assert load_policy({"policy": "group-fair", "op_cost": 5}).op_cost == 5
        with pytest.raises(ValueError, match="already registered"):
            register_policy("group-fair", EveryoneEqualPolicy)
        register_policy("group-fair", EveryoneEqualPolicy, clobber=True)
        # Built-ins are protected the same way.
        with pytest.raises(ValueError, match="already registered"):
            register_policy("size-fair", EveryoneEqualPolicy)
        # The default router (derived from path) works in the scheduler.
        sched: FairScheduler[int] = FairScheduler("group-fair")
        sched.enqueue(ident("1", group="a"), 10, 1)
        sched.enqueue(ident("2", group="a"), 10, 2)
        sched.enqueue(ident("3", group="b"), 10, 3)
        assert [sched.dequeue() for _ in range(3)] == [1, 3, 2]
    finally:
        unregister_policy("group-fair")
    assert "group-fair" not in available_policies()


def test_register_rejects_bad_names_and_objects() -> None:
    with pytest.raises(ValueError, match="short lowercase"):
        register_policy("Group Fair", EveryoneEqualPolicy)
    with pytest.raises(TypeError, match="Policy subclass"):
        register_policy("not-a-policy", dict)  # type: ignore[arg-type]
    assert "not-a-policy" not in available_policies()


def _fake_entry_points(*eps: EntryPoint) -> Any:
    def entry_points(*, group: str) -> list[EntryPoint]:
        return [ep for ep in eps if ep.group == group]

    return entry_points


def test_entry_points_are_loaded_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    import iosvc.policies._registry as registry_module

    group = "iosvc.test-policies"
    good = EntryPoint("group-fair", f"{__name__}:EveryoneEqualPolicy", group)
    shadow = EntryPoint("size-fair", f"{__name__}:EveryoneEqualPolicy", group)
    broken = EntryPoint("broken", f"{__name__}:DoesNotExist", group)
    wrong = EntryPoint("wrong", "builtins:dict", group)
    monkeypatch.setattr(
        registry_module, "entry_points", _fake_entry_points(good, shadow, broken, wrong)
    )

    def check(name: str, obj: object) -> Hashable:
        if not (isinstance(obj, type) and issubclass(obj, Policy)):
            raise TypeError(f"{name}: not a policy")
        return obj

    reg: Registry[Hashable] = Registry("policy", group, check, plural="policies")
    reg.register("size-fair", SizeFairPolicy)
    assert reg.names() == ["broken", "group-fair", "size-fair", "wrong"]
    assert reg.get("size-fair") is SizeFairPolicy  # the entry point cannot shadow it
    assert reg.get("group-fair") is EveryoneEqualPolicy  # loaded on first use
    with pytest.raises(ValueError, match="failed to load"):
        reg.get("broken")
    with pytest.raises(ValueError, match="not a policy"):
        reg.get("wrong")
    with pytest.raises(ValueError, match="known policies: broken, group-fair, size-fair"):
        reg.get("nope")


def test_global_registry_uses_the_iosvc_policies_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import iosvc.policies._registry as registry_module

    ep = EntryPoint("group-fair", f"{__name__}:EveryoneEqualPolicy", "iosvc.policies")
    monkeypatch.setattr(registry_module, "entry_points", _fake_entry_points(ep))
    monkeypatch.setattr(registry_module._POLICIES, "_entry_points", None)
    try:
        assert "group-fair" in available_policies()
        assert isinstance(load_policy("group-fair"), EveryoneEqualPolicy)
    finally:
        unregister_policy("group-fair")
