"""Pretraining: Ray Train workers run XTRA under DeepSpeed ZeRO, fed by Ray Data, tracked in MLflow.

    xtra pretrain --config tiny --data /path/or/s3://bucket/prefix --set train.max_steps=200
    ray job submit --working-dir . -- python -m pipelines.cli pretrain --config configs/vit_b16_in1k.yaml ...

One optimiser step consumes `train.global_batch_size` images: each of the N workers takes micro
batches of `train.micro_batch` and DeepSpeed accumulates `train.grad_accum_steps` of them.

Checkpoints: every `train.checkpoint_every` steps (and at the end) every rank writes its DeepSpeed
state (model, optimiser shards, LR schedule, step) and reports it with `ray.train.report`; Ray
merges the ranks' files into one checkpoint directory in `<storage_path>/<run_name>/`. Running again
with the same `train.run_name` and `train.storage_path` resumes from the newest one: the data
stream restarts at the checkpoint's image row, so the run continues as if never interrupted.
`train.max_failures` lets Ray restart a failed worker group automatically from the latest checkpoint.

Before the fit the driver takes the run's lease (`lease.py`: one run per `train.run_name` at a
time) and checks what cannot work: the tracking server, the dataset listing, a resumed run's
config against its checkpoint's (`checkpoints.check_resume_config`: what the run computes and its
resolved schedule; accepted changes are recorded on the MLflow run), the resources
(`resources.check_resources`: judged against what the cluster can grow to). A run whose
checkpoints reached the last step but whose end (export, registration) failed is finished by
the same command again (`finish_trained_run`).
At the end it consolidates the full-precision encoder from the final checkpoint (ZeRO shards
included), exports it (safetensors + config, re-read and compared) and registers it in the MLflow
Model Registry.

The pieces: `trainer.py` (the loop the workers run: build_engine / resume / train_step /
save_checkpoint / fit), `worker.py` (that loop wired to Ray Train), `checkpoints.py`, `plan.py`,
`resources.py`, `progress.py` (status lines and MLflow metrics), `stream.py` (the input stream).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback
from ray.train.v2.api.config import LoggingConfig
from safetensors.torch import load_file

from pipelines import console
from pipelines.config_validation import validate_values
from pipelines.data.stream import bad_file_counter, stream_stop_error
from pipelines.errors import UserError
from pipelines.pretrain import digests
from pipelines.pretrain.checkpoints import (  # noqa: F401 - re-exported for callers and tests
    DS_TAG,
    STATE_FILE,
    check_resume_config,
    consolidate_encoder,
    consolidate_model,
    latest_checkpoint,
    latest_checkpoint_ref,
    latest_checkpoint_step,
    schedule_keys,
)
from pipelines.pretrain.lease import RunLease
from pipelines.pretrain.plan import RunPlan, default_run_name, open_storage, plan_run, storage_path  # noqa: F401
from pipelines.pretrain.precision import resolve_on_workers
from pipelines.pretrain.progress import ProgressAndTracking, StatusRelay
from pipelines.pretrain.rank_streams import TrainStream, build_train_stream
from pipelines.pretrain.resources import check_resources
from pipelines.pretrain.trainer import deepspeed_config  # noqa: F401 - re-exported
from pipelines.pretrain.worker import train_loop_per_worker
from pipelines.redaction import redact
from pipelines.tracking import registry, store
from pipelines.tracking import runs as tracking
from pipelines.visualize.during_training import finish_pictures, training_pictures
from xtra_core.config import XTRAConfig
from xtra_core.export import WEIGHTS, save_encoder, save_model
from xtra_core.model import build_model, count_parameters

log = logging.getLogger("xtra.pretrain")


def run_pretraining(
    cfg: XTRAConfig,
    *,
    callbacks: Sequence[UserCallback] = (),
    parent_run_id: str | None = None,
    register: bool = True,
) -> dict[str, Any]:
    """Driver: plan, start MLflow, fit the TorchTrainer, export + register the encoder.

    `callbacks`: more Ray Train callbacks on the controller (a Tune trial reports through one);
    `parent_run_id`: the MLflow run is created nested under it (a sweep's parent run);
    `register=False`: the encoder is exported and logged to the run, not registered."""
    if not cfg.data.uri:
        raise UserError("no dataset: give --data <uri> (or data.uri in the config)")
    validate_values(cfg)  # types and ranges (pydantic), before any compute
    run_name = cfg.train.run_name or default_run_name(f"xtra-{cfg.preset}")
    cfg.train.run_name = run_name
    storage = cfg.train.storage_path = storage_path(cfg.train.storage_path)

    uri = store.tracking_uri(cfg)
    store.check_tracking(uri)  # before any compute

    stream: TrainStream = build_train_stream(cfg)  # lists the files: a bad URI fails here, first
    lease_fs, lease_root = open_storage(storage, cfg)
    with RunLease(lease_fs, f"{lease_root}/{run_name}", run_name):  # one run per name at a time
        return _pretrain(cfg, stream, uri, callbacks, parent_run_id, register)


def _pretrain(cfg: XTRAConfig, stream: TrainStream, uri: str, callbacks: Sequence[UserCallback],
              parent_run_id: str | None, register: bool) -> dict[str, Any]:
    """`run_pretraining` once the run's lease is held."""
    run_name, storage = str(cfg.train.run_name), str(cfg.train.storage_path)
    if not ray.is_initialized():
        ray.init(**console.ray_init_kwargs())
    console.quiet_ray_data()  # the driver prints one status line per report
    # the precision and the checkpoint's config are checked before anything is started or logged
    precision = resolve_on_workers(cfg, {"CPU": cfg.train.cpus_per_worker or 1})  # "auto" on a worker's hardware
    cfg.train.bf16 = precision.bf16  # the workers, the checkpoint and MLflow see the resolved value
    start_step, state = latest_checkpoint(storage, run_name, cfg)
    plan = plan_run(cfg, stream.num_images, start_step)
    changed = check_resume_config(cfg, state, schedule_keys(cfg, plan.total_steps, plan.steps_per_epoch))
    if changed:
        log.warning("resuming %s at step %d with a changed config (recorded on the run): %s",
                    run_name, start_step, ", ".join(changed))
    if plan.trained:  # the steps are done: finish the end (export, registration) if it is missing
        return finish_trained_run(cfg, uri, plan, state, register, parent_run_id)
    cfg.train.cpus_per_worker = check_resources(cfg, storage_path=storage)  # may wait for the autoscaler
    resources = {"CPU": cfg.train.cpus_per_worker}
    rows = (plan.stop_step - plan.start_step) * cfg.train.global_batch_size
    bad_files = bad_file_counter(plan.bad_files_actor)  # held by the driver for the whole fit
    dataset = stream.dataset(plan.start_step * cfg.train.global_batch_size, rows, bad_files)

    run_id = tracking.start_or_resume_run(uri, cfg, run_name, parent_run_id)
    if changed and run_id:
        tracking.record_resume_changes(uri, run_id, start_step, changed, cfg)
    trust = None  # where the workers record and check checkpoint digests
    if run_id:
        resumed = latest_checkpoint_ref(storage, run_name, cfg) if plan.start_step else None
        checked = (verify_checkpoint(uri, run_id, resumed)
                   if resumed is not None and cfg.train.verify_checkpoints else {})
        trust = {"uri": uri, "run_id": run_id, "checked": checked, "verify": cfg.train.verify_checkpoints}
    model = build_model(cfg.model)
    print(
        f"[xtra] run {run_name}: {count_parameters(model) / 1e6:.2f}M parameters, "
        f"{stream.num_images} images, steps {plan.start_step}->{plan.stop_step} of {plan.total_steps} "
        f"({plan.steps_per_epoch}/epoch), {cfg.train.num_workers} workers x micro batch "
        f"{cfg.train.micro_batch} x accum {cfg.train.grad_accum_steps}, ZeRO-{cfg.train.zero_stage}, "
        f"{cfg.train.cpus_per_worker:g} CPU per worker, {precision.describe()}",
        flush=True,
    )
    del model

    storage_fs, storage_root = open_storage(storage, cfg)  # s3:// -> (S3 filesystem, bucket/prefix)
    if storage_fs.type_name == "local":
        storage_fs = None
    relay = StatusRelay()
    pictures = training_pictures(cfg, run_id, uri, plan.start_step, plan.stop_step, stream.listing,
                                 consolidate_model)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "plan": plan.__dict__, "trust": trust},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_root,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[ProgressAndTracking(run_id, uri, plan, relay), *pictures, *callbacks],
            logging_config=LoggingConfig(log_level="INFO" if console.verbose() else "WARNING"),
        ),
        datasets={"train": dataset},
        dataset_config=stream.rank_split(plan.start_step, plan.stop_step - plan.start_step, bad_files),
    )
    try:
        with relay.printing():
            result = trainer.fit()
        if result.error:
            raise result.error
        stopped = stream_stop_error(bad_files)  # a restarted group that ended on a data stop
        if stopped is not None:
            raise stopped
    except BaseException as e:
        finish_pictures(pictures, succeeded=False)
        if run_id:
            tracking.finish_run(uri, run_id, "FAILED")
        stop = None if isinstance(e, KeyboardInterrupt) else stream_stop_error(bad_files)
        if stop is not None:  # the data stopped it: its one line, not Ray's wrapped traceback
            raise stop from None
        raise
    out: dict[str, Any] = {"run_name": run_name, "run_id": run_id, "step": plan.stop_step,
                           "metrics": result.metrics, "checkpoint": result.checkpoint.path}
    if pictures:
        out["pictures"] = finish_pictures(pictures)
    if plan.stop_step == plan.total_steps:
        out.update(finish_end(cfg, result.checkpoint, uri, run_id, register))
    elif run_id:
        tracking.finish_run(uri, run_id, "KILLED")  # stopped early on purpose; resumable
    return out


