"""The Globus backend and login against recorded Globus API responses; no live service.

Each file in ``globus_responses/`` is a response set in the shape globus-cli keeps its API
fixtures (``{"metadata": ..., "responses": {case: response or [responses in order]}}``),
registered with ``globus_sdk.testing.register_response_set`` as ``iosvc.<file name>``. A URL
nothing is registered for raises a connection error, so a test cannot reach the network.
Time is a fake clock: no test sleeps.
"""

from __future__ import annotations

import builtins
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import globus_sdk
import pytest
import responses
from globus_sdk.login_flows import CommandLineLoginFlowManager
from globus_sdk.testing import (
    RegisteredResponse,
    ResponseSet,
    get_last_request,
    load_response,
    load_response_set,
    register_response_set,
)
from globus_sdk.token_storage import JSONTokenStorage, TokenStorageData

from iosvc.errors import (
    ERROR_BY_NAME,
    ConsentRequired,
    DataCorruption,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from iosvc.staging import (
    Catalog,
    Endpoint,
    FileEntry,
    Stager,
    TaskStatus,
    TransferRequest,
    load_sites,
)
from iosvc.staging._globus import (
    GlobusBackend,
    consented_collections,
    data_access_collections,
    login,
    logout,
    make_app,
    make_transfer_client,
    remember_collections,
)

pytestmark = pytest.mark.globus

HERE = Path(__file__).parent / "globus_responses"


def _register() -> dict[str, ResponseSet]:
    sets = {}
    for path in sorted(HERE.glob("*.json")):
        doc = json.loads(path.read_text())
        sets[path.stem] = register_response_set(
            f"iosvc.{path.stem}", doc["responses"], metadata=doc["metadata"]
        )
    return sets


SETS = _register()
SRC = SETS["errors"].metadata["source"]
DST = SETS["errors"].metadata["destination"]
TASK = SETS["errors"].metadata["task_id"]
GUEST = SETS["collections"].metadata["guest"]
NATIVE = "1f2e3d4c-5b6a-4978-8a9b-0c1d2e3f4a5b"
IDENTITY = "c7c5e6b2-7a1d-4a8e-9f3b-2b1c0d9e8f7a"
SERVICE = {"IOSVC_GLOBUS_CLIENT_ID": "7e5b1b3a-1c2d-4e3f-8a9b-0c1d2e3f4a5b"}
SERVICE["IOSVC_GLOBUS_CLIENT_SECRET"] = "s3cret"


def recorded(name: str, case: str) -> Any:
    """The body (or list of bodies) a response set serves for ``case``."""
    spec = json.loads((HERE / f"{name}.json").read_text())["responses"][case]
    return [s["json"] for s in spec] if isinstance(spec, list) else spec["json"]


def calls(method: str, path_end: str) -> list[Any]:
    return [
        c.request
        for c in responses.calls
        if c.request.method == method and urlparse(c.request.url).path.endswith(path_end)
    ]


@pytest.fixture(autouse=True)
def mocked_globus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("GLOBUS_SDK_ENVIRONMENT", "production")  # fixtures use production URLs
    monkeypatch.setenv("IOSVC_GLOBUS_DIR", str(tmp_path / "globus"))  # never ~/.iosvc
    for var in ("IOSVC_GLOBUS_CLIENT_ID", "IOSVC_GLOBUS_CLIENT_SECRET", "SSH_TTY"):
        monkeypatch.delenv(var, raising=False)

    def no_prompt(*args: object) -> str:
        raise AssertionError("something prompted on stdin")

    monkeypatch.setattr(builtins, "input", no_prompt)
    responses.start()
    yield
    responses.stop()
    responses.reset()


@pytest.fixture
def tc() -> Iterator[globus_sdk.TransferClient]:
    client = globus_sdk.TransferClient(authorizer=globus_sdk.AccessTokenAuthorizer("fake-token"))
    with client.retry_config.tune(max_retries=0):
        yield client


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user whose site configured a native app."""
    return {"IOSVC_GLOBUS_NATIVE_CLIENT_ID": NATIVE, "IOSVC_GLOBUS_DIR": str(tmp_path / "g")}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def backend(
    tc: globus_sdk.TransferClient,
    clock: FakeClock | None = None,
    poll: float = 5,
    stuck: float = 60,
) -> GlobusBackend:
    clock = clock or FakeClock()
    return GlobusBackend(
        tc, poll_interval=poll, stuck_after=stuck, cancel_wait=5, clock=clock, sleep=clock.sleep
    )


REQUEST = TransferRequest(
    dataset="ds",
    version=1,
    source=Endpoint("src", "file:///nowhere/src/ds", SRC, "/data/ds"),
    destination=Endpoint("dst", "file:///nowhere/dst/ds", DST, "/scratch/ds"),
    files=[FileEntry("a.bin", 10, "xxh3_128:0"), FileEntry("b/c.bin", 32, "xxh3_128:1")],
    label="iosvc stage ds v1 to dst",
)


# ------------------------------------------------------------------------------- submission
def test_submit_sends_checksum_sync_verify_and_the_recorded_submission_id(
    tc: globus_sdk.TransferClient,
) -> None:
    submit = load_response("iosvc.submit", case="submission_id")
    load_response("iosvc.submit", case="accepted")
    gb = backend(tc)
    submission = gb.new_submission_id(REQUEST)
    assert submission == submit.metadata["submission_id"]
    assert gb.submit(REQUEST, submission) == submit.metadata["task_id"]
    body = json.loads(get_last_request().body)  # type: ignore[union-attr]
    assert body["submission_id"] == submission
    assert body["sync_level"] == 3 and body["verify_checksum"] is True
    assert body["preserve_timestamp"] is True and body["fail_on_quota_errors"] is True
    assert (body["source_endpoint"], body["destination_endpoint"]) == (SRC, DST)
    assert body["label"] == REQUEST.label
    assert "deadline" not in body  # Globus extends the deadline only of tasks without one
    assert body["DATA"] == [
        {
            "DATA_TYPE": "transfer_item",
            "source_path": "/data/ds/",
            "destination_path": "/scratch/ds/",
            "recursive": True,
        }
    ]


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        (Endpoint("dst", "file:///x", DST, None), "site dst: .* missing or relative"),
        (Endpoint("dst", "file:///x", DST, "scratch/ds"), "site dst: .* missing or relative"),
        (Endpoint("dst", "file:///x", None, "/scratch"), "site dst has no globus_collection"),
    ],
)
def test_a_site_without_collection_or_absolute_path_is_refused_before_submitting(
    tc: globus_sdk.TransferClient, destination: Endpoint, message: str
) -> None:
    request = TransferRequest("ds", 1, REQUEST.source, destination, REQUEST.files)
    with pytest.raises(InvalidArgument, match=message):
        backend(tc).submit(request, "sub")
    assert not responses.calls


def test_resubmitting_after_a_crash_returns_the_first_task_and_starts_no_other(
    tc: globus_sdk.TransferClient,
) -> None:
    """The Transfer service as the docs describe it: a known submission id gets Duplicate
    and the task it made; the backend must send the recorded id, not ask for a new one."""
    accepted = recorded("submit", "accepted")
    duplicate = recorded("submit", "duplicate")
    tasks: dict[str, str] = {}

    def transfer_service(request: Any) -> tuple[int, dict[str, str], str]:
        submission = json.loads(request.body)["submission_id"]
        if submission in tasks:
            return 200, {}, json.dumps({**duplicate, "task_id": tasks[submission]})
        tasks[submission] = str(uuid.uuid4())
        return 202, {}, json.dumps({**accepted, "task_id": tasks[submission]})

    responses.add_callback(
        responses.POST, "https://transfer.api.globus.org/v0.10/transfer", transfer_service
    )
    load_response("iosvc.submit", case="submission_id")
    first = backend(tc)
    submission = first.new_submission_id(REQUEST)  # recorded by the caller ...
    task = first.submit(REQUEST, submission)  # ... which dies before recording the task id
    again = backend(tc).submit(REQUEST, submission)  # a new process, the recorded id
    assert again == task and len(tasks) == 1
    assert [json.loads(r.body)["submission_id"] for r in calls("POST", "/transfer")] == [
        submission,
        submission,
    ]
    assert len(calls("GET", "/submission_id")) == 1
    assert backend(tc).submit(REQUEST, "another-id") != task  # the fake does make new tasks


# ------------------------------------------------------------------------------- monitoring
def test_wait_reports_progress_from_bytes_transferred_until_success(
    tc: globus_sdk.TransferClient,
) -> None:
    load_response("iosvc.submit", case="accepted")
    load_response_set("iosvc.task_success")
    clock = FakeClock()
    gb = backend(tc, clock)
    seen: list[TaskStatus] = []
    status = gb.wait(gb.submit(REQUEST, "sub"), on_progress=seen.append)
    docs = recorded("task_success", "task")
    assert [s.state for s in seen] == ["pending", "active", "succeeded"]
    assert [s.bytes_done for s in seen] == [d["bytes_transferred"] for d in docs]
    assert {s.bytes_total for s in seen} == {REQUEST.total_bytes}
    last = docs[-1]
    assert status.files_done == last["files_transferred"] + last["files_skipped"]
    assert status.files_skipped == last["files_skipped"] and status.error is None
    assert clock.sleeps == [5, 5]


def test_a_failed_task_surfaces_its_error_events_and_the_next_step(
    tc: globus_sdk.TransferClient,
) -> None:
    load_response_set("iosvc.task_failed")
    status = backend(tc).wait(TASK)
    fatal = recorded("task_failed", "task")[-1]["fatal_error"]
    events = recorded("task_failed", "events")["DATA"]
    assert status.state == "failed"
    assert status.error is not None
    assert f"{fatal['code']}: {fatal['description']}" in status.error
    assert "550 Permission denied." in status.error  # the newest error event's details
    assert "ask the collection's admins" in status.error
    assert f"https://app.globus.org/activity/{TASK}" in status.error
    errors = [e for e in events if e["is_error"]]
    assert len(status.events) == len(errors)
    assert status.events[0].startswith(max(e["time"] for e in errors))
    assert all("STARTED" not in line for line in status.events)


def test_a_task_stuck_on_a_missing_source_fails_early_and_is_cancelled(
    tc: globus_sdk.TransferClient,
) -> None:
    """ACTIVE with faults until the deadline (globus-cli#1056): give up after stuck_after."""
    load_response_set("iosvc.task_stuck")
    clock = FakeClock()
    gb = backend(tc, clock)
    before = gb.status(TASK)  # what `iosvc stage status` shows meanwhile
    assert before.state == "active" and before.error is None and before.events
    status = gb.wait(TASK)
    assert status.state == "failed" and status.error is not None
    assert "FILE_NOT_FOUND" in status.error and "no progress for 60 s" in status.error
    assert "globus_path" in status.error and "iosvc cancelled the task" in status.error
    assert 60 <= clock.now < 65  # stuck_after, not the task's 24 h deadline
    assert len(calls("POST", "/cancel")) == 1
    assert len(status.events) == 2


@pytest.mark.parametrize("scenario", ["task_faults_progressing", "task_transient_faults"])
def test_faults_that_progress_or_may_pass_do_not_stop_the_task(
    tc: globus_sdk.TransferClient, scenario: str
) -> None:
    """Polled every 30 s with stuck_after=60 s: a naive 'faults and a fatal event' rule
    would cancel both at t=60 s, before Globus finishes them."""
    load_response_set(f"iosvc.{scenario}")
    clock = FakeClock()
    status = backend(tc, clock, poll=30, stuck=60).wait(TASK)
    assert status.state == "succeeded" and clock.now >= 120
    assert not calls("POST", "/cancel")


def test_an_inactive_task_fails_early_with_the_login_to_run(
    tc: globus_sdk.TransferClient,
) -> None:
    load_response_set("iosvc.task_inactive")
    status = backend(tc).wait(TASK)
    assert status.state == "failed" and status.error is not None
    assert "INACTIVE" in status.error and "iosvc login --force" in status.error
    assert len(calls("POST", "/cancel")) == 1


def test_wait_rides_out_a_short_globus_outage(tc: globus_sdk.TransferClient) -> None:
    outage = SETS["errors"].lookup("unavailable")
    down = RegisteredResponse(
        service="transfer", method="GET", path=f"/v0.10/task/{TASK}", status=503, json=outage.json
    )
    down.add()
    down.add()
    RegisteredResponse(
        service="transfer", path=f"/v0.10/task/{TASK}", json=recorded("task_success", "task")[-1]
    ).add()
    seen: list[str] = []
    status = backend(tc).wait(TASK, on_progress=lambda s: seen.append(s.state))
    assert status.state == "succeeded" and seen == ["succeeded"]
    assert len(calls("GET", f"/task/{TASK}")) == 3


def test_wait_gives_up_when_globus_stays_down(tc: globus_sdk.TransferClient) -> None:
    outage = SETS["errors"].lookup("unavailable")
    RegisteredResponse(
        service="transfer", method="GET", path=f"/v0.10/task/{TASK}", status=503, json=outage.json
    ).add()
    clock = FakeClock()
    with pytest.raises(Unavailable, match="Globus is unavailable"):
        backend(tc, clock).wait(TASK)
    assert 60 <= clock.now < 65


def test_wait_returns_the_running_task_at_its_timeout(tc: globus_sdk.TransferClient) -> None:
    RegisteredResponse(
        service="transfer", path=f"/v0.10/task/{TASK}", json=recorded("task_success", "task")[0]
    ).add()
    clock = FakeClock()
    status = backend(tc, clock).wait(TASK, timeout=12)
    assert status.state == "pending" and not status.finished
    assert clock.sleeps == [5, 5, 2]


def test_cancel_waits_until_globus_reports_the_task_cancelled(
    tc: globus_sdk.TransferClient,
) -> None:
    load_response_set("iosvc.cancel")
    clock = FakeClock()
    status = backend(tc, clock).cancel(TASK)
    assert status.state == "canceled" and status.finished
    assert len(calls("POST", f"/task/{TASK}/cancel")) == 1
    assert clock.sleeps == [1.0]  # it was still ACTIVE once


# ----------------------------------------------------------------------------------- errors
def test_consent_required_names_the_exact_next_step(tc: globus_sdk.TransferClient) -> None:
    load_response("iosvc.errors", case="consent_required")
    with pytest.raises(ConsentRequired) as info:
        backend(tc).submit(REQUEST, "sub")
    message = str(info.value)
    # Only DST needs the consent, per the scope Globus asked for.
    assert message.endswith(
        f"run: iosvc login --collection {DST} (required scopes: "
        f"urn:globus:auth:scope:transfer.api.globus.org:all"
        f"[*https://auth.globus.org/scopes/{DST}/data_access])"
    )
    assert f"collection {DST} (site dst)" in message and SRC not in message
    assert isinstance(info.value, PermissionError)
    assert ERROR_BY_NAME["ConsentRequired"] is ConsentRequired


def test_a_session_requirement_names_the_identity_to_log_in_with(
    tc: globus_sdk.TransferClient,
) -> None:
    load_response("iosvc.errors", case="session_required")
    with pytest.raises(ConsentRequired, match=r"identity from example\.edu") as info:
        backend(tc).submit(REQUEST, "sub")
    assert f"run: iosvc login --force --collection {SRC} --collection {DST}" in str(info.value)


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("endpoint_not_found", NotFound, f"check globus_collection of collection {DST} \\(site"),
        (
            "permission_denied",
            PermissionDenied,
            f"denied on collection {DST} .*collection's admins",
        ),
        ("bad_request", InvalidArgument, "NoTransferItems"),
        ("unavailable", Unavailable, "try again later.* again is safe"),
    ],
)
def test_submission_errors_say_what_to_fix(
    tc: globus_sdk.TransferClient, case: str, error: type[Exception], message: str
) -> None:
    load_response("iosvc.errors", case=case)
    with pytest.raises(error, match=message):
        backend(tc).submit(REQUEST, "sub")


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("expired_login", Unauthenticated, "run: iosvc login --force"),
        ("task_not_found", NotFound, "another Globus identity"),
    ],
)
def test_task_errors_say_what_to_do(
    tc: globus_sdk.TransferClient, case: str, error: type[Exception], message: str
) -> None:
    load_response("iosvc.errors", case=case)
    with pytest.raises(error, match=message):
        backend(tc).status(TASK)


