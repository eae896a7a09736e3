"""Pretraining checkpoints in the run's storage (`<storage_path>/<run_name>/checkpoint_step*/`).

Each checkpoint holds every rank's DeepSpeed state under `ds/` and rank 0's `xtra_state.json`
(step, metrics, and the model and batch config of the run). This module reads them from the
driver: the newest registered one (Ray Train's `checkpoint_manager_snapshot.json`), the config it
was trained with (a resume with another model or batch config is refused, naming the keys), and
the full-precision encoder consolidated from the ZeRO shards.

Only DeepSpeed reads the `ds/` files with pickle (its own format): they come from the run's own
storage, written by the run's workers, and are checked against the SHA-256 recorded on the MLflow
run before a load (`pipelines.pretrain.digests`). What this module loads itself is read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from pipelines.errors import UserError
from xtra_core.config import XTRAConfig

STATE_FILE = "xtra_state.json"  # written by rank 0 into every checkpoint
DS_TAG = "ds"  # DeepSpeed checkpoint tag (sub-directory) inside a Ray checkpoint
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints

# keys that change how or where a step runs, not what the run computes: free to change on resume
FREE_KEYS = frozenset({
    "model.compile", "model.activation_checkpointing", "model.attention",
    "data.test_split", "data.s3_endpoint", "data.s3_region", "data.s3_max_attempts",
    "data.s3_connect_timeout_s", "data.s3_request_timeout_s", "data.skip_unreadable_files",
    "data.max_bad_fraction",
    "train.stop_at_step", "train.use_gpu", "train.cpus_per_worker", "train.zero_bucket_size",
    "train.checkpoint_every", "train.log_every", "train.num_to_keep", "train.max_failures",
    "train.resource_wait_s", "train.run_name", "train.storage_path", "train.visualize_every",
    "train.visualize_images", "train.resume_mismatch_ok", "train.verify_checkpoints",
})
# keys whose effect is the LR schedule: compared through the resolved schedule (`schedule_keys`),
# so that two spellings of one schedule (max_steps vs epochs x steps_per_epoch) are the same
SCHEDULE_KEYS = frozenset({"train.epochs", "train.max_steps", "train.steps_per_epoch",
                           "train.warmup_epochs", "train.warmup_steps"})
SCHEDULE_FROM = {"schedule.total_steps": "train.max_steps, else train.epochs x steps per epoch",
                 "schedule.warmup_steps": "train.warmup_steps, else train.warmup_epochs",
                 "schedule.steps_per_epoch": "train.steps_per_epoch, else the dataset's size"}
# how a file's random crop and flip are keyed (`pipelines.data.images.draw_key`): recorded, so that
# a run of the older keying is not resumed silently with other crops
DRAW_KEY = "path below the split's folder"
# what a checkpoint written before a key existed was trained with (absent keys are otherwise
# not compared: an older checkpoint never blocks a resume by lacking a newer key)
BEFORE_THE_KEY = {"model.projection_bias": True, "data.draw_key": "absolute path"}


def resume_keys(cfg: XTRAConfig) -> dict[str, Any]:
    """What a checkpoint is bound to, as flat `section.key` values: every model, data and train
    key except `FREE_KEYS` and the schedule's raw keys, and `data.draw_key`; URIs redacted (the
    file sits in the run's storage)."""
    from pipelines.redaction import redact

    out: dict[str, Any] = {"data.draw_key": DRAW_KEY}
    for section in ("model", "data", "train"):
        for k, v in dataclasses.asdict(getattr(cfg, section)).items():
            key = f"{section}.{k}"
            if key not in FREE_KEYS and key not in SCHEDULE_KEYS:
                out[key] = redact(v) if isinstance(v, str) else v
    return json.loads(json.dumps(out))  # tuples -> lists, as they come back from JSON


def schedule_keys(cfg: XTRAConfig, total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
    """The resolved LR schedule (warmup + cosine over the run's length) as `schedule.*` values."""
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_epochs * steps_per_epoch)
    return {"schedule.total_steps": int(total_steps), "schedule.warmup_steps": int(min(warmup, max(0, total_steps - 1))),
            "schedule.steps_per_epoch": int(steps_per_epoch)}


