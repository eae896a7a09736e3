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

Before the fit the driver checks what cannot work: the tracking server, the dataset listing, the
resources (`resources.worker_cpus`: sized from the cluster when `train.cpus_per_worker` is unset),
and a resumed run's config against its checkpoint's (`checkpoints.check_resume_config`).
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
from pipelines.data.stream import bad_file_counter
from pipelines.errors import UserError
from pipelines.pretrain.checkpoints import (  # noqa: F401 - re-exported for callers and tests
    DS_TAG,
    STATE_FILE,
    check_resume_config,
    consolidate_encoder,
    consolidate_model,
    latest_checkpoint,
    latest_checkpoint_step,
)
from pipelines.pretrain.plan import RunPlan, default_run_name, plan_run, storage_path  # noqa: F401
from pipelines.pretrain.precision import resolve_on_workers
from pipelines.pretrain.progress import ProgressAndTracking, StatusRelay
from pipelines.pretrain.resources import worker_cpus
from pipelines.pretrain.stream import TrainStream, build_train_stream, open_storage
from pipelines.pretrain.trainer import deepspeed_config  # noqa: F401 - re-exported
from pipelines.pretrain.worker import train_loop_per_worker
from pipelines.tracking import registry
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

    uri = tracking.tracking_uri(cfg)
    tracking.check_tracking(uri)  # before any compute

    stream: TrainStream = build_train_stream(cfg)  # lists the files: a bad URI fails here, first
    if not ray.is_initialized():
        ray.init(**console.ray_init_kwargs())
    console.quiet_ray_data()  # the driver prints one status line per report
    # resources and the checkpoint's config are checked before anything is started or logged
    cfg.train.cpus_per_worker = worker_cpus(cfg, ray.cluster_resources())
    resources = {"CPU": cfg.train.cpus_per_worker}
    precision = resolve_on_workers(cfg, resources)  # "auto" on a worker's hardware
    cfg.train.bf16 = precision.bf16  # the workers, the checkpoint and MLflow see the resolved value
    start_step, state = latest_checkpoint(storage, run_name, cfg)
    changed = check_resume_config(cfg, state)
    if changed:
        log.warning("resuming %s with a changed config (train.resume_mismatch_ok): %s",
                    run_name, ", ".join(changed))
    plan = plan_run(cfg, stream.num_images, start_step)
    rows = (plan.stop_step - plan.start_step) * cfg.train.global_batch_size
    bad_files = bad_file_counter(plan.bad_files_actor)  # held by the driver for the whole fit
    dataset = stream.dataset(plan.start_step * cfg.train.global_batch_size, rows, bad_files)

    run_id = tracking.start_or_resume_run(uri, cfg, run_name, parent_run_id)
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
        train_loop_config={"config": cfg.to_dict(), "plan": plan.__dict__},
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
    except BaseException:
        finish_pictures(pictures, succeeded=False)
        if run_id:
            tracking.finish_run(uri, run_id, "FAILED")
        raise
    out: dict[str, Any] = {"run_name": run_name, "run_id": run_id, "step": plan.stop_step,
                           "metrics": result.metrics, "checkpoint": result.checkpoint.path}
    if pictures:
        out["pictures"] = finish_pictures(pictures)
    if plan.stop_step == plan.total_steps:
        out.update(export_and_register(cfg, result.checkpoint, uri, run_id, register))
    elif run_id:
        tracking.finish_run(uri, run_id, "KILLED")  # stopped early on purpose; resumable
    return out


def export_and_register(
    cfg: XTRAConfig, checkpoint: Checkpoint, uri: str, run_id: str | None, register: bool = True
) -> dict[str, Any]:
    """Consolidate the fp32 encoder from the final checkpoint, export it (safetensors + config)
    and register it (or, with `register=False`, log the files to the run)."""
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
    registry.log_full_model(uri, run_id, model_dir)
    # what the registry serves is the safetensors file: re-read it (no pickle) and compare
    saved = load_file(str(export_dir / WEIGHTS))
    if saved.keys() != state.keys() or not all(torch.equal(saved[k], state[k]) for k in state):
        raise RuntimeError(f"{export_dir / WEIGHTS}: the saved encoder differs from the consolidated one")
    if not register:
        tracking.log_encoder_files(uri, run_id, export_dir)
        return {"export_dir": str(export_dir), "model_dir": str(model_dir)}
    info = tracking.register_encoder(uri, run_id, export_dir, cfg.mlflow.registered_model)
    if cfg.mlflow.alias:
        registry.set_alias(info["name"], info["version"], cfg.mlflow.alias, uri)
        info["alias"] = cfg.mlflow.alias
    print(f"[xtra] encoder registered as {info['model_uri']}"
          + (f" (@{cfg.mlflow.alias})" if cfg.mlflow.alias else ""), flush=True)
    return {"export_dir": str(export_dir), "model_dir": str(model_dir), **info}
