"""What a resume may change (fast, no Ray): keys that alter what the run computes are refused
unless train.resume_mismatch_ok; a new run length only where the schedule says so; keys a
checkpoint predates never block it (model.projection_bias: such a checkpoint had the bias)."""

from __future__ import annotations

import json

import pytest

from pipelines.errors import UserError
from pipelines.pretrain.checkpoints import check_resume_config, checkpoint_state, schedule_keys
from pipelines.pretrain.plan import plan_run
from tests.pretrain.test_trainer import cfg_with


def saved_state(cfg, total: int = 100, per_epoch: int = 10) -> dict:
    state = checkpoint_state(cfg, 40, {"loss": 1.0})
    state["config"].update(schedule_keys(cfg, total, per_epoch))  # as the worker seals it
    return json.loads(json.dumps(state))


def check(cfg, state, total: int = 100, per_epoch: int = 10) -> list[str]:
    return check_resume_config(cfg, state, schedule_keys(cfg, total, per_epoch))


@pytest.mark.parametrize("key,value", [
    ("data.uri", "/other/images"), ("train.lr", 5e-4), ("train.seed", 1), ("data.seed", 3),
    ("train.warmup_steps", 3), ("train.min_lr", 1e-5), ("train.bf16", True), ("data.crop_scale", [0.5, 1.0]),
])
def test_a_change_to_what_the_run_computes_is_refused_naming_it(key, value) -> None:
    state = saved_state(cfg_with(data__uri="/images"))
    other = cfg_with(**{"data__uri": "/images", key.replace(".", "__"): value})
    with pytest.raises(UserError, match=rf"{key}.*resume_mismatch_ok=true"):
        check(other, state)
    other.train.resume_mismatch_ok = True
    assert [line.split("=")[0] for line in check(other, state)] == [
        "schedule.warmup_steps" if key == "train.warmup_steps" else key]


def test_execution_keys_and_one_schedule_spelled_two_ways_pass() -> None:
    state = saved_state(cfg_with(train__max_steps=100))
    same = cfg_with(train__epochs=10, model__compile=True, train__stop_at_step=60,
                    train__checkpoint_every=5, data__s3_endpoint="http://x:9000")
    assert check(same, state) == []  # 10 epochs x 10 steps = the recorded 100 steps


def test_a_longer_cosine_is_refused_a_longer_flat_schedule_is_an_extension() -> None:
    cosine = saved_state(cfg_with(train__max_steps=100))
    with pytest.raises(UserError, match=r"schedule.total_steps=100 -> 200 \(from train.max_steps.*\(the cosine schedule"):
        check(cfg_with(train__max_steps=200), cosine, total=200)
    flat = dict(train__lr=1e-3, train__min_lr=1e-3, train__warmup_steps=5)
    state = saved_state(cfg_with(train__max_steps=100, **flat))
    assert check(cfg_with(train__max_steps=200, **flat), state, total=200) [0].startswith("schedule.total_steps=100 -> 200")


def test_keys_an_old_checkpoint_lacks_do_not_block_but_projection_bias_means_the_bias() -> None:
    old = {"step": 4, "config": {"model.image_size": 32, "train.global_batch_size": 128,
                                 "data.draw_key": "path below the split's folder"}}
    with pytest.raises(UserError, match=r"model.projection_bias=True -> False"):
        check(cfg_with(train__lr=5e-4), old)
    assert check(cfg_with(train__lr=5e-4, model__projection_bias=True), old) == []


def test_a_checkpoint_whose_crops_were_keyed_by_absolute_paths_is_not_resumed_silently() -> None:
    old = {"step": 4, "config": {"model.image_size": 32}}  # before data.draw_key was recorded
    cfg = cfg_with(model__projection_bias=True)
    with pytest.raises(UserError, match=r"data.draw_key='absolute path' -> \"path below the split's folder\".*"
                                        r"other crops of the same recipe.*resume_mismatch_ok=true"):
        check(cfg, old)
    cfg.train.resume_mismatch_ok = True
    assert check(cfg, old) == ["data.draw_key='absolute path' -> \"path below the split's folder\""]
    assert check(cfg, saved_state(cfg)) == []  # a checkpoint of this version records its keying


def test_uri_credentials_are_not_written_into_the_checkpoint_state() -> None:
    state = checkpoint_state(cfg_with(data__uri="s3://user:SECRET@host/bucket"), 4, {})
    assert "SECRET" not in json.dumps(state)


def test_a_trained_run_gets_a_plan_with_nothing_to_train_and_stop_at_step_still_refuses() -> None:
    plan = plan_run(cfg_with(train__max_steps=8, train__global_batch_size=16, train__num_workers=2), 64, 8)
    assert plan.trained and plan.start_step == plan.stop_step == 8
    with pytest.raises(UserError, match="nothing to train"):
        plan_run(cfg_with(train__max_steps=8, train__stop_at_step=4, train__global_batch_size=16,
                          train__num_workers=2), 64, 4)