# ------------------------------------------------------------------------- through the stage
def _globus_sites(tmp_path: Path) -> tuple[Path, Path]:
    for name in ("src", "dst"):
        (tmp_path / name).mkdir()
    (tmp_path / "src/ds").mkdir()
    for i in range(5):
        (tmp_path / f"src/ds/f{i}.bin").write_bytes(bytes([i]) * (1000 + i))
    sites = tmp_path / "sites.toml"
    sites.write_text(
        f"""
[sites.src]
url = "{tmp_path}/src"
globus_collection = "{SRC}"
globus_path = "/data"
[sites.dst]
url = "{tmp_path}/dst"
globus_collection = "{DST}"
globus_path = "/scratch"
"""
    )
    return sites, tmp_path / "catalog.db"


def test_stage_retry_after_a_crash_between_submit_and_record_reuses_the_submission_id(
    tc: globus_sdk.TransferClient, tmp_path: Path
) -> None:
    """A stage that died after submitting left its task 'submitting' with the submission id;
    the next stage submits that id again and Globus answers Duplicate with the first task."""
    sites, catalog = _globus_sites(tmp_path)
    with Catalog(catalog) as cat:
        stager = Stager(cat, load_sites(sites), globus_backend=lambda s, d: backend(tc))
        stager.register("ds", name="ds", site="src")
        number = cat.add_task("ds", 1, "src", "dst", "globus", bytes_total=1, files_total=1)
        cat.update_task(number, submission_id="sub-from-the-first-attempt")
        load_response("iosvc.submit", case="duplicate")
        RegisteredResponse(
            service="transfer",
            path=f"/v0.10/task/{TASK}",
            json=recorded("task_success", "task")[-1],
        ).add()
        shutil.copytree(tmp_path / "src/ds", tmp_path / "dst/ds")  # what Globus copied
        [result] = stager.stage("ds", to="dst")
        [post] = calls("POST", "/transfer")
        assert json.loads(post.body)["submission_id"] == "sub-from-the-first-attempt"
        assert not calls("GET", "/submission_id")
        assert (result.task, result.state) == (number, "verified")
        assert cat.task(number).task_id == TASK and cat.task(number).state == "succeeded"


