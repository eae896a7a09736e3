"""`xtra submit`: run a job command (pretrain, probe, sweep) on a Ray cluster as a Ray job.

A thin layer over Ray's Job Submission SDK (`ray.job_submission.JobSubmissionClient`, what
`ray job submit` uses): the entrypoint is `python -m pipelines.cli <command> <args>` and the
runtime environment comes from `cluster/runtime_env.yaml` (pinned pip packages, working_dir
excludes, env vars), with the project directory as working_dir. Without `follow` the job runs
detached and the caller gets its id and the `ray job` commands to follow its logs or stop it.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from pipelines.errors import UserError

JOB_COMMANDS = ("pretrain", "probe", "sweep")
DEFAULT_RUNTIME_ENV = Path("cluster") / "runtime_env.yaml"
# runtime-env fields that install packages: `no_pip` drops them (the nodes already have them)
PACKAGE_FIELDS = ("pip", "uv", "conda")
# a head just started accepts connections a few seconds before its job agent is up
AGENT_WAIT_S = 60.0
NO_AGENT = "No available agent"


@dataclass
class Submission:
    """A submitted job: its id, the job server's address and the entrypoint it runs."""

    submission_id: str
    address: str
    entrypoint: str

    def commands(self) -> dict[str, str]:
        """The `ray job` commands to follow, inspect and stop this job."""
        a, i = shlex.quote(self.address), shlex.quote(self.submission_id)
        return {
            "logs": f"ray job logs --address {a} --follow {i}",
            "status": f"ray job status --address {a} {i}",
            "stop": f"ray job stop --address {a} {i}",
        }


def load_runtime_env(
    path: str | Path | None = None, working_dir: str | Path | None = None, pip: bool = True
) -> dict[str, Any]:
    """The runtime env of a job: the YAML file (default `<working_dir>/cluster/runtime_env.yaml`)
    with `working_dir` set to `working_dir` (else the file's, relative to the current directory),
    and without its package fields when `pip` is False. Checked by Ray's own `RuntimeEnv`."""
    from ray.runtime_env import RuntimeEnv

    base = Path(working_dir) if working_dir is not None else Path.cwd()
    file = Path(path) if path is not None else base / DEFAULT_RUNTIME_ENV
    if not file.is_file():
        raise UserError(f"runtime env file {file} not found (give --runtime-env PATH)")
    try:
        env = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"runtime env file {file} is not valid YAML: {e}") from None
    if not isinstance(env, dict):
        raise UserError(f"runtime env file {file} must hold a mapping, not {type(env).__name__}")
    wd = Path(working_dir) if working_dir is not None else Path(env.get("working_dir") or ".")
    wd = wd.expanduser().resolve()
    if not (wd / "pipelines" / "cli.py").is_file():
        raise UserError(
            f"working dir {wd} is not the project directory (no pipelines/cli.py): "
            "run from the project root or give --working-dir"
        )
    env["working_dir"] = str(wd)
    if not pip:
        for k in PACKAGE_FIELDS:
            env.pop(k, None)
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as e:
        raise UserError(f"runtime env file {file}: {e}") from None
    return env


def job_entrypoint(command: str, args: list[str]) -> str:
    """The shell command the job runs on the cluster: the CLI's own subcommand."""
    if command not in JOB_COMMANDS:
        raise UserError(f"cannot submit {command!r}: choose one of {', '.join(JOB_COMMANDS)}")
    return shlex.join(["python", "-m", "pipelines.cli", command, *args])


def job_server_address(address: str | None) -> str:
    """`address`, else $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS (as `ray job submit`)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError(
            "no Ray address: give --address http://<head>:8265 (or set RAY_ADDRESS)"
        )
    return address


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot reach the Ray job server at {address}: {e}") from None


def submit(
    address: str | None,
    command: str,
    args: list[str],
    runtime_env: dict[str, Any],
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
) -> Submission:
    """Submit `xtra <command> <args>` as a Ray job; returns at once (the job runs detached)."""
    entrypoint = job_entrypoint(command, args)
    address = job_server_address(address)
    client = _client(address)
    submission_id = submission_id or (
        f"xtra-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=submission_id,
                entrypoint_num_cpus=entrypoint_num_cpus,
                metadata={"xtra_command": command},
            )
            break
        except RuntimeError as e:  # the SDK's error for a non-200 answer carries the server's text
            if NO_AGENT in str(e) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise UserError(f"job submission to {address} failed: {e}") from None
    return Submission(submission_id, address, entrypoint)


def follow(submission: Submission, out: TextIO | None = None) -> str:
    """Stream the job's logs to `out` (stdout) until it ends; returns its final status
    (SUCCEEDED, FAILED or STOPPED)."""
    out = out or sys.stdout
    client = _client(submission.address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission.submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the log stream closed early: fall back to polling the status
        print(f"[xtra] log stream ended ({e}); waiting for the job to finish", file=sys.stderr)
    while not (status := client.get_job_status(submission.submission_id)).is_terminal():
        time.sleep(2.0)
    return str(status.value)
