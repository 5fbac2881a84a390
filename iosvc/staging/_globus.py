"""The Globus transfer backend (globus-sdk v4) and the Globus login behind ``iosvc login``.

Submission
    Every transfer uses ``sync_level="checksum"`` and ``verify_checksum=True``: checksum sync is
    the only level that is safe when a failed transfer is restarted (globus-cli's help), and it
    makes a re-run skip what already arrived intact. The caller records the submission id
    *before* :meth:`GlobusBackend.submit`; Globus answers a second submission with that id with
    the task it already made (result code ``Duplicate`` instead of ``Accepted``,
    docs.globus.org/api/transfer/task_submit), so a crash between submit and record never starts
    a second task.

Monitoring
    A task whose source is missing or forbidden does not fail: it stays ACTIVE with
    ``faults > 0`` and retries until its deadline (globus/globus-cli#1056,
    argonne-lcf/balsam#114), which Globus keeps extending for transfers without an explicit
    deadline (docs.globus.org/api/transfer/task_behavior). ``task_wait`` would return only then,
    so :meth:`GlobusBackend.wait` polls ``get_task`` itself, reads the task's events when it has
    faults, and gives up once a non-retryable error has persisted with no progress for
    ``stuck_after`` seconds, cancelling the task (an ACTIVE task on the same files also blocks
    a corrected resubmission, globus-cli#1056) and returning the events.

Login
    :func:`make_transfer_client` never prompts: it uses a service account's client credentials
    from ``$IOSVC_GLOBUS_CLIENT_ID``/``$IOSVC_GLOBUS_CLIENT_SECRET`` (a ``ClientApp``), or the
    tokens ``iosvc login`` stored (a ``UserApp`` with refresh tokens under ``~/.iosvc/globus/``),
    and raises :class:`~iosvc.errors.Unauthenticated` naming the command to run when they are
    missing, instead of the SDK's default of starting a login flow on stdin mid-transfer.
    Non-high-assurance GCSv5 *mapped* collections need a dependent ``data_access`` consent;
    adding it for any other kind of collection fails at login with "Unknown Scope", so it is
    added only where ``get_endpoint`` says so (globus-sdk docs, "detecting data_access").
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import globus_sdk
from globus_sdk.globus_app.config import resolve_by_login_flow
from globus_sdk.login_flows import (
    CommandLineLoginFlowEOFError,
    LocalServerEnvironmentalLoginError,
    LocalServerLoginError,
)
from globus_sdk.token_storage import JSONTokenStorage, TokenValidationError

from iosvc.errors import (
    ConsentRequired,
    DeadlineExceeded,
    InvalidArgument,
    IosvcError,
    NotFound,
    PermissionDenied,
    TransferFailed,
    Unauthenticated,
    Unavailable,
)
from iosvc.staging._backend import TaskState, TaskStatus, TransferRequest

__all__ = [
    "CLIENT_ID_ENV",
    "CLIENT_SECRET_ENV",
    "DEFAULT_NATIVE_CLIENT_ID",
    "FATAL_EVENT_CODES",
    "GLOBUS_DIR_ENV",
    "NATIVE_CLIENT_ID_ENV",
    "GlobusBackend",
    "LoginResult",
    "consented_collections",
    "data_access_collections",
    "globus_dir",
    "login",
    "logout",
    "make_app",
    "make_transfer_client",
    "make_user_app",
    "remember_collections",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

APP_NAME = "iosvc"
#: Client id of the Globus *native* app that ``iosvc login`` signs users in with. iosvc has no
#: registration of its own yet: a site registers a native app ("thick client", no secret) at
#: https://app.globus.org/settings/developers and sets :data:`NATIVE_CLIENT_ID_ENV`, e.g. in
#: the module file that puts iosvc on the PATH. Its name is what users see on the consent page.
DEFAULT_NATIVE_CLIENT_ID: str | None = None
NATIVE_CLIENT_ID_ENV = "IOSVC_GLOBUS_NATIVE_CLIENT_ID"
#: A service account (confidential client) for automation; both must be set, or neither.
CLIENT_ID_ENV = "IOSVC_GLOBUS_CLIENT_ID"
CLIENT_SECRET_ENV = "IOSVC_GLOBUS_CLIENT_SECRET"
#: Where tokens live (default ``~/.iosvc/globus``).
GLOBUS_DIR_ENV = "IOSVC_GLOBUS_DIR"

#: Error event codes that retrying does not fix. Codes from the Transfer event inventory
#: (docs.globus.org/api/transfer/task_events; the full list was posted by Globus staff on
#: developer-discuss, 2020-04-23); PATH_NOT_FOUND is how argonne-lcf/balsam#114 saw a missing
#: source. Connection, timeout and busy-endpoint errors are left to Globus's own retries.
FATAL_EVENT_CODES = frozenset(
    {
        "FILE_NOT_FOUND",
        "PATH_NOT_FOUND",
        "PERMISSION_DENIED",
        "ENDPOINT_ERROR",
        "QUOTA_EXCEEDED",
        "NO_SPACE_LEFT",
        "INVALID_PATH_NAME",
        "AMBIGUOUS_PATH",
        "IS_A_DIRECTORY",
        "IS_A_FILE",
        "NOT_A_DIRECTORY",
        "NOT_A_FILE",
        "NO_CREDENTIALS",
        "AUTH",
    }
)
_WRONG_TYPE = "a path has the wrong type (file vs directory); check globus_path in sites.toml"
_NOT_FOUND = "check that the replica is at the source site's globus_path (sites.toml)"
_NO_SPACE = "free space or get more quota at the destination, then stage again"
_RELOGIN = "log in again: iosvc login --force"
#: The next step for an error event code.
_HINTS = {
    "FILE_NOT_FOUND": _NOT_FOUND,
    "PATH_NOT_FOUND": _NOT_FOUND,
    "INVALID_PATH_NAME": "check globus_path of both sites in sites.toml",
    "AMBIGUOUS_PATH": "check globus_path of both sites in sites.toml",
    "PERMISSION_DENIED": (
        "your Globus identity may not read the source or write the destination: ask the "
        "collection's admins for access, or log in with the identity that has it "
        "(iosvc login --force)"
    ),
    "QUOTA_EXCEEDED": _NO_SPACE,
    "NO_SPACE_LEFT": _NO_SPACE,
    "ENDPOINT_ERROR": (
        "a collection's endpoint reported an error: check its status at "
        "https://app.globus.org/collections and stage again"
    ),
    "IS_A_DIRECTORY": _WRONG_TYPE,
    "IS_A_FILE": _WRONG_TYPE,
    "NOT_A_DIRECTORY": _WRONG_TYPE,
    "NOT_A_FILE": _WRONG_TYPE,
    "NO_CREDENTIALS": _RELOGIN,
    "AUTH": _RELOGIN,
}
_TASK_URL = "https://app.globus.org/activity/{}"
#: Events read per poll of a faulty task (the newest first decides whether it is stuck).
_EVENT_LIMIT = 50
_EVENT_CHARS = 400
#: Globus labels: at most 128 characters, no newlines (docs.globus.org/api/transfer/task_submit).
_LABEL_CHARS = 128
_DATA_ACCESS = re.compile(r"https://auth\.globus\.org/scopes/([0-9a-fA-F-]{36})/data_access")


# ------------------------------------------------------------------------------------ errors
Where = Sequence[tuple[str, str]]  # (site, collection id)


def _where(request: TransferRequest) -> list[tuple[str, str]]:
    ends = (request.source, request.destination)
    return [(e.site, e.globus_collection) for e in ends if e.globus_collection]


def _named(where: Where, message: str = "") -> str:
    """The collections an error concerns (only those its message names, if it names any)."""
    named = [(s, c) for s, c in where if c.lower() in message.lower()] or list(where)
    text = ", ".join(f"collection {c}" + (f" (site {s})" if s else "") for s, c in named)
    return text or "the collections"


def _login_command(collections: Iterable[str], *, force: bool = False) -> str:
    flags = " --force" if force else ""
    return "iosvc login" + flags + "".join(f" --collection {c}" for c in collections)


def _translate(
    err: globus_sdk.GlobusAPIError | globus_sdk.NetworkError,
    doing: str,
    where: Where = (),
    *,
    task_id: str | None = None,
) -> IosvcError:
    """A Globus error as the iosvc error that means the same, with the next step in it."""
    if isinstance(err, globus_sdk.NetworkError):
        return Unavailable(
            f"{doing}: cannot reach Globus ({err}); check this node's network or proxy and "
            "try again"
        )
    code = str(err.code or "")
    message = " ".join(str(err.message or err.http_status).split())
    consent = err.info.consent_required
    if consent or code == "ConsentRequired":
        scopes = list(consent.required_scopes)
        ids = list(dict.fromkeys(m.group(1) for s in scopes for m in _DATA_ACCESS.finditer(s)))
        ids = ids or [c for _, c in where]
        need = f" (required scopes: {' '.join(scopes)})" if scopes else ""
        sites = dict((c, s) for s, c in where)
        return ConsentRequired(
            f"{doing}: Globus needs your consent before iosvc may use "
            f"{_named([(sites.get(c, ''), c) for c in ids])}; run: {_login_command(ids)}{need}"
        )
    params = err.info.authorization_parameters
    if params:
        wanted = []
        if params.session_required_single_domain:
            wanted.append("an identity from " + " or ".join(params.session_required_single_domain))
        if params.session_required_mfa:
            wanted.append("multi-factor authentication")
        need = f" with {' and '.join(wanted)}" if wanted else ""
        return ConsentRequired(
            f"{doing}: Globus needs a new login{need} ({params.session_message or message}); "
            f"run: {_login_command((c for _, c in where), force=True)}"
            + (" and choose that identity on the Globus page" if wanted else "")
        )
    if isinstance(err, globus_sdk.AuthAPIError) or err.http_status == 401:
        return Unauthenticated(
            f"{doing}: the Globus login of iosvc is missing, expired or revoked ({message}); "
            f"run: iosvc login --force (service accounts: check {CLIENT_ID_ENV} and "
            f"{CLIENT_SECRET_ENV})"
        )
    if err.http_status == 404 or "NotFound" in code:
        if task_id is not None:
            return NotFound(
                f"{doing}: Globus knows no task {task_id} for this identity ({message}); "
                "it was submitted by another Globus identity, or its history was deleted"
            )
        return NotFound(
            f"{doing}: {message}; check globus_collection of {_named(where, message)} in "
            "sites.toml (a collection's UUID is on its page at https://app.globus.org/collections)"
        )
    if err.http_status == 403 or "PermissionDenied" in code:
        return PermissionDenied(
            f"{doing}: permission denied on {_named(where, message)} ({message}); ask the "
            "collection's admins for access, or log in with the identity that has it: "
            "iosvc login --force"
        )
    if err.http_status == 409 or "Conflict" in code:
        # The Transfer service refuses a task duplicating an ACTIVE one on the same files
        # (maintainer comment in globus/globus-cli#1056); the exact code is not documented.
        return TransferFailed(
            f"{doing}: Globus refused: {code}: {message}; if another task is still transferring "
            "the same files, wait for it or cancel it (`iosvc stage status`, or "
            "https://app.globus.org/activity) and stage again"
        )
    if err.http_status >= 500:
        return Unavailable(
            f"{doing}: Globus is unavailable ({err.http_status} {code}: {message}); try again later"
        )
    if err.http_status == 400:
        return InvalidArgument(f"{doing}: Globus rejected the request: {code}: {message}")
    return TransferFailed(f"{doing}: Globus error {err.http_status} {code}: {message}")


def _call(fn: Callable[[], _T], doing: str, where: Where = (), task_id: str | None = None) -> _T:
    try:
        return fn()
    except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError) as err:
        raise _translate(err, doing, where, task_id=task_id) from err


# ------------------------------------------------------------------------------------ events
def _event_line(event: Mapping[str, Any]) -> str:
    """One event on one line: ``time CODE: description (details | joined)``."""
    details = " | ".join(
        part.strip() for part in str(event.get("details") or "").splitlines() if part.strip()
    )
    text = f"{event.get('time') or ''} {event.get('code') or '?'}: {event.get('description') or ''}"
    text = text.strip() + (f" ({details})" if details else "")
    return text if len(text) <= _EVENT_CHARS else text[: _EVENT_CHARS - 1] + "…"


def _hint(code: str, errors: Sequence[Mapping[str, Any]]) -> str:
    codes = [code, *(str(e.get("code") or "") for e in errors)]
    return next((f"; {_HINTS[c]}" for c in codes if c in _HINTS), "")


def _state(doc: Mapping[str, Any]) -> TaskState:
    raw = str(doc.get("status") or "")
    fatal = doc.get("fatal_error") or {}
    if raw == "SUCCEEDED":
        return "succeeded"
    if raw == "FAILED":
        cancelled = fatal.get("code") == "CANCELED" or doc.get("canceled_by_admin")
        return "canceled" if cancelled else "failed"
    if raw not in ("ACTIVE", "INACTIVE"):
        log.warning("Globus task %s has an unknown status %r", doc.get("task_id"), raw)
    # docs.globus.org/api/transfer/task_behavior: a task waiting for one of the user's three
    # working slots says "Queued" (unless it also hit an error in the past 15 minutes).
    return "pending" if raw == "ACTIVE" and doc.get("nice_status") == "Queued" else "active"


@dataclass(slots=True)
class _Trouble:
    since: float
    done: tuple[int, int]


# ----------------------------------------------------------------------------------- backend
class GlobusBackend:
    """Transfers between two Globus collections with a ``TransferClient``.

    Implements :class:`~iosvc.staging.TransferBackend`; make the client with
    :func:`make_transfer_client` (tests pass one with a fake token).

    Parameters
    ----------
    transfer_client
        An authenticated ``globus_sdk.TransferClient``.
    poll_interval
        Seconds between polls of the task in :meth:`wait` (the SDK's ``task_wait`` default).
    stuck_after
        Seconds a non-retryable error (:data:`FATAL_EVENT_CODES`) or an INACTIVE task may last
        without progress before :meth:`wait` gives up on the task, and how long it tolerates
        Globus not answering. 15 minutes: longer than Globus's own retry backoff, short next to
        the 24-72 h a stuck task would otherwise hold the stage.
    cancel_wait
        Seconds :meth:`cancel` waits for Globus to report the task cancelled.
    clock, sleep
        Monotonic clock and sleep; tests inject fakes.
    """

    name: ClassVar[str] = "globus"

    def __init__(
        self,
        transfer_client: globus_sdk.TransferClient,
        *,
        poll_interval: float = 10.0,
        stuck_after: float = 900.0,
        cancel_wait: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if poll_interval <= 0 or stuck_after < 0 or cancel_wait < 0:
            raise InvalidArgument("poll_interval must be > 0, stuck_after and cancel_wait >= 0")
        self.transfer_client = transfer_client
        self.poll_interval = poll_interval
        self.stuck_after = stuck_after
        self.cancel_wait = cancel_wait
        self._clock = clock
        self._sleep = sleep
        self._requests: dict[str, TransferRequest] = {}
        self._trouble: dict[str, _Trouble] = {}

    # -- submission ------------------------------------------------------------------------
    def new_submission_id(self, request: TransferRequest) -> str:
        """A fresh Globus submission id (``GET /submission_id``); the caller records it first."""
        doc = _call(
            self.transfer_client.get_submission_id,
            "getting a Globus submission id",
            _where(request),
        )
        return str(doc["value"])

    def transfer_data(
        self, request: TransferRequest, submission_id: str
    ) -> globus_sdk.TransferData:
        """The ``TransferData`` that :meth:`submit` sends (public so it can be shown or tested).

        Raises
        ------
        InvalidArgument
            If a site has no Globus collection or path, or the submission id is empty.
        """
        ends: list[tuple[str, str]] = []
        for end in (request.source, request.destination):
            collection, path = end.globus_collection, end.globus_path
            if not collection:
                raise InvalidArgument(
                    f"site {end.site} has no globus_collection in sites.toml, so Globus cannot "
                    "reach it"
                )
            if not path or not path.startswith("/"):
                raise InvalidArgument(
                    f"site {end.site}: the replica's path in its Globus collection is missing or "
                    f"relative ({path!r}); set globus_path in sites.toml"
                )
            ends.append((collection, path))
        if not submission_id:
            raise InvalidArgument("a Globus transfer needs the submission id recorded for it")
        (src_collection, src_path), (dst_collection, dst_path) = ends
        label = " ".join(request.label.split())[:_LABEL_CHARS].strip()
        data = globus_sdk.TransferData(
            src_collection,
            dst_collection,
            label=label or globus_sdk.MISSING,
            submission_id=submission_id,
            # The only level that is safe when restarting a failed transfer (globus-cli's
            # --sync-level help); files already there and matching are skipped.
            sync_level="checksum",
            verify_checksum=True,
            preserve_timestamp=True,
            # Out of space is not worth retrying until the deadline: fail the task instead.
            fail_on_quota_errors=True,
            # `iosvc stage` reports success itself; failures and INACTIVE still send mail.
            notify_on_succeeded=False,
            # No deadline: Globus extends the deadline of a transfer that makes progress only
            # when none was given (docs.globus.org/api/transfer/task_behavior).
        )
        # One recursive item for the replica's root rather than one item per manifest file:
        # a stage always copies a whole replica (the manifest is everything under that root),
        # Globus expands the tree on its side, and the request stays a few hundred bytes.
        # Listing every file hits the per-task item limit on datasets of many files, which
        # made DKIST switch whole-dataset transfers to directory items and split partial ones
        # into several tasks (DKISTDC/dkist#105). Files outside the manifest under the source
        # root are copied too; verification checks the manifest's files only.
        data.add_item(_as_dir(src_path), _as_dir(dst_path), recursive=True)
        return data

    def submit(self, request: TransferRequest, submission_id: str) -> str:
        """Submit the transfer, or find the task an earlier submission with this id made.

        Returns
        -------
        str
            The Globus task id (the same one for every submission with ``submission_id``).
        """
        data = self.transfer_data(request, submission_id)
        doing = f"submitting the Globus transfer of {request.dataset} v{request.version}"
        try:
            doc = _call(lambda: self.transfer_client.submit_transfer(data), doing, _where(request))
        except Unavailable as exc:
            raise Unavailable(
                f"{exc}. Running the same `iosvc stage` again is safe: the recorded submission "
                "id makes Globus return the task this attempt may have created"
            ) from exc
        task_id = str(doc["task_id"])
        code = doc.get("code")
        if code == "Duplicate":
            log.info(
                "Globus already had submission %s: task %s, nothing new", submission_id, task_id
            )
        elif code != "Accepted":
            log.warning("Globus answered the submission of task %s with code %r", task_id, code)
        self._requests[task_id] = request
        return task_id

    # -- monitoring ------------------------------------------------------------------------
    def status(self, task_id: str) -> TaskStatus:
        """The task now, with its error events when it failed, has faults, or is INACTIVE.

        ``error`` is set when the task failed, or when :meth:`wait` would give up on it
        (stuck on a non-retryable error for ``stuck_after`` seconds as measured by this
        backend object). ``bytes_total`` is known only for tasks this object submitted.
        """
        request = self._requests.get(task_id)
        where = _where(request) if request is not None else ()
        doc = _document(
            _call(
                lambda: self.transfer_client.get_task(task_id),
                f"reading Globus task {task_id}",
                where,
                task_id,
            )
        )
        skipped = int(doc.get("files_skipped") or 0)
        status = TaskStatus(
            task_id,
            _state(doc),
            bytes_total=request.total_bytes if request is not None else 0,
            bytes_done=int(doc.get("bytes_transferred") or 0),
            # `files` grows while Globus expands the recursive item.
            files_total=int(doc.get("files") or 0) or (len(request.files) if request else 0),
            files_done=int(doc.get("files_transferred") or 0) + skipped,
            files_skipped=skipped,
        )
        if status.finished:
            self._trouble.pop(task_id, None)
            if status.state == "failed":
                events = self._events(task_id)
                errors = [e for e in events if e.get("is_error")]
                status.events = [_event_line(e) for e in errors]
                status.error = self._failure(task_id, doc, errors)
            elif status.state == "canceled":
                status.error = str(doc.get("canceled_by_admin_message") or "cancelled")
        elif doc.get("status") == "INACTIVE" or int(doc.get("faults") or 0) > 0:
            self._check_stuck(task_id, doc, status)
        else:
            self._trouble.pop(task_id, None)
        return status

    def _events(self, task_id: str) -> list[dict[str, Any]]:
        """The task's latest events, newest first ([] if Globus will not say)."""
        try:
            page = self.transfer_client.task_event_list(task_id, limit=_EVENT_LIMIT)
            events = [dict(e) for e in page]
        except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError) as err:
            log.warning("cannot read the events of Globus task %s: %s", task_id, err)
            return []
        # Globus lists newest first; sort anyway (same-format UTC times sort as strings).
        events.sort(key=lambda e: str(e.get("time") or ""), reverse=True)
        return events

    def _failure(
        self, task_id: str, doc: Mapping[str, Any], errors: Sequence[Mapping[str, Any]]
    ) -> str:
        fatal = doc.get("fatal_error") or {}
        code = str(fatal.get("code") or doc.get("nice_status") or "FAILED")
        text = f"Globus task {task_id} failed: {code}: {fatal.get('description') or 'no reason'}"
        if errors:
            text += f"; last error: {_event_line(errors[0])}"
        return text + _hint(code, errors) + f"; details: {_TASK_URL.format(task_id)}"

    def _check_stuck(self, task_id: str, doc: Mapping[str, Any], status: TaskStatus) -> None:
        events = self._events(task_id)
        errors = [e for e in events if e.get("is_error")]
        status.events = [_event_line(e) for e in errors]
        nice = str(doc.get("nice_status") or "")
        latest = events[0] if events else None
        if doc.get("status") == "INACTIVE":
            code = "INACTIVE"
        elif latest is not None:
            code = str(latest.get("code") or "")
            if not (latest.get("is_error") and code in FATAL_EVENT_CODES):
                self._trouble.pop(task_id, None)  # retrying something that may pass, or moving
                return
        elif nice in FATAL_EVENT_CODES:  # no events readable: nice_status shows recent errors
            code = nice
        else:
            self._trouble.pop(task_id, None)
            return
        now = self._clock()
        done = (status.bytes_done, status.files_done)
        trouble = self._trouble.get(task_id)
        if trouble is None or trouble.done != done:  # new trouble, or it moved on: start over
            trouble = self._trouble[task_id] = _Trouble(now, done)
        stuck_for = now - trouble.since
        if stuck_for < self.stuck_after:
            return
        if code == "INACTIVE":
            status.error = (
                f"Globus task {task_id} has been INACTIVE ({nice or 'suspended'}) for "
                f"{stuck_for:.0f} s: Globus suspends a task when credentials for a collection "
                f"expire; log in again (iosvc login --force) and stage again"
            )
        else:
            status.error = (
                f"Globus task {task_id} made no progress for {stuck_for:.0f} s, retrying {code} "
                "(Globus would retry until the task's deadline)"
            )
            if errors:
                status.error += f"; last error: {_event_line(errors[0])}"
            status.error += _hint(code, errors)
        status.error += f"; details: {_TASK_URL.format(task_id)}"

    def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = None,
        on_progress: Callable[[TaskStatus], None] | None = None,
    ) -> TaskStatus:
        """Poll the task until it finishes, gets stuck, or ``timeout`` passes.

        A task stuck on a non-retryable error (see :meth:`status`) is cancelled and returned
        as ``failed`` with its error and events, so the caller's catalog never calls a task
        failed that Globus is still running; so is a wait interrupted by Ctrl-C (the stage
        records that task as cancelled). Globus not answering is tolerated for
        ``stuck_after`` seconds, the SDK having already retried each request.

        Raises
        ------
        Unavailable
            If Globus did not answer for ``stuck_after`` seconds.
        DeadlineExceeded
            If ``timeout`` passed before Globus answered once.
        """
        start = last_answer = self._clock()
        status: TaskStatus | None = None
        try:
            while True:
                try:
                    status = self.status(task_id)
                    last_answer = self._clock()
                except Unavailable:
                    if self._clock() - last_answer >= self.stuck_after:
                        raise
                    log.warning("Globus did not answer about task %s; retrying", task_id)
                else:
                    if status.error is not None and not status.finished:
                        self._stop(task_id)
                        status.state = "failed"
                        status.error += "; iosvc cancelled the task"
                    if on_progress is not None:
                        on_progress(status)
                    if status.finished:
                        return status
                elapsed = self._clock() - start
                if timeout is not None and elapsed >= timeout:
                    if status is None:
                        raise DeadlineExceeded(
                            f"Globus did not answer about task {task_id} within {timeout:g} s"
                        )
                    return status
                pause = self.poll_interval
                if timeout is not None:
                    pause = min(pause, timeout - elapsed)
                self._sleep(pause)
        except KeyboardInterrupt:
            self._stop(task_id)
            raise

    def _stop(self, task_id: str) -> None:
        """Cancel without raising (the reason to stop is what the caller reports)."""
        try:
            self.transfer_client.cancel_task(task_id)
        except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError) as err:
            log.warning("could not cancel Globus task %s: %s", task_id, err)

    def cancel(self, task_id: str) -> TaskStatus:
        """Cancel the task and return its state, waiting up to ``cancel_wait`` for Globus.

        A task that already finished is returned as it is. If Globus is still stopping it
        after ``cancel_wait`` seconds, the status is not finished and ``error`` says so.
        """
        try:
            self.transfer_client.cancel_task(task_id)
        except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError) as err:
            # The Transfer API answers "TaskComplete" for a task that already ended.
            if not (isinstance(err, globus_sdk.GlobusAPIError) and err.code == "TaskComplete"):
                raise _translate(err, f"cancelling Globus task {task_id}", task_id=task_id) from err
        deadline = self._clock() + self.cancel_wait
        status = self.status(task_id)
        while not status.finished and self._clock() < deadline:
            self._sleep(min(1.0, self.poll_interval))
            status = self.status(task_id)
        if not status.finished:
            status.error = f"cancel requested; Globus is still stopping task {task_id}"
        return status