def test_stage_between_globus_sites_verifies_what_globus_copied(
    tc: globus_sdk.TransferClient, tmp_path: Path
) -> None:
    sites, catalog = _globus_sites(tmp_path)
    load_response("iosvc.submit", case="submission_id")
    load_response("iosvc.submit", case="accepted")
    load_response_set("iosvc.task_success")
    with Catalog(catalog) as cat:
        stager = Stager(cat, load_sites(sites), globus_backend=lambda s, d: backend(tc))
        stager.register("ds", name="ds", site="src")
        shutil.copytree(tmp_path / "src/ds", tmp_path / "dst/ds")
        [result] = stager.stage("ds", to="dst")
        assert result.state == "verified"
        [task] = cat.tasks("ds")
        assert (task.backend, task.state, task.task_id) == ("globus", "succeeded", TASK)
        body = json.loads(calls("POST", "/transfer")[0].body)
        assert body["DATA"][0]["source_path"] == "/data/ds/"
        # ...and a Globus "success" whose files do not check out here is not verified.
        (tmp_path / "dst/ds/f1.bin").write_bytes(b"tampered")
        load_response("iosvc.submit", case="accepted")
        with pytest.raises(DataCorruption, match="verification failed"):
            stager.stage("ds", to="dst")
        assert cat.replica("ds", 1, "dst").state == "failed"  # type: ignore[union-attr]


