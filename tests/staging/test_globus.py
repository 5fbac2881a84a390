"""The Globus backend against recorded Globus API responses (no live service is contacted).

Bodies live in ``globus_responses/``; they follow the Transfer API v0.10 documents (task,
event_list, transfer_result, error) as globus-sdk's own fixtures and globus-cli's recordings do.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import globus_sdk
import pytest
import responses
from globus_sdk.testing import RegisteredResponse, get_last_request, load_response

from iosvc.errors import NotFound, PermissionDenied, Unauthenticated
from iosvc.staging import Catalog, Endpoint, FileEntry, Stager, TransferRequest, load_sites
from iosvc.staging._globus import (
    GlobusBackend,
    GlobusConsentRequired,
    make_app,
    make_transfer_client,
)

pytestmark = pytest.mark.globus

HERE = Path(__file__).parent / "globus_responses"
SRC = "aa0e8d92-9c1b-4f1e-8f6c-1d2e3f4a5b6c"
DST = "bb1f9e03-ad2c-4a2f-9a7d-2e3f4a5b6c7d"
TASK = "42b8c8f2-6f5b-11ef-9a35-0affcfc1d1e5"


def recorded(name: str) -> Any:
    return json.loads((HERE / name).read_text())


def on_task(*names: str) -> None:
    """``GET /task/<id>`` answers these documents in order (the last one repeats)."""
    for name in names:
        RegisteredResponse(
            service="transfer", path=f"/v0.10/task/{TASK}", json=recorded(name)
        ).add()


def on_events(name: str) -> None:
    RegisteredResponse(
        service="transfer", path=f"/v0.10/task/{TASK}/event_list", json=recorded(name)
    ).add()


def on_submit(name: str = "submit_accepted.json", status: int = 200) -> None:
    RegisteredResponse(
        service="transfer",
        method="POST",
        path="/v0.10/transfer",
        status=status,
        json=recorded(name),
    ).add()


def posted() -> Any:
    """The body of the last transfer submission."""
    calls = [c for c in responses.calls if c.request.url.endswith("/v0.10/transfer")]
    return json.loads(calls[-1].request.body)


@pytest.fixture(autouse=True)
def mocked_globus(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # globus_sdk.testing's recipe: unregistered URLs raise ConnectionError, so nothing leaks out.
    monkeypatch.setenv("GLOBUS_SDK_ENVIRONMENT", "production")
    responses.start()
    yield
    responses.stop()
    responses.reset()


@pytest.fixture
def tc() -> Iterator[globus_sdk.TransferClient]:
    client = globus_sdk.TransferClient(authorizer=globus_sdk.AccessTokenAuthorizer("fake-token"))
    with client.retry_config.tune(max_retries=0):
        yield client


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def backend(tc: globus_sdk.TransferClient, clock: FakeClock | None = None) -> GlobusBackend:
    clock = clock or FakeClock()
    return GlobusBackend(tc, poll_interval=5, stuck_after=60, sleep=clock.sleep, clock=clock)


REQUEST = TransferRequest(
    dataset="ds",
    version=1,
    source=Endpoint("src", "file:///nowhere/src/ds", SRC, "/data/ds"),
    destination=Endpoint("dst", "file:///nowhere/dst/ds", DST, "/scratch/ds"),
    files=[FileEntry("a.bin", 10, "xxh3_128:0")],
    label="iosvc stage ds v1 to dst",
)


def test_submit_sends_checksum_sync_verify_and_the_recorded_submission_id(
    tc: globus_sdk.TransferClient,
) -> None:
    submission = load_response(tc.get_submission_id).metadata["submission_id"]
    load_response(tc.submit_transfer)
    gb = backend(tc)
    assert gb.new_submission_id(REQUEST) == submission
    task_id = gb.submit(REQUEST, submission)
    assert task_id == load_response(tc.submit_transfer).metadata["task_id"]
    body = json.loads(get_last_request().body)  # type: ignore[union-attr]
    assert body["submission_id"] == submission
    assert body["sync_level"] == 3 and body["verify_checksum"] is True
    assert body["source_endpoint"] == SRC and body["destination_endpoint"] == DST
    assert body["DATA"] == [
        {
            "DATA_TYPE": "transfer_item",
            "source_path": "/data/ds/",
            "destination_path": "/scratch/ds/",
            "recursive": True,
        }
    ]


def test_wait_follows_progress_to_success(tc: globus_sdk.TransferClient) -> None:
    on_task("task_active_start.json", "task_active_half.json", "task_succeeded.json")
    clock = FakeClock()
    seen: list[tuple[str, int]] = []
    status = backend(tc, clock).wait(
        TASK, on_progress=lambda s: seen.append((s.state, s.bytes_done))
    )
    assert status.state == "succeeded" and status.files_skipped == 2
    assert seen == [("active", 0), ("active", 12_000_000), ("succeeded", 27_000_000)]
    assert clock.sleeps == [5, 5]


def test_failure_surfaces_the_error_events(tc: globus_sdk.TransferClient) -> None:
    on_task("task_active_half.json", "task_failed.json")
    on_events("events_errors.json")
    status = backend(tc).wait(TASK)
    assert status.state == "failed"
    assert status.error == "permission denied writing to the destination"
    assert len(status.events) == 1 and status.events[0].startswith("PERMISSION_DENIED")
    assert "550 Permission denied" in status.events[0]


def test_task_stuck_on_a_missing_path_fails_early_and_is_cancelled(
    tc: globus_sdk.TransferClient,
) -> None:
    """ACTIVE with faults forever (globus-cli#1056): give up after stuck_after, not the deadline."""
    on_task("task_active_faults.json")
    on_events("events_path_not_found.json")
    cancel = RegisteredResponse(
        service="transfer",
        method="POST",
        path=f"/v0.10/task/{TASK}/cancel",
        json=recorded("cancel_ok.json"),
    )
    cancel.add()
    clock = FakeClock()
    status = backend(tc, clock).wait(TASK)
    assert status.state == "failed" and "PATH_NOT_FOUND" in (status.error or "")
    assert 60 <= clock.now <= 70  # stuck_after, not the task's deadline
    assert any(c.request.url.endswith("/cancel") for c in responses.calls)


def test_retry_after_crash_between_submit_and_record_reuses_the_submission_id(
    tc: globus_sdk.TransferClient, tmp_path: Path
) -> None:
    """A stage that died after submitting left its task 'submitting' with the submission id.
    The next stage submits with that same id; Globus answers Duplicate with the first task."""
    sites, catalog = _globus_sites(tmp_path)
    with Catalog(catalog) as cat:
        stager = Stager(cat, load_sites(sites), globus_backend=lambda s, d: backend(tc))
        stager.register("ds", name="ds", site="src")
        number = cat.add_task("ds", 1, "src", "dst", "globus", bytes_total=1, files_total=1)
        cat.update_task(number, submission_id="sub-from-the-first-attempt")
        RegisteredResponse(
            service="transfer",
            method="POST",
            path="/v0.10/transfer",
            json=recorded("submit_duplicate.json"),
        ).add()
        on_task("task_succeeded.json")
        shutil.copytree(tmp_path / "src/ds", tmp_path / "dst/ds")  # what Globus copied
        [result] = stager.stage("ds", to="dst")
        assert posted()["submission_id"] == "sub-from-the-first-attempt"
        assert not any("submission_id" in c.request.url for c in responses.calls)  # no new id
        assert (result.task, result.state) == (number, "verified")
        assert cat.task(number).task_id == TASK and cat.task(number).state == "succeeded"


def test_stage_between_globus_sites_end_to_end(
    tc: globus_sdk.TransferClient, tmp_path: Path
) -> None:
    sites, catalog = _globus_sites(tmp_path)
    load_response(tc.get_submission_id)
    on_submit()
    on_task("task_active_half.json", "task_succeeded.json")
    with Catalog(catalog) as cat:
        stager = Stager(cat, load_sites(sites), globus_backend=lambda s, d: backend(tc))
        stager.register("ds", name="ds", site="src")
        shutil.copytree(tmp_path / "src/ds", tmp_path / "dst/ds")
        [result] = stager.stage("ds", to="dst")
        assert result.state == "verified"
        [task] = cat.tasks("ds")
        assert (task.backend, task.state, task.task_id) == ("globus", "succeeded", TASK)
        # ...and a Globus "success" whose files do not check out here is not verified.
        (tmp_path / "dst/ds/f1.bin").write_bytes(b"tampered")
        load_response(tc.get_submission_id)
        on_submit()
        with pytest.raises(Exception, match="verification failed"):
            stager.stage("ds", to="dst")
        assert cat.replica("ds", 1, "dst").state == "failed"  # type: ignore[union-attr]


def test_consent_required_names_the_exact_next_step(tc: globus_sdk.TransferClient) -> None:
    RegisteredResponse(
        service="transfer",
        method="POST",
        path="/v0.10/transfer",
        status=403,
        json=recorded("consent_required.json"),
    ).add()
    with pytest.raises(GlobusConsentRequired) as info:
        backend(tc).submit(REQUEST, "sub")
    message = str(info.value)
    assert f"run: iosvc login --collection {SRC} --collection {DST}" in message
    assert f"https://auth.globus.org/scopes/{DST}/data_access" in message
    assert isinstance(info.value, PermissionError)


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [
        (404, "endpoint_not_found.json", NotFound, "check globus_collection and globus_path"),
        (403, "permission_denied.json", PermissionDenied, "ask the collection's admin"),
    ],
)
def test_endpoint_errors_say_what_to_fix(
    tc: globus_sdk.TransferClient, status: int, body: str, error: type, message: str
) -> None:
    RegisteredResponse(
        service="transfer",
        method="POST",
        path="/v0.10/transfer",
        status=status,
        json=recorded(body),
    ).add()
    with pytest.raises(error, match=message):
        backend(tc).submit(REQUEST, "sub")


