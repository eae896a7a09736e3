"""The trainer's pieces: resources sized and checked before the fit, the resume-config check, the
run defaults, and (slow: a real DeepSpeed engine in one process) the loop's host read-backs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pipelines.errors import UserError
from pipelines.pretrain import trainer
from pipelines.pretrain.checkpoints import STATE_FILE, check_resume_config, checkpoint_state
from pipelines.pretrain.plan import RunPlan, default_run_name, storage_path
from pipelines.pretrain.resources import worker_cpus
from xtra_core.config import build_config

SMALL_MODEL = {
    "model.image_size": 16, "model.patch_size": 4, "model.block_size": 2,
    "model.encoder_width": 32, "model.encoder_depth": 1, "model.encoder_heads": 2,
    "model.projection_hidden": 64, "model.decoder_width": 32, "model.decoder_depth": 1,
    "model.decoder_heads": 2, "model.head_hidden": 64,
}


def cfg_with(small: bool = False, **sets):
    """The tiny preset with `section__key=value` overrides (on the small model if `small`)."""
    dotted = {**(SMALL_MODEL if small else {}), **{k.replace("__", "."): v for k, v in sets.items()}}
    return build_config("tiny", None, dotted)


# --------------------------------------------------------------------------- resources


def test_preset_and_yaml_tiny_mean_the_same_resources():
    from pipelines.config_io import load_config

    assert load_config("tiny") == load_config("configs/tiny.yaml")


def test_unset_cpus_per_worker_is_sized_to_leave_cpus_for_decoding():
    cfg = cfg_with()  # the tiny preset: 2 workers, cpus_per_worker unset
    assert cfg.train.cpus_per_worker is None
    assert worker_cpus(cfg, {"CPU": 2.0}) == 0.5  # 1 CPU left to Ray Data's decode tasks
    assert worker_cpus(cfg, {"CPU": 16.0}) == 6.0  # a quarter (4 CPUs) left to decoding
    big = cfg_with(train__num_workers=8, train__global_batch_size=64)
    assert worker_cpus(big, {"CPU": 96.0, "GPU": 8.0}) == 9.0


def test_a_request_that_leaves_no_cpu_to_decode_fails_naming_the_keys():
    cfg = cfg_with(train__cpus_per_worker=1.0)  # what `--config tiny` asked before: it hung
    with pytest.raises(UserError, match=r"train\.num_workers=2 x train\.cpus_per_worker=1 .*2 CPUs"):
        worker_cpus(cfg, {"CPU": 2.0})
    assert worker_cpus(cfg, {"CPU": 3.0}) == 1.0
    with pytest.raises(UserError, match=r"has 1 CPUs.*train\.num_workers"):
        worker_cpus(cfg_with(), {"CPU": 1.0})
    gpu = cfg_with(train__use_gpu=True)
    with pytest.raises(UserError, match=r"train\.use_gpu=true with train\.num_workers=2 needs 2 GPUs"):
        worker_cpus(gpu, {"CPU": 8.0, "GPU": 1.0})


# --------------------------------------------------------------------------- resume config


def test_resume_with_another_model_or_batch_config_is_refused_naming_the_keys():
    saved = checkpoint_state(cfg_with(small=True), 4, {"loss": 1.0})
    saved = json.loads(json.dumps(saved))  # as read back from the checkpoint's STATE_FILE
    same = cfg_with(small=True, model__compile=True, train__checkpoint_every=7)  # execution: free to change
    assert check_resume_config(same, saved) == []
    other = cfg_with(small=True, model__decoder_depth=2, train__global_batch_size=64)
    with pytest.raises(UserError) as e:
        check_resume_config(other, saved)
    msg = str(e.value)
    assert "model.decoder_depth=1 -> 2" in msg and "train.global_batch_size=128 -> 64" in msg
    assert "train.resume_mismatch_ok=true" in msg and "model.image_size" not in msg
    other.train.resume_mismatch_ok = True
    assert len(check_resume_config(other, saved)) == 2
    assert check_resume_config(other, {"step": 4}) == []  # a checkpoint without a recorded config


def test_run_defaults_are_one_function_each():
    assert re.fullmatch(r"xtra-tiny-\d{8}-\d{6}", default_run_name("xtra-tiny"))
    assert storage_path(None) == str(Path("~/xtra_runs").expanduser())
    assert storage_path("s3://b/runs") == "s3://b/runs"


# --------------------------------------------------------------------------- the loop (slow)


class HostReadbacks(TorchFunctionMode):
    """Counts tensor -> host read-backs (item, tolist, float, bool, numpy, cpu) made by code in
    pipelines/pretrain/trainer.py (DeepSpeed's own internals are not the trainer's)."""

    READBACKS = {"item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READBACKS:
            import sys

            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename == __file__:
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename == trainer.__file__:
                self.calls.append(f"{name} in {frame.f_code.co_name}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def one_process_group():
    from benchmarks.mfu import end_process_group, single_process_group

    single_process_group(torch.device("cpu"))
    yield
    end_process_group()


@pytest.mark.slow  # a real DeepSpeed engine (~10 s to build)
def test_loss_is_read_back_only_on_report_steps(one_process_group, tmp_path):
    cfg = build_config("tiny", None, {
        **SMALL_MODEL, "train.num_workers": 1, "train.global_batch_size": 8,
        "train.micro_batch_size": 4, "train.zero_stage": 2, "train.log_every": 3,
        "train.checkpoint_every": 100, "train.warmup_steps": 1, "train.max_steps": 7,
    })
    plan = RunPlan(total_steps=7, steps_per_epoch=7, rows_per_epoch=56, start_step=0, stop_step=7)
    engine, scheduler = trainer.build_engine(cfg, plan)
    from deepspeed.comm import comm as ds_comm

    assert ds_comm.cdb.shm_comm_op is None  # DeepSpeed's inference-only CPU op: neither built nor loaded
    g = torch.Generator().manual_seed(0)
    micro_batches = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2 * 7 + 3)]
    reports: list[tuple[dict, list[str] | None]] = []

    def report(metrics, checkpoint_dir):
        files = sorted(p.name for p in Path(checkpoint_dir).iterdir()) if checkpoint_dir else None
        state = json.loads(Path(checkpoint_dir, STATE_FILE).read_text()) if checkpoint_dir else None
        reports.append((metrics, files, state))

    micro_losses: list[torch.Tensor] = []  # what each forward returned, kept on the device
    engine.module.register_forward_hook(lambda _m, _i, out: micro_losses.append(out.detach()))
    with HostReadbacks() as counter:
        step = trainer.fit(engine, scheduler, micro_batches, cfg, plan, 0, report)
    assert step == 7
    # 14 micro steps, 7 optimiser steps; reports at steps 3, 6 and the final checkpoint at 7
    assert [m["step"] for m, _, _ in reports] == [3, 6, 7]
    assert counter.calls == ["tolist in reduce"] * 3, counter.calls  # one read-back per report
    assert [files is None for _, files, _ in reports] == [True, True, False]
    assert {"ds", STATE_FILE} <= set(reports[-1][1])  # every rank's DeepSpeed state + rank 0's
    assert reports[-1][2]["config"]["model.decoder_depth"] == 1 and reports[-1][2]["step"] == 7
    # each report is the mean loss of the micro steps since the previous one (6, 6, then 2)
    assert len(micro_losses) == 14
    for (m, _, _), (a, b) in zip(reports, [(0, 6), (6, 12), (12, 14)]):
        assert m["loss"] == pytest.approx(torch.stack(micro_losses[a:b]).float().mean().item(), rel=1e-5)
