"""A real one-node Slurm (Debian's slurm-wlm + munge) runs the burst buffer of deploy/slurm/.

The test installs and starts Slurm itself when it can (root, apt), submits
``deploy/slurm/iosvc-burst-buffer.sbatch`` with the site's Prolog/TaskProlog/Epilog, and checks
that the job's servers accepted the token the Prolog minted and saw the identity Slurm gave.
It is one test on purpose: one Slurm per machine, so it must not run on two xdist workers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "slurm"
ENV_FILE = Path("/etc/iosvc/slurm.env")

CLIENT = """
import json, os
from iosvc.client import Client
client = Client()
me = client.aio.identity
client.write(f"{me.user}/from-slurm", b"hello from a slurm job")
assert client.read(f"{me.user}/from-slurm") == b"hello from a slurm job"
token_file = os.environ["IOSVC_TOKEN_FILE"]
print(json.dumps({
    "job": os.environ["SLURM_JOB_ID"],
    "token_file": token_file,
    "token_mode": oct(os.stat(token_file).st_mode & 0o777),
    "token_matches": open(token_file).read().strip() == client.aio.token,
    "seen": [job for s in client.call_all({"op": "stats"}) for job in s["jobs"]],
}))
"""


def _run(*cmd: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def _ensure_slurm() -> str | None:
    """Install slurm-wlm and munge if needed; None if ready, else why not."""
    if os.geteuid() != 0:
        return "starting Slurm needs root"
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if not shutil.which("apt-get"):
        return "slurm-wlm is not installed and apt-get is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        _run("apt-get", "update", "-qq", env=env, timeout=300)
        _run("apt-get", "install", "-y", "-qq", "slurm-wlm", "munge", env=env, timeout=600)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"cannot install slurm-wlm and munge: {exc}"
    return None


def _stop_daemons() -> None:
    for daemon in ("slurmd", "slurmctld"):
        subprocess.run(["pkill", "-x", daemon], capture_output=True)
    for _ in range(50):
        if subprocess.run(["pgrep", "-x", "slurmctld|slurmd"], capture_output=True).returncode:
            return
        time.sleep(0.1)


def _start(work: Path) -> dict[str, str]:
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode:
        if not Path("/etc/munge/munge.key").exists():
            _run("runuser", "-u", "munge", "--", "mungekey", "--create")
        _run("runuser", "-u", "munge", "--", "munged")
    host = socket.gethostname()
    for sub in ("spool", "state"):
        (work / sub).mkdir()
    conf = work / "slurm.conf"
    conf.write_text(
        f"""ClusterName=iosvctest
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
PrologFlags=Alloc
Prolog={DEPLOY}/prolog.sh
TaskProlog={DEPLOY}/task_prolog.sh
Epilog={DEPLOY}/epilog.sh
SlurmctldPidFile={work}/slurmctld.pid
SlurmdPidFile={work}/slurmd.pid
SlurmdSpoolDir={work}/spool
StateSaveLocation={work}/state
SlurmctldLogFile={work}/slurmctld.log
SlurmdLogFile={work}/slurmd.log
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    _stop_daemons()
    _run("slurmctld", "-i", env=env)
    _run("slurmd", env=env)
    deadline = time.monotonic() + 60
    while "idle" not in _run("sinfo", "-h", "-o", "%t", env=env):
        if time.monotonic() > deadline:
            raise RuntimeError(
                "slurmd never became idle: " + (work / "slurmd.log").read_text()[-2000:]
            )
        time.sleep(0.3)
    return env


def test_slurm_job_runs_the_burst_buffer_with_the_prolog_token(tmp_path: Path) -> None:
    why = _ensure_slurm()
    if why is not None:
        pytest.skip(why)
    from iosvc.identity import new_key_file

    key = tmp_path / "cluster.key"
    new_key_file(key)
    tokens = tmp_path / "tokens"
    venv_bin = Path(sys.executable).parent
    ENV_FILE.parent.mkdir(parents=True, exist_ok=True)
    ENV_FILE.write_text(
        f"IOSVC_BIN={venv_bin}/iosvc\nIOSVC_KEY_FILE={key}\nIOSVC_TOKEN_DIR={tokens}\n"
    )
    try:
        env = _start(tmp_path)
        env["PATH"] = f"{venv_bin}:{env['PATH']}"
        env["BB_DIR"] = str(tmp_path / "bb")
        client = tmp_path / "client.py"
        client.write_text(CLIENT)
        out = tmp_path / "job.out"
        _run(
            "sbatch",
            "--wait",
            "-N",
            "1",
            "-o",
            str(out),
            "-D",
            str(tmp_path),
            str(DEPLOY / "iosvc-burst-buffer.sbatch"),
            str(client),
            env=env,
            timeout=180,
        )
        lines = out.read_text().splitlines()
        report = json.loads(next(line for line in lines if line.startswith("{")))
        job = report["job"]
        assert report["token_file"] == str(tokens / f"{job}.token")
        assert report["token_mode"] == "0o600" and report["token_matches"]
        seen = {entry[0]: entry[:4] for entry in report["seen"]}
        user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        group = subprocess.run(["id", "-gn"], capture_output=True, text=True).stdout.strip()
        assert seen[job] == [job, user, group, 1]  # what Slurm gave, from the token alone
        text = out.read_text()
        assert "secure" in text  # iosvc status in the job: token-only identities
        assert "stopping" in text and "Killed" not in text  # SIGTERM: a graceful stop
        assert not (tokens / f"{job}.token").exists()  # the Epilog removed it
        assert stat.S_IMODE(tokens.stat().st_mode) == 0o711
    finally:
        _stop_daemons()
        ENV_FILE.unlink(missing_ok=True)
