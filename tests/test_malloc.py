"""glibc malloc tuning (iosvc._malloc): applied, and without a subprocess on the way."""

from __future__ import annotations

import platform
import subprocess
from typing import Any

import pytest

from iosvc._malloc import tune_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_malloc_is_tuned_without_running_a_program(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_programs(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"ran a program: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_programs)
    assert tune_malloc(trim_threshold=256 << 20, top_pad=16 << 20)
