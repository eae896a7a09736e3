"""`xtra sweep`: a grid over Table 6's axes (or any config key) x seeds, one Ray Tune trial each.

    xtra sweep --config tiny --data /data/cifar10 --axis block_size=1,2 --axis order=raster,random \
        --seeds 2 --set train.max_steps=500

1. Before Ray starts: every grid point becomes a config (`tune.space.check_grid`); a value that
   cannot work is refused with the valid values named.
2. One MLflow parent run per sweep (`pipelines.tracking.sweeps`; found again by name on a
   resume); each trial's pretraining run is nested under it, with its probe scores; the parent
   gets the result table, JSON and plot.
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
from pipelines.tracking import store, sweeps
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
    from pipelines.pretrain.plan import open_storage, storage_path

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
    uri = store.connect(cfg)
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
    """The whole job, in named stages: check the grid and options -> paths -> the sweep's plan
    (new or resumed) -> Ray -> trials at once -> MLflow parent run -> Tuner (built or restored,
    ASHA optional) -> fit -> report. Returns {name, experiment_path, parent_run_id, rows, summary,
    markdown, files, interrupted}."""
    from tune.orphans import reaping
    from tune.trial import SweepSpec

    opts = options or SweepOptions()
    axes, points = check_sweep(cfg, axis_specs, opts)  # every value refused here, before Ray starts
    name = opts.name or f"sweep-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    fs, root, uri = prepare_paths(cfg)
    plan = plan_sweep(cfg, name, axes, points, opts, fs, root)
    start_ray(opts.verbose)
    parallel = trials_at_once(cfg, opts)
    parent_id = sweeps.parent_run(uri, cfg.mlflow.experiment, name, cfg.preset, {
        "sweep.axes": json.dumps(plan.spec["axes"]), "sweep.seeds": plan.spec["seeds"],
        "sweep.kinds": ",".join(plan.spec["kinds"]), "sweep.trials": plan.spec["trials"]})
    _write_spec(fs, f"{plan.exp_path}/{SPEC_FILE}", plan.spec)
    trial_spec = SweepSpec(name=name, base=cfg.to_dict(), axis_names={a.key: a.name for a in axes},
                           kinds=list(opts.kinds), parent_run_id=parent_id, tracking_uri=uri)
    storage_fs = None if fs.type_name == "local" else fs
    tuner, resumed = build_tuner(cfg, plan, opts, trial_spec, root, storage_fs, parallel)
    print(f"[xtra] sweep {name}: {plan.n_trials} trials ({len(points)} grid points x {len(plan.seeds)} seed{'s' if len(plan.seeds) > 1 else ''}), "
          f"{parallel} at a time, probe {'+'.join(opts.kinds)}"
          + (" - resuming: finished trials are kept" if resumed else "")
          + f"; MLflow parent run {parent_id}", flush=True)
    t0 = time.time()
    with tune_output(opts.verbose), reaping():  # frees what stopped trials' Train runs leave
        grid = tuner.fit()
        unfinished = unfinished_trials(plan.exp_path, storage_fs)
    return report(cfg, plan, opts, fs, trial_spec, grid, unfinished, time.time() - t0)


@dataclass
class SweepPlan:
    """The sweep's grid and where Tune keeps it."""

    name: str
    axes: list[Axis]
    points: list[dict[str, Any]]
    seeds: list[int]
    spec: dict[str, Any]  # axes, seeds, kinds, trials: saved next to Tune's state (SPEC_FILE)
    exp_path: str

    @property
    def n_trials(self) -> int:
        return len(self.points) * len(self.seeds)


def check_sweep(cfg: XTRAConfig, axis_specs: list[str], opts: SweepOptions) -> tuple[list[Axis], list[dict[str, Any]]]:
    """The axes and grid points; a value, option or setting that cannot work is one UserError."""
    if opts.name is not None:
        check_name(opts.name)
    axes: list[Axis] = parse_axes(axis_specs)
    points = check_grid(cfg, axes)
    if opts.seeds < 1:
        raise UserError(f"--seeds {opts.seeds}: give at least one seed")
    for kind in opts.kinds:
        if kind not in ("linear", "attentive"):
            raise UserError(f"--probe {kind!r} is not one of ['linear', 'attentive']")
    if not cfg.data.uri:
        raise UserError("no dataset: give --data <uri> (or data.uri in the config)")
    if cfg.train.stop_at_step:
        raise UserError("train.stop_at_step ends every trial early; a sweep needs whole runs")
    return axes, points