def test_no_wait_submits_and_status_verifies_when_globus_is_done(
    tc: globus_sdk.TransferClient, tmp_path: Path
) -> None:
    sites, catalog = _globus_sites(tmp_path)
    load_response("iosvc.submit", case="submission_id")
    load_response("iosvc.submit", case="accepted")
    with Catalog(catalog) as cat:
        stager = Stager(cat, load_sites(sites), globus_backend=lambda s, d: backend(tc))
        stager.register("ds", name="ds", site="src")
        [result] = stager.stage("ds", to="dst", wait=False)
        assert result.state == "transferring" and "iosvc stage status" in result.detail
        assert cat.replica("ds", 1, "dst").state == "transferring"  # type: ignore[union-attr]
        # A second stage while Globus still runs the first is refused, not resubmitted.
        with pytest.raises(Exception, match="is being staged to dst by task"):
            stager.stage("ds", to="dst", wait=False)
        shutil.copytree(tmp_path / "src/ds", tmp_path / "dst/ds")  # what Globus copied
        RegisteredResponse(
            service="transfer",
            path=f"/v0.10/task/{TASK}",
            json=recorded("task_success", "task")[-1],
        ).add()
        task = stager.refresh(result.task)  # type: ignore[arg-type]
        assert task.state == "succeeded"
        assert cat.replica("ds", 1, "dst").state == "verified"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- client & login
