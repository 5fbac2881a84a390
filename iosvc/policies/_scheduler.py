"""The fair scheduler: hierarchical start-time fair queuing (HSFQ) charged by bytes.

Every node of the share tree runs start-time fair queuing (SFQ; Goyal, Vin and Cheng, SIGCOMM'96)
among its children, and the hierarchy composes as in H-SFQ (Goyal, Guo and Vin, OSDI'96):

* each node keeps a virtual time ``V`` and a heap of its *active* children (those with queued work)
  keyed by start tag;
* to pick a request, walk from the root to a leaf (a job, or the one queue of ``fifo``), always
  taking the child with the smallest start tag and setting the node's ``V`` to that tag;
* the request at the head of the leaf's FIFO is served; on the way back up each child on the path
  is charged ``cost / weight`` (``cost = nbytes + op_cost``): its finish tag is
  ``F = S + cost / w`` and, if it still has work, ``F`` is its next start tag;
* a child that becomes active starts at ``max(V, F_last)``, so it gets no credit for time it was
  idle and keeps any debt it ran up just before;
* a node whose whole subtree goes idle sets ``V`` to the largest finish tag of its children (SFQ's
  rule for an idle server), and children idle for ``idle_timeout`` seconds whose finish tag ``V``
  has passed carry no state worth keeping and are reaped.

Only active children are in a heap, so the scheduler is work-conserving: a lone job gets everything.
Shares are of bytes (plus ``op_cost`` per operation), so they depend neither on request sizes nor on
how many requests a job keeps queued. Each decision costs O(depth * log(active children)).

Under :class:`~iosvc.policies.TokenBucketPolicy` the root instead keeps its children (jobs or users)
in a heap keyed by the time each one's token bucket next allows a request (GCRA form of a token
bucket), and ``dequeue`` returns None while the earliest of those lies in the future.

The scheduler is not thread-safe: the server drives it from its event loop.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from heapq import heappop, heappush, heapreplace
from typing import Any, Generic, TypeVar

from iosvc.errors import InvalidArgument
from iosvc.identity import JobIdentity

from ._policy import Policy, TokenBucketPolicy
from ._registry import load_policy

__all__ = ["DEFAULT_IDLE_TIMEOUT", "FairScheduler", "SchedulerSnapshot", "ShareNode"]

T = TypeVar("T")

# ThemisIO purges per-job queues idle for >= 10 s (MAX_JOB_IDLE_SEC in src/fair_queue.cpp;
# reference/themisio_fanstore.md section 1.6). We keep that default so `iosvc top` still sees a job
# between its bursts; memory stays bounded by (new jobs per second) * idle_timeout.
DEFAULT_IDLE_TIMEOUT = 10.0

# Virtual times grow without bound on a busy node. Past 2**32 a float still resolves 2**-20, i.e. a
# cost/weight step of 64 KiB / 2**20 keeps ~5 significant digits; beyond that we shift the node's
# tags down (an O(children) pass that a busy node needs at most once per 2**32 virtual bytes).
_REBASE_AT = 2.0**32

# Decision loops, by policy shape.
_FIFO, _FLAT, _DEEP, _TBF = range(4)

# A queued request: (arrival seq, identity, nbytes, item, enqueue time).
# (arrival order, identity, bytes, operations charged (0 or 1), item, enqueue time)
_Entry = tuple[int, JobIdentity, int, int, Any, float]


def _check_nbytes(nbytes: object) -> None:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise InvalidArgument(f"nbytes must be an integer >= 0, got {nbytes!r}")


class _Node:
    """A node of the share tree (the root, an internal level, or a leaf FIFO)."""

    __slots__ = (
        "children",
        "debt",
        "fifo",
        "finish",
        "heap",
        "identity",
        "idle_since",
        "inv_rate",
        "inv_weight",
        "key",
        "level",
        "max_finish",
        "order",
        "parent",
        "qbytes",
        "rate",
        "route",
        "served_bytes",
        "served_ops",
        "tau",
        "vtime",
        "wait",
        "weight",
    )

    def __init__(
        self, level: str, key: str, weight: float, parent: _Node | None, leaf: bool, order: int
    ) -> None:
        # Heap entries are (tag, order, node): ``order`` is unique per node and a node is in at
        # most one heap once, so equal tags are broken by creation order and nodes are never
        # compared.
        self.order = order
        self.level = level
        self.key = key
        self.weight = weight
        self.inv_weight = 1.0 / weight
        # Typed as a node so the decision loops need no None checks; only the root has None.
        self.parent: _Node = parent  # type: ignore[assignment]
        # Leaves share the empty sentinels below (never mutated: nothing is ever pushed into a
        # leaf's heap or children) so 100k leaves do not cost 100k empty dicts and lists.
        self.children: dict[str, _Node] = _NO_CHILDREN if leaf else {}
        self.heap: list[tuple[float, int, _Node]] = _NO_HEAP if leaf else []
        self.fifo: deque[_Entry] = deque() if leaf else _NO_FIFO
        self.vtime = 0.0  # V: start tag of the child last picked (max finish tag when idle)
        self.max_finish = 0.0
        self.finish = 0.0  # F: finish tag in the parent's virtual time (tbf: next eligible time)
        # Service charged from other servers (cluster-wide fairness) not yet added to this
        # active child's start tag in its parent's heap; added when the child reaches the top.
        self.debt = 0.0
        self.qbytes = 0  # queued bytes (leaves only)
        self.served_bytes = 0
        self.served_ops = 0
        self.wait = 0.0
        self.idle_since = -math.inf
        self.route: Hashable = None  # leaves: the policy's route key, the key in _leaves
        self.identity: JobIdentity | None = None
        self.rate: float | None = None  # tbf leaves: cap in bytes/s
        self.inv_rate = 0.0
        self.tau = 0.0  # tbf leaves: burst / rate, seconds of credit a full bucket holds

    def active(self) -> bool:
        return bool(self.fifo or self.heap)


_NO_CHILDREN: dict[str, _Node] = {}
_NO_HEAP: list[tuple[float, int, _Node]] = []
_NO_FIFO: deque[_Entry] = deque()


@dataclass(frozen=True, slots=True)
class ShareNode:
    """One node of a :meth:`FairScheduler.snapshot`.

    Attributes
    ----------
    level, key, weight
        Position in the share tree (the root is ``("root", "", 1.0)``).
    active
        Whether the node has queued work (only active nodes share the device).
    share
        Target share among its currently active siblings, ``weight / sum(active weights)``; 0 when
        idle. None under ``tbf``, which caps rates instead of sharing.
    global_share
        Target share of the whole device: the product of ``share`` along the path.
    queued_items, queued_bytes
        Requests waiting in the subtree.
    served_bytes, served_ops, wait_seconds
        Cumulative since the node was created (a node is reaped after ``idle_timeout`` idle seconds,
        and :meth:`FairScheduler.set_policy` builds a new tree; the root's counters survive both).
        ``wait_seconds / served_ops`` is the mean queueing delay.
    rate
        ``tbf`` only: the cap in bytes/s.
    identity
        For job nodes, the identity of the job's first request.
    children
        Child nodes, sorted by key.
    """

    level: str
    key: str
    weight: float
    active: bool
    share: float | None
    global_share: float | None
    queued_items: int
    queued_bytes: int
    served_bytes: int
    served_ops: int
    wait_seconds: float
    rate: float | None = None
    identity: JobIdentity | None = None
    children: tuple[ShareNode, ...] = ()

    def walk(
        self, _prefix: tuple[tuple[str, str], ...] = ()
    ) -> Iterator[tuple[tuple[tuple[str, str], ...], ShareNode]]:
        """Yield ``(path, node)`` for this node and every descendant, depth first.

        ``path`` is the tuple of ``(level, key)`` from below the root down to the node (empty for
        the root), convenient as Prometheus labels.
        """
        yield _prefix, self
        for child in self.children:
            yield from child.walk((*_prefix, (child.level, child.key)))

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON/msgpack friendly)."""
        out: dict[str, Any] = {
            "level": self.level,
            "key": self.key,
            "weight": self.weight,
            "active": self.active,
            "share": self.share,
            "global_share": self.global_share,
            "queued_items": self.queued_items,
            "queued_bytes": self.queued_bytes,
            "served_bytes": self.served_bytes,
            "served_ops": self.served_ops,
            "wait_seconds": self.wait_seconds,
        }
        if self.rate is not None:
            out["rate"] = "unlimited" if math.isinf(self.rate) else self.rate
        if self.identity is not None:
            out["identity"] = {
                "job_id": self.identity.job_id,
                "user": self.identity.user,
                "group": self.identity.group,
                "nodes": self.identity.nodes,
            }
        out["children"] = [child.to_dict() for child in self.children]
        return out


@dataclass(frozen=True, slots=True)
class SchedulerSnapshot:
    """State of a :class:`FairScheduler` at one instant (see :class:`ShareNode`).

    Attributes
    ----------
    policy
        The policy's :meth:`~iosvc.policies.Policy.to_dict`.
    description
        The policy's one-line :meth:`~iosvc.policies.Policy.describe`.
    time
        The scheduler clock when the snapshot was taken.
    queued_items, queued_bytes, served_bytes, served_ops
        Totals (the root node's counters).
    root
        The share tree.
    """

    policy: dict[str, Any]
    description: str
    time: float
    queued_items: int
    queued_bytes: int
    served_bytes: int
    served_ops: int
    root: ShareNode = field(repr=False)

    def walk(self) -> Iterator[tuple[tuple[tuple[str, str], ...], ShareNode]]:
        """Shortcut for ``self.root.walk()``."""
        return self.root.walk()

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON/msgpack friendly)."""
        return {
            "policy": self.policy,
            "description": self.description,
            "time": self.time,
            "queued_items": self.queued_items,
            "queued_bytes": self.queued_bytes,
            "served_bytes": self.served_bytes,
            "served_ops": self.served_ops,
            "root": self.root.to_dict(),
        }


class FairScheduler(Generic[T]):
    """Queue of pending requests that hands them out in fair-share order.

    Parameters
    ----------
    policy
        A :class:`~iosvc.policies.Policy`, or anything :func:`~iosvc.policies.load_policy` accepts
        (a preset name, a policy file, TOML text, a description dict).
    clock
        Monotonic seconds; used for token buckets, wait statistics and reaping idle nodes. Tests and
        simulations pass a fake one.
    idle_timeout
        Seconds a job (or user, group) must be idle before its node and counters are dropped.

    Notes
    -----
    A node's weight (and a ``tbf`` bucket's rate) is fixed when the node is created from the first
    request that needs it; a job that later declares another node count keeps its first weight
    until its node is reaped or the policy is set again. Not thread-safe: call it from one thread
    (the server's event loop). For Prometheus counters that must never go down, count at dispatch
    or add up the deltas of :meth:`snapshot`: node counters disappear when nodes are reaped.

    Examples
    --------
    >>> from iosvc.identity import JobIdentity
    >>> s = FairScheduler("size-fair")
    >>> small, big = JobIdentity("1", "ann", "g", nodes=1), JobIdentity("2", "bob", "g", nodes=3)
    >>> for i in range(8):
    ...     s.enqueue(small, 1 << 20, ("small", i))
    ...     s.enqueue(big, 1 << 20, ("big", i))
    >>> [s.dequeue()[0] for _ in range(8)].count("big")
    6
    """

    def __init__(
        self,
        policy: Policy | Mapping[str, Any] | str,
        *,
        clock: Callable[[], float] = time.monotonic,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        if not (isinstance(idle_timeout, int | float) and 0 <= idle_timeout < math.inf):
            raise InvalidArgument(
                f"idle_timeout must be a finite number >= 0, got {idle_timeout!r}"
            )
        self._clock = clock
        self._idle_timeout = float(idle_timeout)
        self._counter = itertools.count()
        self._len = 0
        self._qbytes = 0
        self._install(load_policy(policy))

    # -- public API ----------------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self._policy

    @property
    def idle_timeout(self) -> float:
        """Seconds before an idle node is reaped."""
        return self._idle_timeout

    def __len__(self) -> int:
        """Number of queued requests."""
        return self._len

    @property
    def queued_bytes(self) -> int:
        """Sum of ``nbytes`` over queued requests."""
        return self._qbytes

    def enqueue(self, identity: JobIdentity, nbytes: int, item: T, *, ops: int = 1) -> None:
        """Queue a request.

        Parameters
        ----------
        identity
            The job the request belongs to; the policy maps it to its place in the share tree.
        nbytes
            Bytes the request moves; it is charged ``nbytes + ops * policy.op_cost``.
        item
            Anything; :meth:`dequeue` returns it.
        ops
            Operations the request stands for (each charged ``op_cost``, counted in ``ops``):
            0 for the later pieces of a request split into several, so that a split request
            costs what it would whole; n for n chunks admitted as one request, so that they
            cost what they would one by one.

        Raises
        ------
        ValueError
            If ``nbytes`` is not an integer >= 0, or the policy gives the identity an invalid path.
        """
        if nbytes.__class__ is not int or nbytes < 0:
            _check_nbytes(nbytes)
        if ops.__class__ is not int or ops < 0:
            raise ValueError(f"ops must be an integer >= 0, not {ops!r}")
        leaf = self._leaves.get(self._route(identity))
        if leaf is None:
            leaf = self._grow(identity)
        fifo = leaf.fifo
        if not fifo:
            self._activate(leaf)
        fifo.append((next(self._counter), identity, nbytes, ops, item, self._clock()))
        leaf.qbytes += nbytes
        self._len += 1
        self._qbytes += nbytes

    def dequeue(self) -> T | None:
        """Take the next request in fair-share order.

        Returns
        -------
        item or None
            None when nothing is queued or, under ``tbf``, nothing is eligible yet (see
            :meth:`next_eligible_time`). Work-conserving policies never return None while requests
            are queued.
        """
        if not self._len:
            return None
        mode = self._mode
        if mode != _FLAT:
            if mode == _DEEP:
                return self._dequeue_deep()
            if mode == _TBF:
                return self._dequeue_tbf()
            # _FIFO: the root is the only queue.
            root = self._root
            _, _, nbytes, ops, item, enqueued = root.fifo.popleft()
            root.qbytes -= nbytes
            wait = self._clock() - enqueued
        else:
            # One-level tree (job-fair, size-fair): the hot case, inlined. See _dequeue_deep for
            # the general walk; this is the same with the path fixed at root -> leaf.
            root = self._root
            heap = root.heap
            now = self._clock()
            start, _, leaf = heap[0]
            while leaf.debt:
                start = self._settle(heap, start, leaf)
                start, _, leaf = heap[0]
            if start > _REBASE_AT:
                root.vtime = start
                self._rebase(root)
                start = 0.0
            root.vtime = start
            _, _, nbytes, ops, item, enqueued = leaf.fifo.popleft()
            leaf.qbytes -= nbytes
            finish = start + (nbytes + ops * self._op_cost) * leaf.inv_weight
            leaf.finish = finish
            if finish > root.max_finish:
                root.max_finish = finish
            wait = now - enqueued
            leaf.served_bytes += nbytes
            leaf.served_ops += ops
            leaf.wait += wait
            if leaf.fifo:
                heapreplace(heap, (finish, leaf.order, leaf))
            else:
                heappop(heap)
                self._went_idle(leaf, now)
                if not heap:
                    root.vtime = root.max_finish  # SFQ's idle-server rule, as in _went_idle
            if self._idle and self._idle[0][0] <= now:
                self._reap(now)
        root.served_bytes += nbytes
        root.served_ops += ops
        root.wait += wait
        self._len -= 1
        self._qbytes -= nbytes
        result: T = item
        return result

    def next_eligible_time(self) -> float | None:
        """When :meth:`dequeue` can next return a request, on the scheduler clock.

        Returns
        -------
        float or None
            None if nothing is queued; otherwise a time, which is the current time unless every
            queued request waits for its token bucket under ``tbf``.
        """
        if not self._len:
            return None
        now = self._clock()
        if self._tbf:
            when = self._root.heap[0][0]
            return when if when > now else now
        return now

    def charge(self, identity: JobIdentity, nbytes: int, ops: int = 0, *, horizon: int) -> None:
        """Charge a job for service it got elsewhere, as if this scheduler had served it.

        Cluster-wide fairness: servers tell each other what each job got from them, and each
        charges it here, so a job striped over many servers and one that hits a single server
        converge to their shares of the aggregate, not of each server. Each node of the job's
        path (job, user, group) moves its tag on by ``cost / weight``, as a local request
        would; work conservation is untouched (a job alone here still gets everything here).

        Parameters
        ----------
        identity
            The job; a job with no node here (never seen, or reaped) is not charged: it is
            not competing for this server.
        nbytes, ops
            Service it got elsewhere; the cost is ``nbytes + ops * op_cost``.
        horizon
            Bytes: no node's tag is moved more than ``horizon`` past its parent's virtual time
            (virtual time counts bytes per unit of weight), so a job served heavily elsewhere
            waits here for at most about ``horizon`` bytes per unit weight of the others'
            service, and charges received while it was idle here cannot bank a penalty beyond
            that. Servers pass a few exchange intervals' worth of their own service.
        """
        if self._tbf or self._mode == _FIFO:
            return  # rate caps and FIFO have no shares to correct
        leaf = self._leaves.get(self._route(identity))
        if leaf is None:
            return
        cost = nbytes + ops * self._op_cost
        node = leaf
        while node is not self._root:
            parent = node.parent
            step = cost * node.inv_weight
            limit = parent.vtime + horizon
            if node.active():
                # Its start tag sits in the parent's heap; settled lazily at the top.
                tag = node.finish if node.finish > parent.vtime else parent.vtime
                room = limit - tag - node.debt
                if room > 0:
                    node.debt += step if step < room else room
            else:
                finish = node.finish + step
                node.finish = finish if finish < limit else max(node.finish, limit)
            node = parent

    def _settle(self, heap: list[tuple[float, int, _Node]], start: float, child: _Node) -> float:
        """Move a child with debt to its later start tag; return the new tag."""
        start += child.debt
        child.debt = 0.0
        heapreplace(heap, (start, child.order, child))
        return start

    def set_policy(self, policy: Policy | Mapping[str, Any] | str) -> None:
        """Switch policy live, keeping every queued request.

        Queued requests are re-inserted into the new share tree in their original arrival order,
        with their original enqueue times. If the new policy rejects any queued identity the old
        state is kept and the error is raised. Per-node counters restart with the new tree; the
        totals in the root carry over.

        Parameters
        ----------
        policy
            Anything the constructor accepts.
        """
        new_policy = load_policy(policy)
        fifos = [leaf.fifo for leaf in self._leaves.values() if leaf.fifo]
        entries = list(heapq.merge(*fifos)) if len(fifos) > 1 else list(fifos[0] if fifos else ())
        saved = self.__dict__.copy()
        old_root = self._root
        try:
            self._install(new_policy)
            root = self._root
            root.served_bytes = old_root.served_bytes
            root.served_ops = old_root.served_ops
            root.wait = old_root.wait
            route, leaves, grow, activate = self._route, self._leaves, self._grow, self._activate
            for entry in entries:
                identity, nbytes = entry[1], entry[2]
                leaf = leaves.get(route(identity))
                if leaf is None:
                    leaf = grow(identity)
                if not leaf.fifo:
                    activate(leaf)
                leaf.fifo.append(entry)
                leaf.qbytes += nbytes
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    def snapshot(self) -> SchedulerSnapshot:
        """The share tree with target shares, queue depths and served counters.

        Returns
        -------
        SchedulerSnapshot
            A plain, immutable copy; cost is O(nodes).
        """
        self._reap(self._clock())
        root = self._snap(self._root, 1.0, 1.0)
        return SchedulerSnapshot(
            policy=self._policy.to_dict(),
            description=self._policy.describe(),
            time=self._clock(),
            queued_items=self._len,
            queued_bytes=self._qbytes,
            served_bytes=root.served_bytes,
            served_ops=root.served_ops,
            root=root,
        )

    def node_count(self) -> int:
        """Nodes currently in the share tree, root included (memory diagnostics)."""
        count, stack = 0, [self._root]
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children.values())
        return count

    def __repr__(self) -> str:
        return (
            f"<FairScheduler {self._policy.name} queued={self._len} "
            f"bytes={self._qbytes} nodes={self.node_count()}>"
        )

    # -- tree maintenance ----------------------------------------------------------------------

    def _install(self, policy: Policy) -> None:
        levels = tuple(policy.levels)
        self._policy = policy
        self._route = policy.router()
        self._depth = len(levels)
        self._op_cost = policy.op_cost
        # Bytes of unused share a returning child may take back ahead of the others (0: none).
        self._credit = float(getattr(policy, "burst_credit", 0))
        self._tbf = isinstance(policy, TokenBucketPolicy)
        if self._tbf:
            self._mode = _TBF
        else:
            self._mode = (_FIFO, _FLAT)[self._depth] if self._depth < 2 else _DEEP
        root = _Node("root", "", 1.0, None, leaf=not levels, order=next(self._counter))
        if self._tbf:
            # Children are keyed by eligible time, absolute on the clock: activation's
            # max(V, F) must pick F, so the root's V stays at -inf.
            root.vtime = -math.inf
        self._root = root
        # route key -> leaf, the enqueue fast path (one dict lookup instead of one per level).
        self._leaves: dict[Hashable, _Node] = {}
        # (deadline, node, idle_since) in deadline order: the clock is monotonic.
        self._idle: deque[tuple[float, _Node, float]] = deque()

    def _grow(self, identity: JobIdentity) -> _Node:
        """Create the missing nodes of an identity's path (validated first, nothing activated)."""
        policy = self._policy
        route = self._route(identity)
        path = policy.path(identity)
        if len(path) != self._depth:
            raise InvalidArgument(
                f"policy {policy.name!r} has {self._depth} levels but mapped {identity} to a "
                f"path of {len(path)}"
            )
        for level, key, weight in path:
            if not isinstance(key, str) or not isinstance(level, str):
                raise InvalidArgument(
                    f"policy {policy.name!r} gave a non-string level or key {key!r}"
                )
            if not (isinstance(weight, int | float) and 0 < weight < math.inf):
                raise InvalidArgument(
                    f"policy {policy.name!r} gave {level} {key!r} weight {weight!r}; "
                    "weights must be positive and finite"
                )
        node = self._root
        last = self._depth - 1
        for depth, (level, key, weight) in enumerate(path):
            child = node.children.get(key)
            if child is None:
                child = _Node(
                    level, key, float(weight), node, leaf=depth == last, order=next(self._counter)
                )
                node.children[key] = child
            node = child
        node.route = route
        if node.level == "job":
            node.identity = identity
        if self._tbf:
            assert isinstance(policy, TokenBucketPolicy)
            rate = policy.rate_for(node.key)
            node.rate = rate
            node.inv_rate = 0.0 if math.isinf(rate) else 1.0 / rate
            node.tau = policy.burst * node.inv_rate
            node.finish = -math.inf  # a new bucket is full
        self._leaves[route] = node
        return node

    def _activate(self, node: _Node) -> None:
        """Put an idle leaf, and its ancestors that were idle, into their parents' heaps."""
        parent = node.parent
        while parent is not None:
            heap = parent.heap
            was_active = bool(heap)
            finish = node.finish
            # SFQ starts a returning child at max(V, F). With a burst credit it may start up to
            # credit / weight earlier, but never before its own finish tag: it takes back at most
            # `credit` bytes of share it left unused while idle, then shares as usual.
            vtime = parent.vtime - self._credit * node.inv_weight if self._credit else parent.vtime
            heappush(heap, (finish if finish > vtime else vtime, node.order, node))
            if was_active:
                return
            node, parent = parent, parent.parent

    def _went_idle(self, node: _Node, now: float) -> None:
        # SFQ: an idle server's virtual time jumps to the largest finish tag it handed out, so
        # all its children restart level when work returns.
        node.vtime = node.max_finish
        node.idle_since = now
        self._idle.append((now + self._idle_timeout, node, now))

    def _reap(self, now: float) -> None:
        """Drop nodes idle for ``idle_timeout`` that carry no scheduling state any more."""
        idle = self._idle
        retry = []
        while idle and idle[0][0] <= now:
            _, node, since = idle.popleft()
            if node.idle_since != since or node.fifo or node.heap:
                continue  # active again (a later entry covers its next idle period)
            parent = node.parent
            if parent.children.get(node.key) is not node:
                continue  # already detached with an ancestor
            if node.children or (
                # tbf: its bucket is full again; fair: V passed its finish tag, so
                # max(V, F) == V and forgetting F changes nothing.
                node.finish + node.tau > now if self._tbf else node.finish > parent.vtime
            ):
                retry.append((now + max(self._idle_timeout, 1.0), node, since))
                continue
            del parent.children[node.key]
            if self._leaves.get(node.route) is node:
                del self._leaves[node.route]
        idle.extend(retry)

    def _rebase(self, node: _Node) -> None:
        """Shift a node's virtual time and its children's tags down by its current ``V``."""
        base = node.vtime
        node.vtime = 0.0
        node.max_finish -= base
        for child in node.children.values():
            child.finish -= base
        # A uniform shift keeps the heap order.
        node.heap[:] = [(start - base, seq, child) for start, seq, child in node.heap]

    # -- the two decision loops ----------------------------------------------------------------

    def _dequeue_deep(self) -> T | None:
        now = self._clock()
        root = node = self._root
        heap = node.heap
        # Down: at each node take the active child with the smallest start tag; V := that tag.
        while heap:
            start, _, child = heap[0]
            if child.debt:
                self._settle(heap, start, child)
                continue
            node.vtime = start
            if start > _REBASE_AT:
                self._rebase(node)
            node = child
            heap = child.heap
        leaf = node
        _, _, nbytes, ops, item, enqueued = leaf.fifo.popleft()
        leaf.qbytes -= nbytes
        cost = nbytes + ops * self._op_cost
        wait = now - enqueued
        leaf.wait += wait
        # Up: charge each node on the path cost / weight in its parent's virtual time (its start
        # tag is the parent's V, set on the way down), and re-queue it at its finish tag.
        child = leaf
        active = bool(leaf.fifo)
        while child is not root:
            parent = child.parent
            finish = parent.vtime + cost * child.inv_weight
            child.finish = finish
            if finish > parent.max_finish:
                parent.max_finish = finish
            child.served_bytes += nbytes
            child.served_ops += ops
            if active:
                heapreplace(parent.heap, (finish, child.order, child))
            else:
                heappop(parent.heap)
                self._went_idle(child, now)
                active = bool(parent.heap)
            child = parent
        if not active:
            root.vtime = root.max_finish  # SFQ's idle-server rule, as in _went_idle
        root.served_bytes += nbytes
        root.served_ops += ops
        root.wait += wait
        self._len -= 1
        self._qbytes -= nbytes
        if self._idle and self._idle[0][0] <= now:
            self._reap(now)
        result: T = item
        return result

    def _dequeue_tbf(self) -> T | None:
        root = self._root
        heap = root.heap
        now = self._clock()
        eligible, _, leaf = heap[0]
        if eligible > now:
            return None
        _, _, nbytes, ops, item, enqueued = leaf.fifo.popleft()
        leaf.qbytes -= nbytes
        # GCRA: the theoretical arrival time TAT = eligible + tau moves on by cost / rate from
        # max(TAT, now); the next request may go once now >= TAT - tau.
        tat = eligible + leaf.tau
        if tat < now:
            tat = now
        leaf.finish = eligible = tat + (nbytes + ops * self._op_cost) * leaf.inv_rate - leaf.tau
        wait = now - enqueued
        leaf.served_bytes += nbytes
        leaf.served_ops += ops
        leaf.wait += wait
        if leaf.fifo:
            heapreplace(heap, (eligible, leaf.order, leaf))
        else:
            heappop(heap)
            self._went_idle(leaf, now)
        root.served_bytes += nbytes
        root.served_ops += ops
        root.wait += wait
        self._len -= 1
        self._qbytes -= nbytes
        if self._idle and self._idle[0][0] <= now:
            self._reap(now)
        result: T = item
        return result

    # -- snapshot ------------------------------------------------------------------------------

    def _snap(self, node: _Node, share: float | None, global_share: float | None) -> ShareNode:
        children = sorted(node.children.values(), key=lambda c: c.key)
        active_weight = sum(c.weight for c in children if c.active())
        snapped = []
        for child in children:
            if self._tbf:
                child_share: float | None = None
                child_global: float | None = None
            else:
                child_share = child.weight / active_weight if child.active() else 0.0
                child_global = child_share * global_share if global_share is not None else None
            snapped.append(self._snap(child, child_share, child_global))
        if node.children:
            queued_items = sum(c.queued_items for c in snapped)
            queued_bytes = sum(c.queued_bytes for c in snapped)
        else:
            queued_items, queued_bytes = len(node.fifo), node.qbytes
        return ShareNode(
            level=node.level,
            key=node.key,
            weight=node.weight,
            active=node.active(),
            share=share,
            global_share=global_share,
            queued_items=queued_items,
            queued_bytes=queued_bytes,
            served_bytes=node.served_bytes,
            served_ops=node.served_ops,
            wait_seconds=node.wait,
            rate=node.rate,
            identity=node.identity,
            children=tuple(snapped),
        )
