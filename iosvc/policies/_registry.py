"""The policy registry and :func:`load_policy`.

One registry keyed by short names. Built-ins are registered explicitly below; third-party packages
add policies through the ``iosvc.policies`` entry-point group (``name = "pkg.module:PolicyClass"``),
loaded lazily the first time a name is not found among the registered ones. An entry point never
replaces a registered name.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from iosvc.errors import InvalidArgument

from ._policy import BUILTIN_POLICIES, Policy

__all__ = ["Registry", "available_policies", "get_policy_class", "load_policy", "register_policy"]

T = TypeVar("T")

ENTRY_POINT_GROUP = "iosvc.policies"
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")


class Registry(Generic[T]):
    """Name -> object table with lazily loaded entry points.

    Parameters
    ----------
    kind
        What the table holds, for error messages ("policy").
    group
        Entry-point group searched for names not registered explicitly.
    check
        Called on every object before it is registered; raises ``TypeError`` if it does not fit.
    plural
        Plural of ``kind`` for messages (default ``kind + "s"``).
    """

    def __init__(
        self, kind: str, group: str, check: Callable[[str, object], T], plural: str = ""
    ) -> None:
        self._kind = kind
        self._plural = plural or f"{kind}s"
        self._group = group
        self._check = check
        self._table: dict[str, T] = {}
        self._entry_points: dict[str, EntryPoint] | None = None

    def register(self, name: str, obj: T, *, clobber: bool = False) -> None:
        """Register ``obj`` under ``name``.

        Raises
        ------
        ValueError
            If the name is taken and ``clobber`` is false, or is not a short lowercase name.
        """
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgument(
                f"{self._kind} name must be short lowercase words joined by '-', got {name!r}"
            )
        if name in self._table and not clobber:
            raise InvalidArgument(
                f"{self._kind} {name!r} is already registered; pass clobber=True to replace it"
            )
        self._table[name] = self._check(name, obj)

    def unregister(self, name: str) -> None:
        """Remove a registered name (entry points stay discoverable)."""
        self._table.pop(name, None)

    def get(self, name: str) -> T:
        """Look a name up, loading its entry point on first use.

        Raises
        ------
        ValueError
            (:class:`~iosvc.errors.InvalidArgument`) for an unknown name, listing the known ones.
        """
        try:
            return self._table[name]
        except (KeyError, TypeError):
            pass
        entry_point = self._discover().get(name) if isinstance(name, str) else None
        if entry_point is None:
            raise InvalidArgument(
                f"unknown {self._kind} {name!r}; known {self._plural}: {', '.join(self.names())}"
            )
        try:
            loaded = entry_point.load()
        except Exception as exc:  # a broken plugin must not take the caller down with a traceback
            raise InvalidArgument(
                f"{self._kind} {name!r} from entry point {entry_point.value!r} failed to load: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        try:
            self.register(name, loaded)
        except TypeError as exc:
            raise InvalidArgument(f"entry point {entry_point.value!r}: {exc}") from None
        return self._table[name]

    def names(self) -> list[str]:
        """Registered and discoverable names, sorted."""
        return sorted(set(self._table) | set(self._discover()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._table or name in self._discover())

    def _discover(self) -> dict[str, EntryPoint]:
        if self._entry_points is None:
            found = {ep.name: ep for ep in entry_points(group=self._group)}
            # Registered names win: an entry point cannot shadow a built-in.
            self._entry_points = {n: ep for n, ep in found.items() if n not in self._table}
        return {n: ep for n, ep in self._entry_points.items() if n not in self._table}


def _check_policy_class(name: str, obj: object) -> type[Policy]:
    if not (isinstance(obj, type) and issubclass(obj, Policy)):
        raise TypeError(f"policy {name!r} must be a Policy subclass, got {obj!r}")
    return obj


_POLICIES: Registry[type[Policy]] = Registry(
    "policy", ENTRY_POINT_GROUP, _check_policy_class, plural="policies"
)
for _cls in BUILTIN_POLICIES:
    _POLICIES.register(_cls.name, _cls)


def register_policy(name: str, cls: type[Policy], *, clobber: bool = False) -> None:
    """Register a policy class under a short name.

    Parameters
    ----------
    name
        Registry key, e.g. ``"my-fair"``; short lowercase words joined by ``-``.
    cls
        A :class:`Policy` subclass implementing ``from_options``.
    clobber
        Replace an existing registration instead of raising.

    Raises
    ------
    ValueError
        If ``name`` is taken and ``clobber`` is false.
    TypeError
        If ``cls`` is not a Policy subclass.
    """
    _POLICIES.register(name, cls, clobber=clobber)


def unregister_policy(name: str) -> None:
    """Remove a registered policy name (mainly for tests of plugins)."""
    _POLICIES.unregister(name)


def get_policy_class(name: str) -> type[Policy]:
    """The policy class registered under ``name``.

    Raises
    ------
    ValueError
        (:class:`~iosvc.errors.InvalidArgument`) for an unknown name, listing the known ones.
    """
    return _POLICIES.get(name)


def available_policies() -> list[str]:
    """Names of all registered and discoverable policies, sorted."""
    return _POLICIES.names()


def load_policy(spec: Policy | Mapping[str, Any] | str | os.PathLike[str]) -> Policy:
    """Turn a preset name, a policy file, TOML text or a description dict into a :class:`Policy`.

    Parameters
    ----------
    spec
        One of: a :class:`Policy` (returned as is); a mapping as produced by
        :meth:`Policy.to_dict`; a registered short name such as ``"size-fair"`` (the preset with
        default settings); a path to a TOML policy file; or TOML text (anything containing ``=``
        that is not an existing file).

    Returns
    -------
    Policy

    Raises
    ------
    ValueError
        (:class:`~iosvc.errors.InvalidArgument`) for an unknown name (listing the known ones),
        malformed TOML, or an invalid field (naming it).
    FileNotFoundError
        If ``spec`` looks like a file name (ends in ``.toml``) but no such file exists.

    Examples
    --------
    >>> load_policy("size-fair").describe()
    'size-fair: job(weight nodes); op_cost 128KiB'
    >>> load_policy('policy = "user-fair"\\n[users]\\nalice = 2').to_dict()["users"]
    {'alice': 2.0}
    """
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, Mapping):
        return Policy.from_dict(spec)
    if isinstance(spec, os.PathLike):
        return _load_file(Path(spec))
    if not isinstance(spec, str):
        raise InvalidArgument(
            f"policy must be a name, a file, TOML text or a dict, got {type(spec).__name__}"
        )
    text = spec.strip()
    if text in _POLICIES:
        return get_policy_class(text).from_options({"policy": text})
    if "\n" not in text and (text.endswith(".toml") or os.path.isfile(text)):
        return _load_file(Path(text))
    if "=" in text:
        return _from_toml(spec, "policy TOML text")
    raise InvalidArgument(
        f"unknown policy {text!r}: not a known name, a policy file or TOML text; "
        f"known policies: {', '.join(available_policies())}"
    )


def _load_file(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"policy file {str(path)!r} does not exist") from None
    return _from_toml(text, f"policy file {str(path)!r}")


def _from_toml(text: str, where: str) -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{where} is not valid TOML: {exc}") from None
    try:
        return Policy.from_dict(data)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
