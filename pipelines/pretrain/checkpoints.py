"""Pretraining checkpoints in the run's storage (`<storage_path>/<run_name>/checkpoint_step*/`).

Each checkpoint holds every rank's DeepSpeed state under `ds/` and rank 0's `xtra_state.json`
(step, metrics, and the model and batch config of the run). This module reads them from the
driver: the newest registered one (Ray Train's `checkpoint_manager_snapshot.json`), the config it
was trained with (a resume with another model or batch config is refused, naming the keys), and
the full-precision encoder consolidated from the ZeRO shards.

Only DeepSpeed reads the `ds/` files with pickle (its own format): they come from the run's own
storage, written by the run's workers. What this module loads itself is read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
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

# model keys that change how a step is computed, not what is computed: free to change on resume
EXECUTION_KEYS = ("model.compile", "model.activation_checkpointing", "model.attention")
# train keys that a checkpoint's weights, optimiser shards or stream position depend on
# (train.bf16 as resolved on the workers: a bf16 run resumed on fp32 hardware is a change)
BATCH_KEYS = ("train.global_batch_size", "train.micro_batch_size", "train.num_workers",
              "train.zero_stage", "train.bf16")


def resume_keys(cfg: XTRAConfig) -> dict[str, Any]:
    """The model and batch config a checkpoint is bound to, as flat `section.key` values."""
    model = {f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()}
    out = {k: v for k, v in model.items() if k not in EXECUTION_KEYS}
    out.update({k: getattr(cfg.train, k.split(".", 1)[1]) for k in BATCH_KEYS})
    return json.loads(json.dumps(out))  # tuples -> lists, as they come back from JSON


def checkpoint_state(cfg: XTRAConfig, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """What rank 0 writes to `STATE_FILE`."""
    return {"step": step, **metrics, "config": resume_keys(cfg)}


def _open(storage: str, cfg: XTRAConfig) -> tuple[pafs.FileSystem, str]:
    from pipelines.pretrain.stream import open_storage

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


def latest_checkpoint_step(storage: str, run_name: str, cfg: XTRAConfig) -> int:
    """Step of the newest checkpoint Ray Train registered for this run (0 if none)."""
    return latest_checkpoint(storage, run_name, cfg)[0]


def check_resume_config(cfg: XTRAConfig, state: dict[str, Any] | None) -> list[str]:
    """The keys whose value differs from the checkpoint's; raises UserError naming them unless
    `train.resume_mismatch_ok`. Checkpoints without a recorded config are not checked."""
    saved = (state or {}).get("config")
    if not saved:
        return []
    now = resume_keys(cfg)
    # a key the checkpoint does not record (written before the key was checked) is not compared
    changed = [f"{k}={saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
    if changed and not cfg.train.resume_mismatch_ok:
        raise UserError(
            f"run {cfg.train.run_name!r} resumes from a checkpoint of another config: "
            f"{', '.join(changed)}; use another train.run_name, or "
            f"--set train.resume_mismatch_ok=true to go on"
        )
    return changed


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