def finish_trained_run(cfg: XTRAConfig, uri: str, plan: RunPlan, state: dict[str, Any] | None,
                       register: bool, parent_run_id: str | None) -> dict[str, Any]:
    """A run whose checkpoints reached the last step: if its end (export, registration, alias,
    final status) did not finish (MLflow down at the end, the driver gone while consolidating),
    finish it from the last checkpoint; else there is nothing to do."""
    run_name = str(cfg.train.run_name)
    found = tracking.find_pretraining_run(uri, cfg.mlflow.experiment, run_name)
    tags = dict(found.data.tags) if found is not None else {}
    legacy_done = (found is not None and found.info.status == "FINISHED"
                   and tracking.END_TAG not in tags and tracking.REGISTERED_VERSION_TAG not in tags)
    if tags.get(tracking.END_TAG) == "done" or legacy_done:
        raise UserError(f"run {run_name!r} already reached its last step {plan.start_step} and its "
                        "encoder was exported; nothing to train (give another train.run_name for a new run)")
    checkpoint = latest_checkpoint_ref(str(cfg.train.storage_path), run_name, cfg)
    if checkpoint is None:
        raise UserError(f"run {run_name!r}: no checkpoint to finish the run from")
    print(f"[xtra] run {run_name} reached its last step {plan.start_step} before, but its end did not "
          f"finish: exporting and registering the encoder from {checkpoint.path}", flush=True)
    run_id = tracking.start_or_resume_run(uri, cfg, run_name, parent_run_id)
    out: dict[str, Any] = {"run_name": run_name, "run_id": run_id, "step": plan.start_step,
                           "metrics": {k: v for k, v in (state or {}).items() if k != "config"},
                           "checkpoint": checkpoint.path, "finished_end": True}
    out.update(finish_end(cfg, checkpoint, uri, run_id, register))
    return out