def test_cancel(tc: globus_sdk.TransferClient) -> None:
    RegisteredResponse(
        service="transfer",
        method="POST",
        path=f"/v0.10/task/{TASK}/cancel",
        json=recorded("cancel_ok.json"),
    ).add()
    on_task("task_canceled.json")
    status = backend(tc).cancel(TASK)
    assert status.state == "canceled"
    assert responses.calls[0].request.method == "POST"


def test_client_credentials_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOSVC_GLOBUS_DIR", str(tmp_path))
    env = {
        "IOSVC_GLOBUS_CLIENT_ID": "7e5b1b3a-0000-4000-8000-0000000000aa",
        "IOSVC_GLOBUS_CLIENT_SECRET": "s3cret",
    }
    assert isinstance(make_app(environ=env), globus_sdk.ClientApp)
    assert isinstance(make_transfer_client([SRC], environ=env), globus_sdk.TransferClient)
    with pytest.raises(Unauthenticated, match="both IOSVC_GLOBUS_CLIENT_ID"):
        make_transfer_client([], environ={"IOSVC_GLOBUS_CLIENT_ID": "x"})


def test_no_login_is_refused_with_the_command_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOSVC_GLOBUS_DIR", str(tmp_path))
    with pytest.raises(Unauthenticated, match=f"run: iosvc login --collection {DST}"):
        make_transfer_client([DST], environ={})


def _globus_sites(tmp_path: Path) -> tuple[Path, Path]:
    for name in ("src", "dst"):
        (tmp_path / name).mkdir()
    for i in range(5):
        (tmp_path / "src/ds").mkdir(exist_ok=True)
        (tmp_path / f"src/ds/f{i}.bin").write_bytes(os.urandom(1000 + i))
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
