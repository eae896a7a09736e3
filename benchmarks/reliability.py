"""The reliability table of the README: runs the fault tests (tests/reliability, real Ray, DeepSpeed,
MLflow server, S3 server) and prints one row per fault with the figure each test measured.

    python -m benchmarks.reliability            # all fault tests (~25-45 min on 2 shared cores)
    python -m benchmarks.reliability -k sigkill  # a subset (pytest -k); other rows keep their last figures

The multi-node ones (node loss, autoscaling from zero) are tests/cluster/test_multinode.py.
Each test appends its figures to a JSON-lines file (`XTRA_RELIABILITY_FIGURES`); this script runs
pytest with that file set, then prints the table (markdown, pasted into the README's "Reliability
and security" section) and writes `benchmarks/results/reliability.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine, markdown_table, write_result

REPO = Path(__file__).resolve().parent.parent
FIGURES_ENV = "XTRA_RELIABILITY_FIGURES"  # the name tests/reliability/conftest.py reads

# test -> (the fault, how its figures read)
ROWS = {
    "worker_sigkill": ("worker SIGKILLed at a random step",
                       "killed after step {killed_after_step}, resumed from {resumed_from_step}: "
                       "{steps_redone} step(s) redone (interval {checkpoint_every}); "
                       "losses equal to the uninterrupted run {steps_matching_uninterrupted}"),
    "mlflow_outage": ("MLflow server stopped mid-run, started again",
                      "down {server_down_s} s; run finished; {steps_in_mlflow}/{steps} steps in MLflow"),
    "mlflow_outage_unit": ("MLflow down: cost of one step's logging", "{seconds_per_call_while_down} s per call"),
    "checkpoint_upload_crash": ("crash during a checkpoint upload, then re-run",
                                "{files_of_step6_at_crash} file(s) of step {crashed_during_step} on disk; "
                                "resumed from {resumed_from_step} (last registered {last_registered}), "
                                "finished at {finished_step}"),
    "registration_recovery": ("MLflow stopped right after the last checkpoint (export and registration "
                              "fail), started again, the same command re-run",
                              "first end: {first_end}; finished by the re-run: {finished_by_rerun} "
                              "({rerun_seconds} s); registered versions: {registered_versions}"),
    "s3_resume": ("resume from S3 run storage", "stopped at {stopped_at}, resumed from {resumed_from_step}, "
                  "finished at {finished_step}"),
    "planted_secrets": ("fake secrets in env + config", "{secrets_found} of {secrets_planted} found in "
                        "{files_scanned} files ({mb_scanned} MB: logs, MLflow store, artifacts, checkpoints)"),
    "config_properties": ("hostile config values (hypothesis: every key x wrong type, out of range, "
                          "empty, huge, malformed; in-process validation + pretrain/probe/sweep/visualize)",
                          "{inputs_tried} inputs tried ({cli_runs} through the CLI), {mishandled} "
                          "mishandled: {refused} refused in one line naming the key, {accepted} valid; no "
                          "traceback, Ray never started"),
    "secrets_failing_paths": ("planted credentials ({planted}) on the failing path of every command",
                              "{commands} command paths, {secrets_found} secrets found in their output"),
    "secrets_basic_auth": ("a real `mlflow server --app-name basic-auth`, its admin password (with '@ / %') "
                           "in the tracking URI: good paths of pretrain, probe, export, promote, visualize, "
                           "sweep and a refused login",
                           "{commands} command runs, {files_scanned} files scanned (run storage, MLflow "
                           "store and artifacts, Ray logs), {secrets_found} secrets found"),
    "malicious_pickle_export": ("pickle in place of the export weights (`xtra probe --model dir`)",
                                "refused: {refused}; payload ran: {code_ran}"),
    "malicious_pickle_registry": ("pickle in place of the registry's pyfunc wrapper (`load_encoder`)",
                                  "weights loaded from safetensors; payload ran: {code_ran}"),
    "tampered_checkpoint": ("pickle in place of a checkpoint's DeepSpeed model states in the run's "
                            "storage, then a resume",
                            "refused (SHA-256 recorded on the MLflow run): {refused}; payload ran: {code_ran}"),
    "node_loss": ("a rank's node removed after the first checkpoint, a new node added (2 ranks on 2 "
                  "nodes, s3:// storage, MLflow server)",
                  "resumed from {resumed_from_step}: {steps_redone} step(s) redone (interval "
                  "{checkpoint_every}); first step {seconds_to_first_step_after} s after the loss; "
                  "losses equal to the uninterrupted run {steps_matching_uninterrupted}"),
    "autoscale_from_zero": ("a run on a head with 0 CPUs + an autoscaler of 2-CPU nodes (0 to 2)",
                            "first step {seconds_to_first_step} s after submission; a request over "
                            "the autoscaler's maximum refused in {over_max_refused_s} s"),
}


def table(figures: list[dict]) -> str:
    rows = []
    for rec in figures:
        fault, fmt = ROWS.get(rec["test"], (rec["test"], json.dumps(rec)))
        try:
            result = fmt.format(**rec)
        except KeyError:
            result = json.dumps(rec)
        rows.append([fault, result])
    return markdown_table(["fault", "result"], rows)


def previous_figures() -> list[dict]:
    path = RESULTS / "reliability.json"
    return json.loads(path.read_text())["figures"] if path.exists() else []


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """Figures in table order: a test measured now replaces its earlier row."""
    by_test = {rec["test"]: rec for rec in old}
    by_test.update({rec["test"]: rec for rec in new})
    order = {name: i for i, name in enumerate(ROWS)}
    return sorted(by_test.values(), key=lambda rec: order.get(rec["test"], len(order)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="pytest -k expression (default: every fault test)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "figures.jsonl")
        path.touch()
        cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/reliability",
               "tests/cluster/test_multinode.py"]
        if args.k:
            cmd += ["-k", args.k]
        t0 = time.time()
        code = subprocess.call(cmd, cwd=REPO, env={**os.environ, FIGURES_ENV: str(path)})
        figures = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # with -k (a subset) the other tests' figures stay as the last run left them
    figures = merge(previous_figures() if args.k else [], figures)
    print()
    print(table(figures))
    out = {"machine": machine(), "pytest_exit_code": code, "pytest_k": args.k,
           "wall_s": round(time.time() - t0, 1), "figures": figures, "table": table(figures)}
    print(f"\nwrote {write_result('reliability', out)} (pytest exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