def check_name(name: str) -> None:
    """`--name` becomes a folder under train.storage_path and an MLflow search filter value: the
    rule of `train.run_name` (letters, digits, '.', '_', '-'; no '..', '/', quotes)."""
    from xtra_core.config import RANGES

    rule = RANGES["train.run_name"]
    if not rule.holds(name) or ".." in name:
        raise UserError(f"--name {name!r} must match {rule.pattern} (letters, digits, '.', '_', '-'; "
                        "no '..', '/' or quotes), as train.run_name")


def plan_sweep(cfg: XTRAConfig, name: str, axes: list[Axis], points: list[dict[str, Any]],
               opts: SweepOptions, fs, root: str) -> SweepPlan:
    """The sweep's plan; a sweep of that name saved with other axes/seeds/probes is refused."""
    seeds = list(range(opts.seeds))
    spec = {"axes": {a.name: list(a.values) for a in axes}, "seeds": opts.seeds,
            "kinds": list(opts.kinds), "trials": len(points) * len(seeds)}
    exp_path = f"{root}/{name}"
    saved = _read_spec(fs, f"{exp_path}/{SPEC_FILE}")
    if saved is not None and {k: saved.get(k) for k in spec} != spec:
        raise UserError(f"sweep {name!r} already exists in {cfg.train.storage_path} with axes "
                        f"{saved.get('axes')}, seeds {saved.get('seeds')}, probe {saved.get('kinds')}; "
                        "resume it with the same --axis/--seeds/--probe, or pick another --name")
    return SweepPlan(name, axes, points, seeds, spec, exp_path)


def start_ray(verbose: bool) -> None:
    """Ray, unless already up; trial output (each trial's step lines, Ray's chatter) stays in
    Ray's log files without --verbose."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level="WARNING", log_to_driver=verbose)
    ray.data.DataContext.get_current().enable_progress_bars = False


def trials_at_once(cfg: XTRAConfig, opts: SweepOptions) -> int:
    """`--max-concurrent`, else as many trials as the cluster can grow to hold (`concurrency`).
    One trial is judged as a run is (what the cluster can grow to; it may wait for the
    autoscaler); `train.cpus_per_worker` unset is sized as pretraining does."""
    from pipelines.pretrain.resources import check_resources, cpus_to_grow_to

    cfg.train.cpus_per_worker = check_resources(cfg, storage_path=cfg.train.storage_path,
                                                decode_cpus=opts.decode_cpus)
    return opts.max_concurrent or concurrency(cfg, cpus_to_grow_to(), opts.decode_cpus)


def build_tuner(cfg: XTRAConfig, plan: SweepPlan, opts: SweepOptions, trial_spec: SweepSpec,
                root: str, storage_fs, parallel: int):  # -> (ray.tune.Tuner, resumed)
    """The Tuner of the sweep: restored when its experiment exists (a resume), else built over
    the grid x seeds, with ASHA on `--asha`."""
    from ray import tune as ray_tune

    from tune.progress import TrialEvents


    # the trial is the Train driver: no CPU of its own (its workers get their own placement group)
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(redacted_trial, spec=trial_spec),
        ray_tune.PlacementGroupFactory([{"memory": DRIVER_MEMORY}]),
    )
    if ray_tune.Tuner.can_restore(plan.exp_path, storage_filesystem=storage_fs):
        return ray_tune.Tuner.restore(plan.exp_path, trainable=trainable, resume_unfinished=True,
                                      resume_errored=False, restart_errored=opts.retry_failed,
                                      storage_filesystem=storage_fs), True
    param_space: dict[str, Any] = {a.key: ray_tune.grid_search(list(a.values)) for a in plan.axes}
    param_space["seed"] = ray_tune.grid_search(plan.seeds)
    tuner = ray_tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray_tune.TuneConfig(max_concurrent_trials=parallel, scheduler=asha(cfg, plan, opts),
                                        reuse_actors=False),
        run_config=ray_tune.RunConfig(
            name=plan.name,
            storage_path=root,
            storage_filesystem=storage_fs,
            callbacks=[TrialEvents(plan.axes, plan.n_trials)],
            verbose=2 if opts.verbose else 0,
            failure_config=ray_tune.FailureConfig(max_failures=0),
        ),
    )
    return tuner, False


def redacted_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """`tune.trial.sweep_trial`, its failure re-raised with the message redacted: Tune writes it
    to the trial's error file and prints its "failed:" line from it."""
    from pipelines.redaction import redacted_error
    from tune.trial import sweep_trial

    try:
        sweep_trial(config, spec)
    except Exception as e:
        clean = redacted_error(e)
        if clean is e:
            raise
        raise clean from None