def checkpoint_state(cfg: XTRAConfig, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """What rank 0 writes to `STATE_FILE` (the worker adds the resolved schedule: `seal`)."""
    return {"step": step, **metrics, "config": resume_keys(cfg)}


def seal(checkpoint_dir: str, schedule: dict[str, Any]) -> None:
    """Rank 0, before reporting a checkpoint: the resolved schedule into its state file."""
    path = Path(checkpoint_dir, STATE_FILE)
    if path.exists():
        state = json.loads(path.read_text())
        state.setdefault("config", {}).update(schedule)
        path.write_text(json.dumps(state))


def _open(storage: str, cfg: XTRAConfig) -> tuple[pafs.FileSystem, str]:
    from pipelines.pretrain.plan import open_storage

    return open_storage(storage, cfg)


def _read_json(fs: pafs.FileSystem, path: str, tries: int = 5) -> dict[str, Any] | None:
    """The JSON file at `path`, None if there is none. Ray Train rewrites its snapshot in place, so
    a reader racing a running job can see it empty or cut short: read again (0.1 s apart); a
    file that stays unreadable is named in the error."""
    for attempt in range(tries):
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            raw = f.read()
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            if attempt == tries - 1:
                raise UserError(f"{path}: not valid JSON ({e}); the file is corrupt or another "
                                "job is writing this run") from None
            time.sleep(0.1)
    return None


def latest_checkpoint(storage: str, run_name: str, cfg: XTRAConfig) -> tuple[int, dict[str, Any] | None]:
    """(step, rank 0's state file) of the newest checkpoint Ray Train registered for this run;
    (0, None) if none. Ray registers a checkpoint once every rank has uploaded its files, and
    hands exactly that one to the workers (`ray.train.get_checkpoint()`), so the stream is
    started at the same step."""
    fs, root = _open(storage, cfg)
    snapshot = _read_json(fs, f"{root}/{run_name}/{SNAPSHOT_FILE}")
    latest = (snapshot or {}).get("latest_checkpoint_result") or {}
    step = int((latest.get("metrics") or {}).get("step", 0))
    if not step:
        return 0, None
    state = _read_json(fs, f"{root}/{run_name}/{latest['checkpoint_dir_name']}/{STATE_FILE}")
    return step, state


def latest_checkpoint_ref(storage: str, run_name: str, cfg: XTRAConfig):  # -> ray.train.Checkpoint | None
    """The newest checkpoint Ray Train registered for this run, as a Checkpoint on the run's
    storage (local or S3), None if there is none."""
    from ray.train import Checkpoint

    fs, root = _open(storage, cfg)
    snapshot = _read_json(fs, f"{root}/{run_name}/{SNAPSHOT_FILE}")
    name = ((snapshot or {}).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if not name:
        return None
    path = f"{root}/{run_name}/{name}"
    return Checkpoint(path) if fs.type_name == "local" else Checkpoint(path, filesystem=fs)


def latest_checkpoint_step(storage: str, run_name: str, cfg: XTRAConfig) -> int:
    """Step of the newest checkpoint Ray Train registered for this run (0 if none)."""
    return latest_checkpoint(storage, run_name, cfg)[0]


def _lr_curve(v: dict[str, Any], steps: list[int]) -> list[float]:
    from xtra_core.optim import warmup_cosine_lr

    return [warmup_cosine_lr(s, v["schedule.total_steps"], v["schedule.warmup_steps"], v["train.lr"],
                             v["train.min_lr"], v.get("train.warmup_start_lr", 0.0)) for s in steps]


def schedule_extends(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """A changed run length is only allowed when the schedule says so: every step both schedules
    have gets the same LR (a flat schedule, `train.lr` = `train.min_lr` after the warmup, grows
    or shrinks freely; a cosine's length is the run's length, so there it changes every later
    step). Sampled at up to 2,000 steps, the ends included."""
    keys = ("schedule.total_steps", "schedule.warmup_steps", "train.lr", "train.min_lr")
    if any(k not in saved for k in keys):
        return False
    common = min(saved["schedule.total_steps"], now["schedule.total_steps"])
    stride = max(1, common // 2000)
    steps = sorted({*range(0, common, stride), common - 1})
    return all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
               for a, b in zip(_lr_curve(saved, steps), _lr_curve(now, steps), strict=True))


def check_resume_config(cfg: XTRAConfig, state: dict[str, Any] | None,
                        schedule: dict[str, Any] | None = None) -> list[str]:
    """The changes from the checkpoint's config, `key=old -> new`; raises UserError naming them
    unless `train.resume_mismatch_ok`. Compared: `resume_keys` and the resolved `schedule`; a
    new run length alone passes when `schedule_extends` says so (and is returned, to be
    recorded). Keys the checkpoint lacks (written before they existed) are not compared, except
    `BEFORE_THE_KEY`'s; checkpoints without a recorded config are not checked."""
    saved = dict((state or {}).get("config") or {})
    if not saved:
        return []
    for k, v in BEFORE_THE_KEY.items():
        saved.setdefault(k, v)
    now = {**resume_keys(cfg), **(schedule or {})}
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    lines = [f"{k}={saved[k]!r} -> {now[k]!r}" + (f" (from {SCHEDULE_FROM[k]})" if k in SCHEDULE_FROM else "")
             for k in changed]
    length_only = set(changed) <= {"schedule.total_steps"}
    if changed and not cfg.train.resume_mismatch_ok and not (length_only and schedule_extends(saved, now)):
        why = ""
        if "schedule.total_steps" in changed:
            why = (" (the cosine schedule runs over the whole run: another length changes the LR of "
                   "every later step; train.stop_at_step ends an invocation early without that)")
        if "data.draw_key" in changed:
            why += (" (this version draws each file's crop and flip from its path below the split's "
                    "folder, the checkpoint's run from its absolute path: going on draws other crops "
                    "of the same recipe)")
        raise UserError(
            f"run {cfg.train.run_name!r} resumes from a checkpoint of another config: "
            f"{', '.join(lines)}{why}; use another train.run_name, or "
            f"--set train.resume_mismatch_ok=true to go on"
        )
    return lines


def consolidate_encoder(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """Full-precision encoder weights from a DeepSpeed checkpoint of any ZeRO stage."""
    full = consolidate_model(checkpoint_dir)
    return {k[len("encoder.") :]: v for k, v in full.items() if k.startswith("encoder.")}


def consolidate_model(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """Full-precision weights of the whole XTRA from a DeepSpeed checkpoint of any ZeRO stage."""
    ds_dir = Path(checkpoint_dir) / DS_TAG
    if any(ds_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DS_TAG)
    else:
        full = load_module_states(checkpoint_dir)
    return {k: v.float() for k, v in full.items()}


def load_module_states(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """Rank 0's module weights (`ds/mp_rank_00_model_states.pt`), loaded with weights_only."""
    path = Path(checkpoint_dir) / DS_TAG / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["module"]
