"""Sharing policies: who shares the device with whom, and in what proportion.

A policy maps a request's :class:`~iosvc.identity.JobIdentity` to a path in a share tree, one
:class:`ShareLevel` per level, e.g. user-then-size-fair maps job 42 of alice (4 nodes) to
``(("user", "alice", 1.0), ("job", "42", 4.0))``. At every level the children that have queued
work share their parent's service in proportion to their weights (see
:class:`~iosvc.policies.FairScheduler`).

Built-in presets (the short names are the ThemisIO ``--policy`` names where ThemisIO has them; see
``/work/shared/reference/themisio_fanstore.md`` section 1.5):

========================  ==================  ===================================================
name                      levels              weights
========================  ==================  ===================================================
``fifo``                  (one queue)         arrival order
``job-fair``              job                 1 per job
``user-fair``             user > job          1 per user; a user's jobs split it equally
``size-fair``             job                 nodes
``user-then-size-fair``   user > job          1 per user; then nodes
``user-then-job-fair``    user > job          1 per user; then 1 per job
``group-user-size-fair``  group > user > job  1 per group; 1 per user; then nodes
``tbf``                   job or user         static token-bucket caps (not work-conserving)
========================  ==================  ===================================================

``user-fair`` and ``user-then-job-fair`` build the same tree: the brief defines user-fair as "equal
per user, split equally among the user's jobs". (ThemisIO's user-fair instead puts all of a user's
jobs in one FIFO queue.) Both names are kept so that ThemisIO-style configurations load unchanged.

Admins may override weights in a policy file (``[users]``, ``[groups]``, ``[jobs]``), but only for
levels the preset has: a ``[users]`` table under ``size-fair`` is an error rather than a guess.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, TypeVar

from iosvc.errors import InvalidArgument
from iosvc.identity import JobIdentity

from ._units import format_rate, format_size, parse_rate, parse_size

__all__ = [
    "DEFAULT_OP_COST",
    "FifoPolicy",
    "GroupUserSizeFairPolicy",
    "JobFairPolicy",
    "Policy",
    "ShareLevel",
    "SizeFairPolicy",
    "TokenBucketPolicy",
    "TreePolicy",
    "UserFairPolicy",
    "UserThenJobFairPolicy",
    "UserThenSizeFairPolicy",
]

# Bytes charged per operation on top of the bytes it moves, so a job of many tiny requests pays for
# the fixed work each request costs. On this project's machine a 4 KiB gRPC unary call costs ~185 us
# of CPU (5.4k calls/s at 8 in flight) while large unary calls move 0.8-1.1 GB/s: one call's fixed
# cost is worth ~150-200 KB of streaming (reference/machine_limits.md, section 0). We round down
# to 128 KiB; deployments with another transport or device should set ``op_cost`` in the policy
# file.
DEFAULT_OP_COST = 128 * 1024

_LEVELS = ("group", "user", "job")
_TABLE_OF_LEVEL = {"group": "groups", "user": "users", "job": "jobs"}

P = TypeVar("P", bound="Policy")


#: Where a policy's shares hold: per server, or for the cluster's aggregate.
SCOPES = ("server", "cluster")


class ShareLevel(NamedTuple):
    """One step of a share path: a node of the share tree and its weight among its siblings."""

    level: str
    key: str
    weight: float


def _route_none(identity: JobIdentity) -> None:
    return None


# Route keys for the built-in level sets. attrgetter runs in C: one name gives the key itself,
# several give the tuple, so the scheduler's per-request lookup costs no Python-level call.
_ROUTES: dict[tuple[str, ...], Callable[[JobIdentity], Hashable]] = {
    (): _route_none,
    ("job",): attrgetter("job_id"),
    ("user",): attrgetter("user"),
    ("user", "job"): attrgetter("user", "job_id"),
    ("group", "user", "job"): attrgetter("group", "user", "job_id"),
}


class Policy(ABC):
    """Base class of sharing policies.

    A subclass names itself (``name``, the registry key), declares the levels of its tree and maps
    identities to paths. Third-party policies subclass this (or :class:`TreePolicy`) and register
    through the ``iosvc.policies`` entry-point group.

    Attributes
    ----------
    name
        Short registry name, e.g. ``"size-fair"``.
    op_cost
        Bytes charged per operation on top of the bytes it moves.
    """

    name: ClassVar[str] = ""
    op_cost: int

    @property
    @abstractmethod
    def levels(self) -> tuple[str, ...]:
        """Names of the tree levels from the root down; empty for a single FIFO queue."""

    @abstractmethod
    def path(self, identity: JobIdentity) -> tuple[ShareLevel, ...]:
        """Map an identity to its share path, one :class:`ShareLevel` per level.

        Parameters
        ----------
        identity
            The job the request belongs to.

        Returns
        -------
        tuple of ShareLevel
            ``len(self.levels)`` steps with positive finite weights.
        """

    def router(self) -> Callable[[JobIdentity], Hashable]:
        """A function giving an identity's *route key*, called on every enqueue.

        Two identities must get equal route keys exactly when :meth:`path` gives them the same
        keys (weights aside). The default is the tuple of the path's keys; subclasses may return
        something cheaper, such as ``operator.attrgetter("job_id")`` for a one-level job tree.
        """
        path = self.path
        return lambda identity: tuple(step.key for step in path(identity))

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Serialisable description, the same structure as a policy file.

        ``Policy.from_dict(p.to_dict()) == p`` holds for every built-in policy.
        """

    @classmethod
    @abstractmethod
    def from_options(cls: type[P], options: Mapping[str, Any]) -> P:
        """Build the policy from a parsed policy file (or :meth:`to_dict` output).

        Raises
        ------
        ValueError
            (:class:`~iosvc.errors.InvalidArgument`) naming the offending field.
        """

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Build a policy from its description; ``data["policy"]`` picks the registered class.

        Parameters
        ----------
        data
            A mapping like the output of :meth:`to_dict` or a parsed policy file.

        Raises
        ------
        ValueError
            (:class:`~iosvc.errors.InvalidArgument`) for an unknown policy name (listing the known
            ones) or an invalid field.
        """
        from ._registry import get_policy_class

        if not isinstance(data, Mapping):
            raise InvalidArgument(
                f"policy description must be a table/dict, got {type(data).__name__}"
            )
        if "policy" not in data:
            raise InvalidArgument("policy description has no 'policy' field (the preset name)")
        name = data["policy"]
        if not isinstance(name, str):
            raise InvalidArgument(f"policy: expected a preset name, got {name!r}")
        policy_cls = get_policy_class(name)
        if not issubclass(policy_cls, cls):
            raise InvalidArgument(
                f"policy {name!r} is a {policy_cls.__name__}, not a {cls.__name__}"
            )
        return policy_cls.from_options(data)

    def describe(self) -> str:
        """One human-readable line, e.g. for ``iosvc policy show``."""
        return f"{self.name}: levels {' > '.join(self.levels) or '(single queue)'}"


def _check_known_fields(options: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(str(k) for k in options if k not in known)
    if unknown:
        raise InvalidArgument(
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"in {where}; known fields: {', '.join(known)}"
        )


def _parse_op_cost(value: Any) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise InvalidArgument(f"op_cost: {exc}") from None


def _weight_table(value: Any, table: str) -> Mapping[str, float]:
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"[{table}] must be a table of name = weight, got {value!r}")
    out: dict[str, float] = {}
    for key, weight in value.items():
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"[{table}]: keys must be non-empty names, got {key!r}")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise InvalidArgument(
                f"[{table}] {key!r}: weight must be a positive finite number, got {weight!r}"
            )
        out[key] = float(weight)
    return MappingProxyType(out)


@dataclass(frozen=True)
class TreePolicy(Policy):
    """A weighted share tree over some of the levels group > user > job (the presets' base).

    Parameters
    ----------
    op_cost
        Bytes charged per operation on top of the bytes it moves (default
        :data:`DEFAULT_OP_COST`).
    users, groups, jobs
        Explicit weights by name for the user, group and job levels (default 1, or the job's node
        count for size-weighted presets). A table for a level the preset does not have is an error.
    burst_credit
        Bytes of unused share a job (user, group) that comes back from idle may take ahead of the
        others (default 0: none, plain SFQ). Bursty jobs then see their bursts served at full
        speed while long-running jobs keep their shares; it never exceeds what the job left
        unused, so a job cannot bank more than this by going idle on purpose.
    scope
        ``"server"`` (default): each server shares its own bandwidth by the policy, as
        ThemisIO does. ``"cluster"``: servers also charge each job for what the others gave
        it, so shares hold for the cluster's aggregate: a job striped over every server and a
        job that hits one server get what the policy says of the whole cluster, where the
        servers' load allows it (see ``FairScheduler.charge``).
    """

    op_cost: int = DEFAULT_OP_COST
    users: Mapping[str, float] = field(default_factory=dict)
    groups: Mapping[str, float] = field(default_factory=dict)
    jobs: Mapping[str, float] = field(default_factory=dict)
    burst_credit: int = 0
    scope: str = "server"

    _LEVELS: ClassVar[tuple[str, ...]] = ()
    #: whether a job's default weight is its node count (else 1)
    _SIZE_WEIGHTED: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.op_cost, bool) or not isinstance(self.op_cost, int) or self.op_cost < 0:
            raise InvalidArgument(f"op_cost: must be an integer >= 0 bytes, got {self.op_cost!r}")
        if (
            isinstance(self.burst_credit, bool)
            or not isinstance(self.burst_credit, int)
            or self.burst_credit < 0
        ):
            raise InvalidArgument(
                f"burst_credit: must be an integer >= 0 bytes, got {self.burst_credit!r}"
            )
        if self.scope not in SCOPES:
            raise InvalidArgument(f"scope: must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        for level, table in _TABLE_OF_LEVEL.items():
            weights = getattr(self, table)
            parsed = _weight_table(weights, table)
            if parsed and level not in self._LEVELS:
                raise InvalidArgument(
                    f"[{table}] sets {level} weights, but policy {self.name!r} has no {level} "
                    f"level (its levels: {', '.join(self._LEVELS) or 'none'}); pick a preset "
                    f"with a {level} level, e.g. {_preset_with(level)}"
                )
            object.__setattr__(self, table, parsed)

    @property
    def levels(self) -> tuple[str, ...]:
        return self._LEVELS

    def path(self, identity: JobIdentity) -> tuple[ShareLevel, ...]:
        steps = []
        for level in self._LEVELS:
            if level == "group":
                steps.append(
                    ShareLevel("group", identity.group, self.groups.get(identity.group, 1.0))
                )
            elif level == "user":
                steps.append(ShareLevel("user", identity.user, self.users.get(identity.user, 1.0)))
            else:
                default = float(identity.nodes) if self._SIZE_WEIGHTED else 1.0
                steps.append(
                    ShareLevel("job", identity.job_id, self.jobs.get(identity.job_id, default))
                )
        return tuple(steps)

    def router(self) -> Callable[[JobIdentity], Hashable]:
        return _ROUTES[self._LEVELS]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": self.name, "op_cost": self.op_cost}
        if self.burst_credit:
            out["burst_credit"] = self.burst_credit
        if self.scope != "server":
            out["scope"] = self.scope
        for table in ("groups", "users", "jobs"):
            weights = getattr(self, table)
            if weights:
                out[table] = dict(weights)
        return out

    @classmethod
    def from_options(cls: type[P], options: Mapping[str, Any]) -> P:
        _check_known_fields(
            options,
            ("policy", "op_cost", "burst_credit", "scope", "groups", "users", "jobs"),
            f"policy {cls.name!r}",
        )
        kwargs: dict[str, Any] = {}
        if "op_cost" in options:
            kwargs["op_cost"] = _parse_op_cost(options["op_cost"])
        if "burst_credit" in options:
            try:
                kwargs["burst_credit"] = parse_size(options["burst_credit"])
            except ValueError as exc:
                raise InvalidArgument(f"burst_credit: {exc}") from None
        if "scope" in options:
            kwargs["scope"] = options["scope"]
        for table in ("groups", "users", "jobs"):
            if table in options:
                kwargs[table] = _weight_table(options[table], table)
        return cls(**kwargs)

    def describe(self) -> str:
        parts = []
        for level in self._LEVELS:
            table = getattr(self, _TABLE_OF_LEVEL[level])
            default = "nodes" if level == "job" and self._SIZE_WEIGHTED else "1"
            overrides = "".join(f", {k}={v:g}" for k, v in sorted(table.items()))
            parts.append(f"{level}(weight {default}{overrides})")
        tree = " > ".join(parts) if parts else "one FIFO queue"
        scope = "; cluster-wide" if self.scope == "cluster" else ""
        return f"{self.name}: {tree}; op_cost {format_size(self.op_cost)}{scope}"


def _preset_with(level: str) -> str:
    return {"group": "group-user-size-fair", "user": "user-then-size-fair", "job": "size-fair"}[
        level
    ]


@dataclass(frozen=True)
class FifoPolicy(TreePolicy):
    """One queue for everyone, served in arrival order (no fairness; the reference baseline)."""

    name: ClassVar[str] = "fifo"
    _LEVELS: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class JobFairPolicy(TreePolicy):
    """Every active job gets an equal share of bytes."""

    name: ClassVar[str] = "job-fair"
    _LEVELS: ClassVar[tuple[str, ...]] = ("job",)


@dataclass(frozen=True)
class SizeFairPolicy(TreePolicy):
    """Active jobs share in proportion to their node counts."""

    name: ClassVar[str] = "size-fair"
    _LEVELS: ClassVar[tuple[str, ...]] = ("job",)
    _SIZE_WEIGHTED: ClassVar[bool] = True


@dataclass(frozen=True)
class UserThenJobFairPolicy(TreePolicy):
    """Active users share equally; each user's share is split equally among their active jobs."""

    name: ClassVar[str] = "user-then-job-fair"
    _LEVELS: ClassVar[tuple[str, ...]] = ("user", "job")


@dataclass(frozen=True)
class UserFairPolicy(UserThenJobFairPolicy):
    """Active users share equally, split equally among their jobs (= user-then-job-fair's tree)."""

    name: ClassVar[str] = "user-fair"


@dataclass(frozen=True)
class UserThenSizeFairPolicy(TreePolicy):
    """Active users share equally; each user's share is split among their jobs by node count."""

    name: ClassVar[str] = "user-then-size-fair"
    _LEVELS: ClassVar[tuple[str, ...]] = ("user", "job")
    _SIZE_WEIGHTED: ClassVar[bool] = True


@dataclass(frozen=True)
class GroupUserSizeFairPolicy(TreePolicy):
    """Equal per active group, then equal per active user in the group, then by node count."""

    name: ClassVar[str] = "group-user-size-fair"
    _LEVELS: ClassVar[tuple[str, ...]] = ("group", "user", "job")
    _SIZE_WEIGHTED: ClassVar[bool] = True


@dataclass(frozen=True)
class TokenBucketPolicy(Policy):
    """Static per-job (or per-user) byte-rate caps, like Lustre NRS TBF rules.

    Each job (or user) has a token bucket filled at its rate; a request is dispatched only when its
    bucket allows, even if the device is idle, so this policy is **not work-conserving**. It is the
    baseline the fair policies are measured against (ThemisIO re-implements TBF the same way as
    deadline spacing, branch ``TBF_on_themis``; Lustre's TBF counts RPCs, we count bytes as LU-20184
    asks).

    Parameters
    ----------
    default_rate
        Cap in bytes/s for keys without an explicit rate; ``math.inf`` for no cap.
    key
        ``"job"`` (one bucket per job) or ``"user"`` (one bucket shared by all of a user's jobs).
    rates
        Explicit caps in bytes/s by job id or user name.
    burst
        Bucket depth in bytes. 0 (default) spaces requests by ``cost / rate`` exactly, like
        ThemisIO's TBF; a larger burst lets an idle key send that many bytes back to back.
    op_cost
        Bytes charged per operation on top of the bytes it moves.
    """

    name: ClassVar[str] = "tbf"

    default_rate: float
    key: str = "job"
    rates: Mapping[str, float] = field(default_factory=dict)
    burst: int = 0
    op_cost: int = DEFAULT_OP_COST

    def __post_init__(self) -> None:
        if self.key not in ("job", "user"):
            raise InvalidArgument(f"tbf.key: must be 'job' or 'user', got {self.key!r}")
        object.__setattr__(self, "default_rate", _rate("tbf.default_rate", self.default_rate))
        if not isinstance(self.rates, Mapping):
            raise InvalidArgument(f"[tbf.rates] must be a table of name = rate, got {self.rates!r}")
        rates: dict[str, float] = {}
        for name, rate in self.rates.items():
            if not isinstance(name, str) or not name:
                raise InvalidArgument(f"[tbf.rates]: keys must be non-empty names, got {name!r}")
            rates[name] = _rate(f"tbf.rates.{name}", rate)
        object.__setattr__(self, "rates", MappingProxyType(rates))
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 0:
            raise InvalidArgument(f"tbf.burst: must be an integer >= 0 bytes, got {self.burst!r}")
        if isinstance(self.op_cost, bool) or not isinstance(self.op_cost, int) or self.op_cost < 0:
            raise InvalidArgument(f"op_cost: must be an integer >= 0 bytes, got {self.op_cost!r}")

    @property
    def levels(self) -> tuple[str, ...]:
        return (self.key,)

    def rate_for(self, key: str) -> float:
        """The cap in bytes/s of a job id or user name (``math.inf`` for none)."""
        return self.rates.get(key, self.default_rate)

    def path(self, identity: JobIdentity) -> tuple[ShareLevel, ...]:
        key = identity.job_id if self.key == "job" else identity.user
        return (ShareLevel(self.key, key, 1.0),)

    def router(self) -> Callable[[JobIdentity], Hashable]:
        return _ROUTES[(self.key,)]

    def to_dict(self) -> dict[str, Any]:
        tbf: dict[str, Any] = {"key": self.key, "default_rate": _rate_out(self.default_rate)}
        if self.burst:
            tbf["burst"] = self.burst
        if self.rates:
            tbf["rates"] = {k: _rate_out(v) for k, v in self.rates.items()}
        return {"policy": self.name, "op_cost": self.op_cost, "tbf": tbf}

    @classmethod
    def from_options(cls: type[P], options: Mapping[str, Any]) -> P:
        _check_known_fields(options, ("policy", "op_cost", "tbf"), "policy 'tbf'")
        if "tbf" not in options:
            raise InvalidArgument(
                "policy 'tbf' needs a [tbf] table with at least default_rate (e.g. \"100MB/s\")"
            )
        table = options["tbf"]
        if not isinstance(table, Mapping):
            raise InvalidArgument(f"[tbf] must be a table, got {table!r}")
        _check_known_fields(table, ("key", "default_rate", "burst", "rates"), "[tbf]")
        if "default_rate" not in table:
            raise InvalidArgument(
                "tbf.default_rate: missing; give the cap for keys without an explicit rate, "
                'e.g. "100MB/s", or "unlimited"'
            )
        kwargs: dict[str, Any] = {
            "default_rate": _rate("tbf.default_rate", table["default_rate"]),
            "key": table.get("key", "job"),
        }
        if "burst" in table:
            try:
                kwargs["burst"] = parse_size(table["burst"])
            except ValueError as exc:
                raise InvalidArgument(f"tbf.burst: {exc}") from None
        if "rates" in table:
            rates = table["rates"]
            if not isinstance(rates, Mapping):
                raise InvalidArgument(f"[tbf.rates] must be a table of name = rate, got {rates!r}")
            kwargs["rates"] = {k: _rate(f"tbf.rates.{k}", v) for k, v in rates.items()}
        if "op_cost" in options:
            kwargs["op_cost"] = _parse_op_cost(options["op_cost"])
        return cls(**kwargs)

    def describe(self) -> str:
        overrides = "".join(f", {k}={format_rate(v)}" for k, v in sorted(self.rates.items()))
        burst = f", burst {format_size(self.burst)}" if self.burst else ""
        return (
            f"tbf: per-{self.key} cap {format_rate(self.default_rate)}{overrides}{burst}; "
            f"op_cost {format_size(self.op_cost)}"
        )


def _rate_out(rate: float) -> float | str:
    # TOML and JSON have no portable infinity; parse_rate reads "unlimited" back.
    return "unlimited" if math.isinf(rate) else rate


def _rate(where: str, value: Any) -> float:
    try:
        return parse_rate(value)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None


BUILTIN_POLICIES: tuple[type[Policy], ...] = (
    FifoPolicy,
    JobFairPolicy,
    UserFairPolicy,
    SizeFairPolicy,
    UserThenSizeFairPolicy,
    UserThenJobFairPolicy,
    GroupUserSizeFairPolicy,
    TokenBucketPolicy,
)