def _document(response: globus_sdk.GlobusHTTPResponse) -> dict[str, Any]:
    data = response.data
    if not isinstance(data, dict):
        raise TransferFailed(f"Globus answered with a {type(data).__name__}, not a document")
    return data


def _as_dir(path: str) -> str:
    return path.rstrip("/") + "/"


# ------------------------------------------------------------------------------------- login
def globus_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where iosvc keeps Globus tokens: ``$IOSVC_GLOBUS_DIR`` or ``~/.iosvc/globus``."""
    env = environ.get(GLOBUS_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".iosvc" / "globus"


def _uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidArgument(f"{what}: {value!r} is not a UUID") from None


def _collections(collections: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(_uuid(c, "Globus collection") for c in collections))


def _client_credentials(environ: Mapping[str, str]) -> tuple[str, str] | None:
    cid, secret = environ.get(CLIENT_ID_ENV), environ.get(CLIENT_SECRET_ENV)
    if bool(cid) != bool(secret):
        raise Unauthenticated(f"set both {CLIENT_ID_ENV} and {CLIENT_SECRET_ENV}, or neither")
    if cid and secret:
        return _uuid(cid, CLIENT_ID_ENV), secret
    return None


def _native_client_id(environ: Mapping[str, str]) -> str:
    cid = environ.get(NATIVE_CLIENT_ID_ENV) or DEFAULT_NATIVE_CLIENT_ID
    if not cid:
        raise InvalidArgument(
            "no Globus app is configured for iosvc: register a native app at "
            f"https://app.globus.org/settings/developers and set {NATIVE_CLIENT_ID_ENV} to its "
            f"client id (or, for automation, set {CLIENT_ID_ENV} and {CLIENT_SECRET_ENV})"
        )
    return _uuid(cid, NATIVE_CLIENT_ID_ENV)


def _remote_session(environ: Mapping[str, str]) -> bool:
    # As globus-sdk's LocalServerLoginFlowManager and globus-cli decide: no browser over SSH.
    return bool(environ.get("SSH_TTY") or environ.get("SSH_CONNECTION"))


class _RefuseLogin:
    """A token-error handler that raises instead of starting a login flow on stdin.

    The SDK's default handler (``resolve_by_login_flow``) would prompt in the middle of
    ``iosvc stage``, which may be running in a batch job with nobody to answer.
    """

    def __init__(self, collections: Sequence[str]) -> None:
        self.collections = list(collections)

    def __call__(self, app: globus_sdk.GlobusApp, error: TokenValidationError) -> None:
        raise Unauthenticated(
            f"the Globus login of iosvc is missing, expired or lacks consent ({error}); "
            f"run: {_login_command(self.collections)}"
        )


def make_user_app(
    *,
    environ: Mapping[str, str] = os.environ,
    interactive: bool = False,
    local_server: bool = False,
    collections: Sequence[str] = (),
) -> globus_sdk.UserApp:
    """The native Globus app of ``iosvc login``, with refresh tokens under :func:`globus_dir`.

    Parameters
    ----------
    interactive
        Allow login flows (``iosvc login``). Otherwise a missing or insufficient login raises
        :class:`~iosvc.errors.Unauthenticated` naming ``iosvc login`` with ``collections``.
    local_server
        Log in through a browser and a local redirect server instead of pasting a code.
    """
    client_id = _native_client_id(environ)
    directory = globus_dir(environ)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Namespaced by client id: tokens of another native app are no use to this one.
    storage = JSONTokenStorage(directory / "tokens.json", namespace=f"user-{client_id}")
    config = globus_sdk.GlobusAppConfig(
        request_refresh_tokens=True,
        token_storage=storage,
        login_flow_manager="local-server" if local_server else "command-line",
        token_validation_error_handler=(
            resolve_by_login_flow if interactive else _RefuseLogin(collections)
        ),
    )
    return globus_sdk.UserApp(APP_NAME, client_id=client_id, config=config)


def _client_app(client_id: str, secret: str) -> globus_sdk.ClientApp:
    # Memory storage: a client-credentials token is one request away, and no secret-derived
    # token is left on disk.
    config = globus_sdk.GlobusAppConfig(token_storage="memory")
    return globus_sdk.ClientApp(APP_NAME, client_id=client_id, client_secret=secret, config=config)


def make_app(
    *, environ: Mapping[str, str] = os.environ, collections: Sequence[str] = ()
) -> globus_sdk.GlobusApp:
    """The Globus app ``iosvc stage`` acts as; it never prompts.

    A ``ClientApp`` when ``$IOSVC_GLOBUS_CLIENT_ID`` and ``$IOSVC_GLOBUS_CLIENT_SECRET`` are
    set (a service account: it needs its own permissions on each collection, it does not
    inherit yours), otherwise the non-interactive :func:`make_user_app`.
    """
    credentials = _client_credentials(environ)
    if credentials is not None:
        return _client_app(*credentials)
    return make_user_app(environ=environ, collections=collections)


def data_access_collections(
    transfer_client: globus_sdk.TransferClient, collections: Iterable[str]
) -> tuple[list[str], dict[str, str]]:
    """Split collections into those needing ``data_access`` consent and the others.

    Only non-high-assurance GCSv5 mapped collections take the scope; asking for it on any other
    kind fails the login with "Unknown Scope" (``add_app_data_access_scope``'s docstring; the
    check is the SDK's "detecting data_access" recipe).

    Returns
    -------
    tuple
        The collection ids that need consent, and ``{id: why not}`` for the others.

    Raises
    ------
    InvalidArgument
        For the id of a GCSv5 endpoint, which is not a collection.
    """
    mapped: list[str] = []
    others: dict[str, str] = {}
    for cid in _collections(collections):
        doc = _call(
            functools.partial(transfer_client.get_endpoint, cid),
            f"looking up Globus collection {cid}",
            [("", cid)],
        )
        kind = str(doc.get("entity_type") or "unknown type")
        name = doc.get("display_name") or cid
        if kind == "GCSv5_endpoint":
            raise InvalidArgument(
                f"{cid} ({name}) is a Globus Connect Server endpoint, not a collection: use the "
                "id of one of its collections"
            )
        if kind == "GCSv5_mapped_collection" and not doc.get("high_assurance"):
            mapped.append(cid)
        else:
            ha = " (high assurance)" if doc.get("high_assurance") else ""
            others[cid] = f"{name}: {kind}{ha}, needs no data_access consent"
    return mapped, others


def _consents_file(environ: Mapping[str, str]) -> Path:
    return globus_dir(environ) / "collections.json"


def consented_collections(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Collections ``iosvc login`` obtained data_access consent for (with this native app)."""
    try:
        data = json.loads(_consents_file(environ).read_text())
        client_id = _native_client_id(environ)
    except (FileNotFoundError, ValueError):  # InvalidArgument is a ValueError
        return []
    if not isinstance(data, dict) or data.get("client_id") != client_id:
        return []  # consents given to another native app are not this one's
    return [str(c) for c in data.get("collections") or []]


def remember_collections(
    collections: Iterable[str], *, environ: Mapping[str, str] = os.environ
) -> None:
    """Record collections whose data_access consent the stored login holds."""
    path = _consents_file(environ)
    known = sorted({*consented_collections(environ), *collections})
    data = {"client_id": _native_client_id(environ), "collections": known}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def make_transfer_client(
    collections: Sequence[str] = (), *, environ: Mapping[str, str] = os.environ
) -> globus_sdk.TransferClient:
    """A ``TransferClient`` for transfers between ``collections``; never prompts.

    With a service account (:func:`make_app`), each collection is looked up and the
    ``data_access`` scope requested for the mapped ones. With a user login, the scope is
    requested for the collections ``iosvc login --collection`` consented to; a missing consent
    surfaces as :class:`~iosvc.errors.ConsentRequired` naming the ``iosvc login`` to run.

    Raises
    ------
    Unauthenticated
        If nobody logged in (the message says which ``iosvc login`` to run), or only one of
        the client-credential variables is set.
    InvalidArgument
        If no Globus app is configured, or a collection id is not a UUID.
    """
    wanted = _collections(collections)
    credentials = _client_credentials(environ)
    if credentials is not None:
        probe = globus_sdk.TransferClient(app=_client_app(*credentials))
        mapped, _ = data_access_collections(probe, wanted)
        if not mapped:
            return probe
        # A fresh app, so its first token already carries the dependent scopes (a token that
        # was fetched without them would be reused as it is).
        client = globus_sdk.TransferClient(app=_client_app(*credentials))
        return client.add_app_data_access_scope(mapped)
    app = make_user_app(environ=environ, collections=wanted)
    if app.login_required():
        raise Unauthenticated(f"no Globus login for iosvc; run: {_login_command(wanted)}")
    client = globus_sdk.TransferClient(app=app)
    consented = set(consented_collections(environ))
    scoped = [c for c in wanted if c in consented]
    if scoped:
        client.add_app_data_access_scope(scoped)
    return client


@dataclass(frozen=True, slots=True)
class LoginResult:
    """What :func:`login` did."""

    #: collections whose data_access consent the login now holds
    consented: list[str] = field(default_factory=list)
    #: collections that need no consent, with the reason
    others: dict[str, str] = field(default_factory=dict)
    token_file: Path | None = None


def _login_once(app: globus_sdk.UserApp, *, force: bool) -> None:
    try:
        app.login(force=force)
    except CommandLineLoginFlowEOFError:
        raise Unauthenticated(
            "iosvc login needs a terminal to paste the Globus code into; for batch jobs use "
            f"a service account ({CLIENT_ID_ENV} and {CLIENT_SECRET_ENV})"
        ) from None
    except LocalServerEnvironmentalLoginError:
        raise  # handled by login(): falls back to pasting a code
    except LocalServerLoginError as exc:
        raise Unauthenticated(f"Globus login failed: {exc}") from exc
    except TokenValidationError as exc:
        raise Unauthenticated(
            f"Globus login not stored ({exc}); if you logged in as a different identity than "
            "before, run `iosvc logout` first"
        ) from exc
    except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError) as err:
        raise _translate(err, "logging in to Globus") from err


