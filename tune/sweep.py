"""`xtra sweep`: a grid over Table 6's axes (or any config key) x seeds, one Ray Tune trial each.

    xtra sweep --config tiny --data /data/cifar10 --axis block_size=1,2 --axis order=raster,random \
        --seeds 2 --set train.max_steps=500

1. Before Ray starts: every grid point becomes a config (`tune.space.check_grid`); a value that
   cannot work is refused with the valid values named.
2. One MLflow parent run per sweep (found again by name on a resume); each trial's pretraining
   run is nested under it, with its probe scores; the parent gets the result table, JSON and plot.
3. Ray Tune runs the trials (`tune.trial.sweep_trial`). Train V2 starts each trial's workers in
   their own placement group, outside the trial's, so the trial itself (the Train driver) asks for
   no CPU (only a little memory, Tune needs some resource) and concurrency is set from the cluster:
   `floor(CPUs / (train.num_workers x train.cpus_per_worker + decode CPUs))` trials at once, the
   decode share being what Ray Data needs to feed them (override with `--max-concurrent`).
4. Optional ASHA (`--asha`) stops trials whose pretraining loss lags at equal step; a trial that
   reaches the end of its pretraining is probed. Tune kills a stopped trial, and its Train
   workers' placement group would stay reserved where Ray Train cannot clean it up (no dashboard):
   `tune.orphans.reaping` frees it while the sweep runs.
5. A sweep is a Tune experiment `<train.storage_path>/<name>`: running the same command with the
   same `--name` again resumes it (`Tuner.restore`): finished trials are kept, not re-run;
   interrupted ones start again and their pretraining resumes from its own Ray Train checkpoint.
   A failed trial is reported and the others go on; `--retry-failed` runs failed trials again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.data.listing import list_split
from pipelines.errors import UserError
from pipelines.tracking import runs as tracking
from tune import results as tables
from tune.space import Axis, check_grid, parse_axes
from xtra_core.config import XTRAConfig

if TYPE_CHECKING:
    from tune.trial import SweepSpec

# axes that change the pretraining objective itself: their losses are not on one scale for ASHA
OBJECTIVE_KEYS = frozenset({"model.loss", "model.block_size", "model.blocks_ahead", "model.block_order",
                            "model.patch_size", "model.image_size"})

logger = logging.getLogger("xtra.sweep")

SPEC_FILE = "xtra_sweep.json"  # the sweep's axes/seeds, next to Tune's experiment state
PARENT_TAG = "xtra.sweep_parent"
DRIVER_MEMORY = 256 * 2**20  # logical memory the trial (Train driver) reserves, bytes


@dataclass
class SweepOptions:
    """How to run a sweep (the search space itself is `axes` x `seeds`)."""

    name: str | None = None
    seeds: int = 1
    kinds: Sequence[str] = ("linear",)
    max_concurrent: int | None = None  # default: from the cluster's CPUs
    decode_cpus: float = 1.0  # CPUs each trial leaves to Ray Data decoding
    asha: bool = False
    asha_grace_steps: int | None = None  # default: a quarter of train.max_steps
    retry_failed: bool = False
    verbose: bool = False
    out_dir: str | None = None  # table/JSON/PNG; default the sweep's experiment folder


def objective_axes(axes: Sequence[Axis]) -> list[str]:
    """The names of the axes that change what the pretraining loss measures (`OBJECTIVE_KEYS`)."""
    return [a.name for a in axes if a.key in OBJECTIVE_KEYS]


def concurrency(cfg: XTRAConfig, cluster_cpus: float, decode_cpus: float) -> int:
    """Trials that fit at once: each needs its workers' CPUs plus a decode share."""
    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker + decode_cpus
    return max(1, math.floor(cluster_cpus / per_trial + 1e-9))


def _storage(cfg: XTRAConfig):
    """(pyarrow filesystem, root path) of the sweep's storage; local paths resolved."""
    from pipelines.pretrain.plan import storage_path
    from pipelines.pretrain.stream import open_storage

    storage = storage_path(cfg.train.storage_path)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    cfg.train.storage_path = storage
    return open_storage(storage, cfg)