def finish_end(cfg: XTRAConfig, checkpoint: Checkpoint, uri: str, run_id: str | None,
               register: bool) -> dict[str, Any]:
    """The end of a trained run: export and register (`export_and_register`), then the tag that
    says the end is done and the final status. A failure ends in one line that says how to finish
    it: the same command again (it comes back here through `finish_trained_run`)."""
    try:
        if cfg.train.verify_checkpoints and run_id:  # before anything is unpickled from it
            verify_checkpoint(uri, run_id, checkpoint)
        done = tracking.run_tags(uri, run_id).get(tracking.REGISTERED_VERSION_TAG) if run_id else None
        out = export_and_register(cfg, checkpoint, uri, run_id, register, registered_version=done)
        if run_id:
            tracking.set_run_tag(uri, run_id, tracking.END_TAG, "done")
            if register:  # a sweep's trial sets its run's status itself, after probing
                tracking.finish_run(uri, run_id, "FINISHED")
    except UserError:  # a checkpoint refused: its own line (running again would not help)
        if run_id:
            tracking.finish_run(uri, run_id, "FAILED", attempts=1)
        raise
    except Exception as e:
        if run_id:
            tracking.finish_run(uri, run_id, "FAILED", attempts=1)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(
            f"run {cfg.train.run_name!r} reached its last step, but exporting or registering its "
            f"encoder failed ({type(e).__name__}: {redact(first)}); run the same command again (same "
            "train.run_name) to finish it from the last checkpoint"
        ) from e
    return out