def _token_requests() -> list[dict[str, list[str]]]:
    return [parse_qs(r.body) for r in calls("POST", "/v2/oauth2/token")]


def test_a_service_account_from_the_environment_gets_data_access_for_mapped_collections_only(
    tmp_path: Path,
) -> None:
    load_response_set("iosvc.collections")
    assert isinstance(make_app(environ=SERVICE), globus_sdk.ClientApp)
    client = make_transfer_client([SRC, GUEST], environ=SERVICE)
    RegisteredResponse(
        service="transfer", path=f"/v0.10/task/{TASK}", json=recorded("task_success", "task")[0]
    ).add()
    client.get_task(TASK)
    assert [r.url.rsplit("/", 1)[1] for r in calls("GET", "")[:2]] == [SRC, GUEST]
    [grant] = {t["grant_type"][0] for t in _token_requests()}
    assert grant == "client_credentials"
    scope = _token_requests()[-1]["scope"][0]
    assert f"https://auth.globus.org/scopes/{SRC}/data_access" in scope
    assert GUEST not in scope


def test_a_service_account_with_no_mapped_collection_needs_one_token() -> None:
    load_response_set("iosvc.collections")
    client = make_transfer_client([GUEST], environ=SERVICE)
    RegisteredResponse(
        service="transfer", path=f"/v0.10/task/{TASK}", json=recorded("task_success", "task")[0]
    ).add()
    client.get_task(TASK)
    assert len(_token_requests()) == 1 and "data_access" not in _token_requests()[0]["scope"][0]