def login(
    collections: Sequence[str] = (),
    *,
    local_server: bool = True,
    force: bool = False,
    environ: Mapping[str, str] = os.environ,
) -> LoginResult:
    """Log the user in to Globus for ``iosvc stage`` (interactive), storing refresh tokens.

    Then asks for ``data_access`` consent on those of ``collections`` that need it (a second
    Globus page, only if that consent is missing), and remembers them for
    :func:`make_transfer_client`.

    Parameters
    ----------
    local_server
        Open a browser and catch the redirect locally; ignored (a code is pasted instead)
        over SSH, as globus-cli does, or when no browser can be opened.
    force
        Log in again even if valid tokens exist (e.g. to change identity).

    Raises
    ------
    InvalidArgument
        If a service account is configured (it needs no login), or an id is not a UUID.
    """
    if environ.get(CLIENT_ID_ENV):
        raise InvalidArgument(
            f"{CLIENT_ID_ENV} is set: iosvc acts as that Globus service account and needs no "
            f"login; unset {CLIENT_ID_ENV} and {CLIENT_SECRET_ENV} to log in as yourself"
        )
    wanted = _collections(collections)
    browser = local_server and not _remote_session(environ)
    app = make_user_app(environ=environ, interactive=True, local_server=browser)
    try:
        _login_once(app, force=force)
    except LocalServerEnvironmentalLoginError:
        app = make_user_app(environ=environ, interactive=True, local_server=False)
        _login_once(app, force=force)
    client = globus_sdk.TransferClient(app=app)
    mapped, others = data_access_collections(client, wanted)
    if mapped:
        client.add_app_data_access_scope(mapped)
        _login_once(app, force=False)  # a second page only if the consent is missing
        remember_collections(mapped, environ=environ)
    return LoginResult(mapped, others, globus_dir(environ) / "tokens.json")


def logout(*, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Revoke and delete iosvc's Globus tokens; returns warnings (e.g. revocation failed).

    Tokens are deleted here even when Globus cannot be reached to revoke them.
    """
    warnings: list[str] = []
    app = make_user_app(environ=environ, interactive=True)
    try:
        app.logout(sweep=True)
    except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError) as err:
        storage = app.token_storage.token_storage
        for resource_server in list(storage.get_token_data_by_resource_server()):
            storage.remove_token_data(resource_server)
        warnings.append(
            f"Globus did not revoke the tokens ({err}); they are deleted here: revoke them at "
            "https://app.globus.org/account/consents"
        )
    _consents_file(environ).unlink(missing_ok=True)
    return warnings
