"""One sweep trial: the product's pretraining with a fixed step budget, then a probe of its frozen
encoder, reported to Ray Tune (Train V2: a function trainable that fits the TorchTrainer).

Reports a trial makes (all carry `step`, so ASHA can use it as its time attribute):
- `phase="pretrain"`: every Ray Train report, forwarded by `PretrainReport` from the Train
  controller: step, total_steps, loss, lr.
- `phase="probe"`: once at the end: the probe scores (`val_top1` of the first probe kind is the
  sweep's metric, `top1` its test top-1), per kind `<kind>/val_top1|top1|top5|best_lr`, and the
  trial's MLflow run id.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from pipelines.pretrain.driver import run_pretraining
from pipelines.probe.driver import probe
from pipelines.tracking import runs as tracking
from pipelines.tracking import sweeps
from tune.space import SEED_KEYS, expand_point
from xtra_core.config import XTRAConfig, build_config, config_from_dict

logger = logging.getLogger("xtra.sweep")

PRETRAIN_KEYS = ("step", "total_steps", "loss", "lr", "images_per_s")


@dataclass
class SweepSpec:
    """What every trial of a sweep shares (sent once to the trial actors)."""

    name: str
    base: dict[str, Any]  # XTRAConfig.to_dict() of the base config
    axis_names: dict[str, str]  # config key -> the name the user gave (block_size, train.lr)
    kinds: list[str] = field(default_factory=lambda: ["linear"])
    parent_run_id: str | None = None
    tracking_uri: str = ""


class PretrainReport(TuneReportCallback):
    """On the Ray Train controller: forward rank 0's (rank-averaged) metrics to the Tune trial.

    Ray's TuneReportCallback carries them over an inter-actor queue to the trial, which reports
    them with `ray.tune.report`; this keeps only the curve (no checkpoint path: the trial keeps
    no Tune checkpoint, its pretraining run resumes from its own Ray Train checkpoints)."""

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        m = metrics[0]
        self._training_actor_item_queue.put(
            {"phase": "pretrain", **{k: m[k] for k in PRETRAIN_KEYS if k in m}}
        )


def run_name_of(spec: SweepSpec, config: dict[str, Any]) -> str:
    """`<sweep>-block_size2-orderraster-seed0`: stable across a resume, readable in MLflow."""
    parts = [f"{spec.axis_names.get(k, k)}{v}" for k, v in config.items() if k != "seed"]
    parts.append(f"seed{config['seed']}")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{spec.name}-" + "-".join(parts))


def trial_config(spec: SweepSpec, config: dict[str, Any]) -> XTRAConfig:
    """The trial's config: the base, the grid point's values, the seed and the run name."""
    point = expand_point({k: v for k, v in config.items() if k != "seed"})  # paired axes split
    dotted = {**point, **{k: config["seed"] for k in SEED_KEYS}, "train.run_name": run_name_of(spec, config)}
    return build_config(config_from_dict(spec.base), None, dotted)


def sweep_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """The Tune function trainable: pretrain (nested MLflow run) -> probe -> report."""
    from ray import tune as ray_tune

    cfg = trial_config(spec, config)
    out = finished_pretraining(spec, cfg) or run_pretraining(
        cfg, callbacks=[PretrainReport()], parent_run_id=spec.parent_run_id, register=False
    )
    run_id = out["run_id"]
    if "export_dir" not in out:  # train.stop_at_step ended it early: nothing to probe
        raise RuntimeError(f"trial {cfg.train.run_name} stopped at step {out['step']} before the end "
                           "of its schedule; remove train.stop_at_step from a sweep")
    try:
        records = probe(cfg, out["export_dir"], spec.kinds, run_id=run_id)  # scores on the trial's run
        scores = log_probe_scores(spec, run_id, config, records)
    except BaseException:
        if run_id:
            tracking.finish_run(spec.tracking_uri, run_id, "FAILED")
        raise
    if run_id:
        tracking.finish_run(spec.tracking_uri, run_id, "FINISHED")
    loss = (out.get("metrics") or {}).get("loss")  # ASHA reads it: absent rather than None
    ray_tune.report({"phase": "probe", "step": out["step"], "total_steps": out["step"],
                 **({"loss": loss} if loss is not None else {}), "run_id": run_id or "",
                 "run_name": cfg.train.run_name, **scores})


def finished_pretraining(spec: SweepSpec, cfg: XTRAConfig) -> dict[str, Any] | None:
    """A trial whose pretraining ended before the sweep was stopped (it was probing): its MLflow
    run and exported encoder, so a resumed sweep probes it again instead of retraining."""
    out = sweeps.finished_trial(spec.tracking_uri, cfg.mlflow.experiment, cfg.train.run_name)
    if out is not None:
        logger.info("%s: pretraining already finished; probing its encoder", cfg.train.run_name)
    return out


def axis_values(spec: SweepSpec, config: dict[str, Any]) -> dict[str, str]:
    """A grid point's values by the names the user gave the axes (the seed included)."""
    return {spec.axis_names.get(k, k): str(v) for k, v in config.items()}


def log_probe_scores(
    spec: SweepSpec, run_id: str | None, config: dict[str, Any], records: list[dict[str, Any]]
) -> dict[str, float]:
    """The flat score dict of the trial's probes (`probe()` logged them on the trial's nested
    MLflow run already); tags the run with the sweep and its axis values."""
    scores: dict[str, float] = {}
    for i, r in enumerate(records):
        for key in ("val_top1", "top1", "top5", "best_lr"):
            if r.get(key) is not None:
                scores[f"{r['kind']}/{key}"] = float(r[key])
                if i == 0 and key in ("val_top1", "top1"):
                    scores[key] = float(r[key])  # the sweep's metric: the first probe kind
    if run_id:
        sweeps.tag_trial(spec.tracking_uri, run_id, spec.name, axis_values(spec, config))
    return scores