def prepare_paths(cfg: XTRAConfig) -> tuple[Any, str, str]:
    """Before Ray starts. Tune runs each trial in its own folder, so the data path, the storage
    path and a `sqlite:///` tracking store are made absolute in `cfg` (a relative one would name
    another place in every trial); the dataset is listed once and the tracking store reached, so
    that a path that cannot work fails the command with one line, not every trial.
    -> (storage filesystem, storage root, tracking URI)"""
    if "://" not in cfg.data.uri:
        cfg.data.uri = os.path.abspath(os.path.expanduser(cfg.data.uri))
    list_split(cfg.data, cfg.data.train_split)
    fs, root = _storage(cfg)
    uri = tracking.tracking_uri(cfg)
    tracking.check_tracking(uri)
    cfg.mlflow.tracking_uri = uri
    return fs, root, uri


def _read_spec(fs, path: str) -> dict[str, Any] | None:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _write_spec(fs, path: str, spec: dict[str, Any]) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(spec, indent=2, default=str).encode())


def parent_run(uri: str, cfg: XTRAConfig, name: str, spec: dict[str, Any]) -> str:
    """The sweep's MLflow parent run: found by name (a resume), else created with its params."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = tracking.experiment_id(uri, cfg.mlflow.experiment)
    found = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp, run_name=name, tags={PARENT_TAG: name, "xtra.preset": cfg.preset})
    client.log_param(run.info.run_id, "sweep.axes", json.dumps(spec["axes"]))
    client.log_param(run.info.run_id, "sweep.seeds", spec["seeds"])
    client.log_param(run.info.run_id, "sweep.kinds", ",".join(spec["kinds"]))
    client.log_param(run.info.run_id, "sweep.trials", spec["trials"])
    return run.info.run_id


@contextlib.contextmanager
def tune_output(verbose: bool) -> Iterator[None]:
    """Tune's own console output (status tables, trial tracebacks) only with --verbose. (Tune's
    newer reporter prints its header box even at verbose=0; its classic reporter is silent.)"""
    saved = os.environ.get("RAY_AIR_NEW_OUTPUT")
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        # a failed trial's traceback is in its error.txt; the console gets one "failed:" line
        tune_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        tune_log.setLevel(level)
        if saved is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved


def run_sweep(
    cfg: XTRAConfig,
    axis_specs: list[str],
    options: SweepOptions | None = None,
) -> dict[str, Any]:
    """The whole job. Returns {name, experiment_path, parent_run_id, rows, summary, markdown,
    files, interrupted}."""
    import ray
    from ray import tune

    from tune.orphans import reaping
    from tune.progress import TrialEvents
    from tune.trial import SweepSpec, sweep_trial

    opts = options or SweepOptions()
    axes: list[Axis] = parse_axes(axis_specs)
    points = check_grid(cfg, axes)  # every value refused here, before Ray starts
    if opts.seeds < 1:
        raise UserError(f"--seeds {opts.seeds}: give at least one seed")
    for kind in opts.kinds:
        if kind not in ("linear", "attentive"):
            raise UserError(f"--probe {kind!r} is not one of ['linear', 'attentive']")
    if not cfg.data.uri:
        raise UserError("no dataset: give --data <uri> (or data.uri in the config)")
    if cfg.train.stop_at_step:
        raise UserError("train.stop_at_step ends every trial early; a sweep needs whole runs")
    name = opts.name or f"sweep-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    fs, root, uri = prepare_paths(cfg)

    seeds = list(range(opts.seeds))
    n_trials = len(points) * len(seeds)
    spec = {"axes": {a.name: list(a.values) for a in axes}, "seeds": opts.seeds,
            "kinds": list(opts.kinds), "trials": n_trials}
    exp_path = f"{root}/{name}"
    saved = _read_spec(fs, f"{exp_path}/{SPEC_FILE}")
    if saved is not None and {k: saved.get(k) for k in spec} != spec:
        raise UserError(f"sweep {name!r} already exists in {cfg.train.storage_path} with axes "
                        f"{saved.get('axes')}, seeds {saved.get('seeds')}, probe {saved.get('kinds')}; "
                        "resume it with the same --axis/--seeds/--probe, or pick another --name")

    if not ray.is_initialized():
        # trial output (each trial's own step lines, Ray's chatter) stays in Ray's log files
        ray.init(logging_level="WARNING", log_to_driver=opts.verbose)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # one trial is judged as a run is (what the cluster can grow to; may wait for the autoscaler)
    from pipelines.pretrain.resources import check_resources, cpus_to_grow_to

    cfg.train.cpus_per_worker = check_resources(cfg, storage_path=cfg.train.storage_path,
                                                decode_cpus=opts.decode_cpus)
    cpus = cpus_to_grow_to()
    parallel = opts.max_concurrent or concurrency(cfg, cpus, opts.decode_cpus)

    parent_id = parent_run(uri, cfg, name, spec)
    _write_spec(fs, f"{exp_path}/{SPEC_FILE}", spec)
    trial_spec = SweepSpec(name=name, base=cfg.to_dict(), axis_names={a.key: a.name for a in axes},
                           kinds=list(opts.kinds), parent_run_id=parent_id, tracking_uri=uri)
    # the trial is the Train driver: no CPU of its own (its workers get their own placement group)
    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, spec=trial_spec),
        tune.PlacementGroupFactory([{"memory": DRIVER_MEMORY}]),
    )
    storage_fs = None if fs.type_name == "local" else fs
    resumed = tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs)
    print(f"[xtra] sweep {name}: {n_trials} trials ({len(points)} grid points x {len(seeds)} seed{'s' if len(seeds) > 1 else ''}), "
          f"{parallel} at a time, probe {'+'.join(opts.kinds)}"
          + (" - resuming: finished trials are kept" if resumed else "")
          + f"; MLflow parent run {parent_id}", flush=True)
    if resumed:
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=opts.retry_failed,
                                   storage_filesystem=storage_fs)
    else:
        param_space: dict[str, Any] = {a.key: tune.grid_search(list(a.values)) for a in axes}
        param_space["seed"] = tune.grid_search(seeds)
        scheduler = None
        incomparable = objective_axes(axes)
        if opts.asha and incomparable:
            print(f"[xtra] warning: --asha stops trials by pretraining loss, but {', '.join(incomparable)} "
                  "change(s) what the loss measures: trials along it are not compared on one scale",
                  flush=True)
        if opts.asha:
            from ray.tune.schedulers import ASHAScheduler

            max_t = cfg.train.max_steps or 10**9
            grace = opts.asha_grace_steps or max(1, (cfg.train.max_steps or 100) // 4)
            # stop_last_trials=False: a trial that reaches max_t has finished pretraining and
            # goes on to its probe (the default stops it there, unprobed)
            scheduler = ASHAScheduler(time_attr="step", metric="loss", mode="min", max_t=max_t,
                                      grace_period=grace, reduction_factor=2, stop_last_trials=False)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=parallel, scheduler=scheduler,
                                        reuse_actors=False),
            run_config=tune.RunConfig(
                name=name,
                storage_path=root,
                storage_filesystem=storage_fs,
                callbacks=[TrialEvents(axes, n_trials)],
                verbose=2 if opts.verbose else 0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    t0 = time.time()
    with tune_output(opts.verbose), reaping():  # frees what stopped trials' Train runs leave
        grid = tuner.fit()
        unfinished = unfinished_trials(exp_path, storage_fs)
    interrupted = bool(unfinished)
    rows = tables.trial_rows(grid, [a.key for a in axes], unfinished)
    summary = tables.summarize(rows, points)
    axis_names = {a.key: a.name for a in axes}
    markdown = tables.to_markdown(summary, axis_names, kind=opts.kinds[0])
    close_stopped_runs(trial_spec, cfg.mlflow.experiment, rows)
    files = write_results(opts, cfg, name, exp_path, fs, rows, summary, axis_names, markdown, spec)
    log_to_parent(uri, parent_id, files, summary, finished=not interrupted)
    print(f"[xtra] sweep {name}: {sum(r['status'] == 'done' for r in rows)} done, "
          f"{sum(r['status'] == 'failed' for r in rows)} failed, "
          f"{sum(r['status'] == 'stopped' for r in rows)} stopped early, "
          f"{sum(r['status'] == 'unfinished' for r in rows)} unfinished "
          f"({time.time() - t0:.0f} s)", flush=True)
    print(markdown, flush=True)
    if interrupted:
        print(f"[xtra] sweep {name} was interrupted; run the same command with --name {name} "
              "to resume it", flush=True)
    return {"name": name, "experiment_path": exp_path, "parent_run_id": parent_id, "rows": rows,
            "summary": summary, "markdown": markdown, "files": files, "interrupted": interrupted}


def close_stopped_runs(spec: SweepSpec, experiment: str, rows: list[dict[str, Any]]) -> None:
    """The nested MLflow runs of trials the scheduler stopped (their pretraining was cut off, so
    nothing closed them): KILLED, tagged with the sweep and axis values like the probed ones."""
    import mlflow

    from tune.trial import find_trial_run, run_name_of, tag_trial_run

    stopped = [r for r in rows if r["status"] == "stopped"]
    if not stopped or not spec.tracking_uri:
        return
    client = mlflow.MlflowClient(spec.tracking_uri)
    for r in stopped:
        config = {**r["point"], "seed": r["seed"]}
        run = find_trial_run(client, experiment, run_name_of(spec, config))
        if run is None:
            continue
        r["run_id"] = run.info.run_id
        if run.info.status == "RUNNING":
            tracking.finish_run(spec.tracking_uri, run.info.run_id, "KILLED")
        tag_trial_run(spec, client, run.info.run_id, config)
        client.set_tag(run.info.run_id, "xtra.sweep.stopped_at_step", str(r.get("step")))


def unfinished_trials(exp_path: str, storage_fs) -> set[str]:
    """Trial folder names that the saved experiment state holds as not finished (a Ctrl-C: Tune
    saves the state, then stops the running trials, so its in-memory result calls them done)."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    saved = ExperimentAnalysis(exp_path, storage_filesystem=storage_fs).trials
    return {Path(t.path).name for t in saved if t.status not in (Trial.TERMINATED, Trial.ERROR)}