def asha(cfg: XTRAConfig, plan: SweepPlan, opts: SweepOptions):  # -> ASHAScheduler | None
    """With `--asha`: the scheduler that stops trials whose pretraining loss lags at equal step
    (a warning names the axes whose losses are not on one scale)."""
    incomparable = objective_axes(plan.axes)
    if opts.asha and incomparable:
        print(f"[xtra] warning: --asha stops trials by pretraining loss, but {', '.join(incomparable)} "
              "change(s) what the loss measures: trials along it are not compared on one scale",
              flush=True)
    if not opts.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = cfg.train.max_steps or 10**9
    grace = opts.asha_grace_steps or max(1, (cfg.train.max_steps or 100) // 4)
    # stop_last_trials=False: a trial that reaches max_t has finished pretraining and
    # goes on to its probe (the default stops it there, unprobed)
    return ASHAScheduler(time_attr="step", metric="loss", mode="min", max_t=max_t,
                         grace_period=grace, reduction_factor=2, stop_last_trials=False)


def report(cfg: XTRAConfig, plan: SweepPlan, opts: SweepOptions, fs, trial_spec: SweepSpec, grid,
           unfinished: set[str], seconds: float) -> dict[str, Any]:
    """After the fit: the table, the stopped trials' runs closed, the files written and logged
    to the parent run, the console summary."""
    name, axes = plan.name, plan.axes
    interrupted = bool(unfinished)
    rows = tables.trial_rows(grid, [a.key for a in axes], unfinished)
    summary = tables.summarize(rows, plan.points)
    axis_names = {a.key: a.name for a in axes}
    markdown = tables.to_markdown(summary, axis_names, kind=opts.kinds[0])
    close_stopped_runs(trial_spec, cfg.mlflow.experiment, rows)
    files = write_results(opts, cfg, name, plan.exp_path, fs, rows, summary, axis_names, markdown, plan.spec)
    log_to_parent(trial_spec.tracking_uri, trial_spec.parent_run_id, files, summary, finished=not interrupted)
    print(f"[xtra] sweep {name}: {sum(r['status'] == 'done' for r in rows)} done, "
          f"{sum(r['status'] == 'failed' for r in rows)} failed, "
          f"{sum(r['status'] == 'stopped' for r in rows)} stopped early, "
          f"{sum(r['status'] == 'unfinished' for r in rows)} unfinished "
          f"({seconds:.0f} s)", flush=True)
    print(markdown, flush=True)
    if interrupted:
        print(f"[xtra] sweep {name} was interrupted; run the same command with --name {name} "
              "to resume it", flush=True)
    return {"name": name, "experiment_path": plan.exp_path, "parent_run_id": trial_spec.parent_run_id,
            "rows": rows, "summary": summary, "markdown": markdown, "files": files,
            "interrupted": interrupted}


def close_stopped_runs(spec: SweepSpec, experiment: str, rows: list[dict[str, Any]]) -> None:
    """The nested MLflow runs of trials the scheduler stopped (their pretraining was cut off, so
    nothing closed them): KILLED, tagged with the sweep and axis values like the probed ones."""
    from tune.trial import axis_values, run_name_of

    stopped = [r for r in rows if r["status"] == "stopped"]
    if not stopped or not spec.tracking_uri:
        return
    for r in stopped:
        config = {**r["point"], "seed": r["seed"]}
        run_id = sweeps.close_stopped_trial(spec.tracking_uri, experiment, run_name_of(spec, config),
                                            spec.name, axis_values(spec, config), r.get("step"))
        if run_id is not None:
            r["run_id"] = run_id


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
    """The table, JSON and plot as artifacts of the parent run, the best point; its status."""
    best = [s for s in summary if s["val_top1_mean"] is not None]
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    if best:
        top = max(best, key=lambda s: s["val_top1_mean"])
        metrics["best_val_top1_mean"] = top["val_top1_mean"]
        tags["xtra.sweep.best_point"] = json.dumps(top["point"], default=str)
    sweeps.close_parent(uri, run_id, files.values(), metrics, tags, finished)