def verify_checkpoint(uri: str, run_id: str, checkpoint: Checkpoint) -> dict[str, str]:
    """Refuse a checkpoint in the run's storage whose files are not the ones this run saved (the
    SHA-256 recorded on the MLflow run, `pipelines.pretrain.digests`); {name: digest} checked."""
    name = Path(checkpoint.path).name
    return {name: digests.check_against_run(checkpoint.filesystem, checkpoint.path, name, uri, run_id)}


def export_and_register(
    cfg: XTRAConfig, checkpoint: Checkpoint, uri: str, run_id: str | None, register: bool = True,
    registered_version: str | None = None,
) -> dict[str, Any]:
    """Consolidate the fp32 encoder from the final checkpoint, export it (safetensors + config)
    and register it (or, with `register=False`, log the files to the run). `registered_version`:
    the version an earlier try registered (tagged on the run), not registered again."""
    # DeepSpeed's import names the accelerator it found, zero_to_fp32 prints its progress
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    with checkpoint.as_directory() as d, console.captured_unless_verbose():
        full = consolidate_model(d)
    state = {k[len("encoder.") :]: v for k, v in full.items() if k.startswith("encoder.")}
    storage = cfg.train.storage_path or ""
    if "://" in storage:  # remote run storage: export locally; MLflow keeps the durable copy
        export_dir = Path(tempfile.mkdtemp(prefix="xtra-export-"))
        model_dir = Path(tempfile.mkdtemp(prefix="xtra-model-"))
    else:
        export_dir = Path(storage, str(cfg.train.run_name), "encoder_export")
        model_dir = export_dir.with_name("model_export")
    meta = {"run_name": cfg.train.run_name, "normalization": {"mean": cfg.data.mean, "std": cfg.data.std}}
    save_encoder(state, cfg.model, export_dir, extra=meta)
    save_model(full, cfg.model, model_dir, extra=meta)  # the decoder and heads too, for pictures
    tracking.log_full_model(uri, run_id, model_dir)
    # what the registry serves is the safetensors file: re-read it (no pickle) and compare
    saved = load_file(str(export_dir / WEIGHTS))
    if saved.keys() != state.keys() or not all(torch.equal(saved[k], state[k]) for k in state):
        raise RuntimeError(f"{export_dir / WEIGHTS}: the saved encoder differs from the consolidated one")
    if not register:
        tracking.log_encoder_files(uri, run_id, export_dir)
        return {"export_dir": str(export_dir), "model_dir": str(model_dir)}
    if registered_version:
        name = cfg.mlflow.registered_model
        info = {"name": name, "version": registered_version, "model_uri": f"models:/{name}/{registered_version}"}
    else:
        info = registry.register_encoder(uri, run_id, export_dir, cfg.mlflow.registered_model)
        if run_id:  # a re-run after a failure below sets the alias on this version, not a new one
            tracking.set_run_tag(uri, run_id, tracking.REGISTERED_VERSION_TAG, info["version"])
    if cfg.mlflow.alias:
        registry.set_alias(info["name"], info["version"], cfg.mlflow.alias, uri)
        info["alias"] = cfg.mlflow.alias
    print(f"[xtra] encoder registered as {info['model_uri']}"
          + (f" (@{cfg.mlflow.alias})" if cfg.mlflow.alias else ""), flush=True)
    return {"export_dir": str(export_dir), "model_dir": str(model_dir), **info}