def write_results(
    opts: SweepOptions, cfg: XTRAConfig, name: str, exp_path: str, fs, rows: list[dict[str, Any]],
    summary: list[dict[str, Any]], axis_names: dict[str, str], markdown: str, spec: dict[str, Any],
) -> dict[str, str]:
    """sweep_table.md, sweep_results.json and sweep_plot.png in `--out` (default: the experiment
    folder when local, else a temporary folder: MLflow keeps the durable copy)."""
    if opts.out_dir:
        out = Path(opts.out_dir)
    elif fs.type_name == "local":
        out = Path(exp_path)
    else:
        out = Path(tempfile.mkdtemp(prefix=f"xtra-{name}-"))
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": str(out / "sweep_table.md"), "json": str(out / "sweep_results.json"),
             "png": str(out / "sweep_plot.png")}
    Path(files["markdown"]).write_text(markdown)
    tables.write_json(Path(files["json"]), {"sweep": name, **spec, "metric": f"{opts.kinds[0]} probe val top-1",
                                            "summary": summary, "trials": rows})
    title = f"{name}: {opts.kinds[0]} probe top-1, {cfg.train.max_steps or cfg.train.epochs} " \
            f"{'steps' if cfg.train.max_steps else 'epochs'} per trial"
    tables.plot(Path(files["png"]), summary, axis_names, title)
    return files


def log_to_parent(uri: str, run_id: str, files: dict[str, str], summary: list[dict[str, Any]],
                  finished: bool) -> None:
    """The table, JSON and plot as artifacts of the parent run; its status."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    for path in files.values():
        client.log_artifact(run_id, path)
    best = [s for s in summary if s["val_top1_mean"] is not None]
    if best:
        top = max(best, key=lambda s: s["val_top1_mean"])
        client.log_metric(run_id, "best_val_top1_mean", top["val_top1_mean"])
        client.set_tag(run_id, "xtra.sweep.best_point", json.dumps(top["point"], default=str))
    client.set_terminated(run_id, "FINISHED" if finished else "KILLED")