def test_half_a_service_account_or_no_native_app_is_refused_clearly() -> None:
    with pytest.raises(Unauthenticated, match="set both IOSVC_GLOBUS_CLIENT_ID and"):
        make_transfer_client(
            [], environ={"IOSVC_GLOBUS_CLIENT_ID": SERVICE["IOSVC_GLOBUS_CLIENT_ID"]}
        )
    with pytest.raises(InvalidArgument, match="set IOSVC_GLOBUS_NATIVE_CLIENT_ID"):
        make_transfer_client([], environ={})


def test_no_login_is_refused_with_the_command_to_run_without_prompting(
    env: dict[str, str],
) -> None:
    with pytest.raises(
        Unauthenticated, match=f"run: iosvc login --collection {SRC} --collection {DST}$"
    ):
        make_transfer_client([SRC, DST], environ=env)
    assert not responses.calls


def _store_login(env: dict[str, str]) -> None:
    """Tokens as `iosvc login` leaves them (transfer + openid, refresh tokens)."""
    storage = JSONTokenStorage(
        Path(env["IOSVC_GLOBUS_DIR"]) / "tokens.json", namespace=f"user-{NATIVE}"
    )
    expires = int(time.time()) + 3600
    transfer = "urn:globus:auth:scope:transfer.api.globus.org:all"
    storage.store_token_data_by_resource_server(
        {
            rs: TokenStorageData(rs, IDENTITY, scope, f"{rs}-AT", f"{rs}-RT", expires, "Bearer")
            for rs, scope in (("transfer.api.globus.org", transfer), ("auth.globus.org", "openid"))
        }
    )


def test_a_stored_login_is_used_and_missing_consent_raises_instead_of_prompting(
    env: dict[str, str],
) -> None:
    _store_login(env)
    RegisteredResponse(
        service="transfer", path=f"/v0.10/task/{TASK}", json=recorded("task_success", "task")[0]
    ).add()
    make_transfer_client([SRC, DST], environ=env).get_task(TASK)
    assert (
        responses.calls[-1].request.headers["Authorization"] == "Bearer transfer.api.globus.org-AT"
    )
    # The login is remembered to hold DST's data_access consent, but Globus Auth has none.
    remember_collections([DST], environ=env)
    RegisteredResponse(
        service="auth", path=f"/v2/api/identities/{IDENTITY}/consents", json={"consents": []}
    ).add()
    client = make_transfer_client([SRC, DST], environ=env)
    with pytest.raises(
        Unauthenticated, match=f"run: iosvc login --collection {SRC} --collection {DST}"
    ):
        client.get_task(TASK)


def test_data_access_is_detected_per_collection_kind(tc: globus_sdk.TransferClient) -> None:
    meta = load_response_set("iosvc.collections").metadata
    mapped, others = data_access_collections(
        tc, [meta["mapped"], meta["guest"], meta["high_assurance"]]
    )
    assert mapped == [meta["mapped"]]
    assert "GCSv5_guest_collection" in others[meta["guest"]]
    assert "high assurance" in others[meta["high_assurance"]]
    with pytest.raises(InvalidArgument, match="endpoint, not a collection"):
        data_access_collections(tc, [meta["endpoint"]])
    with pytest.raises(InvalidArgument, match="not a UUID"):
        data_access_collections(tc, ["NERSC DTN"])


def test_login_asks_for_data_access_on_mapped_collections_and_remembers_them(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real command-line flow; only the human (URL in, code out) and the JWT signature
    check of the id token are stand-ins."""
    pages: list[str] = []
    monkeypatch.setattr(
        CommandLineLoginFlowManager, "print_authorize_url", lambda s, u: pages.append(u)
    )
    monkeypatch.setattr(CommandLineLoginFlowManager, "prompt_for_code", lambda s: "the-code")
    monkeypatch.setattr(globus_sdk.IDTokenDecoder, "decode", lambda s, t: {"sub": IDENTITY})
    tokens = {
        "access_token": "auth-AT", "refresh_token": "auth-RT", "expires_in": 172800,
        "resource_server": "auth.globus.org", "scope": "openid", "token_type": "Bearer",
        "id_token": "header.payload.signature", "state": "_default",
        "other_tokens": [{
            "access_token": "transfer-AT", "refresh_token": "transfer-RT", "expires_in": 172800,
            "resource_server": "transfer.api.globus.org", "token_type": "Bearer",
            "scope": "urn:globus:auth:scope:transfer.api.globus.org:all", "state": "_default",
        }],
    }  # fmt: skip
    for _ in range(2):  # the login, then the data_access consent
        RegisteredResponse(
            service="auth", method="POST", path="/v2/oauth2/token", json=tokens
        ).add()
    load_response_set("iosvc.collections")
    RegisteredResponse(
        service="auth", path=f"/v2/api/identities/{IDENTITY}/consents", json={"consents": []}
    ).add()
    result = login([SRC, GUEST], local_server=False, environ=env)
    assert result.consented == [SRC] and list(result.others) == [GUEST]
    scopes = [parse_qs(urlparse(page).query)["scope"][0] for page in pages]
    assert len(scopes) == 2 and "data_access" not in scopes[0]
    assert f"https://auth.globus.org/scopes/{SRC}/data_access" in scopes[1]
    assert GUEST not in scopes[1]
    assert consented_collections(env) == [SRC]
    assert result.token_file is not None and result.token_file.exists()
    # logout revokes both tokens and forgets the consents
    RegisteredResponse(service="auth", method="POST", path="/v2/oauth2/token/revoke", json={}).add()
    assert logout(environ=env) == []
    assert len(calls("POST", "/v2/oauth2/token/revoke")) == 4  # 2 access + 2 refresh tokens
    assert consented_collections(env) == []
    with pytest.raises(Unauthenticated, match="run: iosvc login"):
        make_transfer_client([], environ=env)


def test_login_is_refused_for_a_service_account(env: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument, match="IOSVC_GLOBUS_CLIENT_ID is set"):
        login([], environ={**env, **SERVICE})
    assert not responses.calls


def test_iosvc_login_and_logout_commands(iosvc_cli: Any, env: dict[str, str]) -> None:
    refused = iosvc_cli("login", "--collection", SRC, env={**env, **SERVICE})
    assert refused.returncode == 1
    assert refused.stderr.startswith("iosvc: error: IOSVC_GLOBUS_CLIENT_ID is set")
    assert "Traceback" not in refused.stderr
    bad = iosvc_cli("login", "--collection", "NERSC DTN", env=env)
    assert bad.returncode == 1 and "is not a UUID" in bad.stderr
    out = iosvc_cli("logout", env=env)  # no tokens: nothing to revoke, no network
    assert out.returncode == 0 and "logged out of Globus" in out.stdout
