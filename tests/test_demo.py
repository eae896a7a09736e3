"""`make demo`'s pretraining recipe is a valid `tiny` config that says what the README says (the
stages themselves are timed by `benchmarks/demo_time.py`, not tested here: ~10 minutes)."""

from __future__ import annotations

from pipelines import demo
from pipelines.config_io import load_config


def test_the_demo_recipe_loads_as_the_tiny_preset_with_its_sets():
    cfg = load_config("tiny", demo.pretrain_sets(demo.STEPS, "demo-x"))
    t = cfg.train
    assert (t.global_batch_size, t.num_workers, t.micro_batch, t.zero_stage) == (demo.BATCH, 2,
                                                                                 demo.BATCH // 2, 2)
    assert (t.max_steps, t.lr, t.warmup_steps) == (demo.STEPS, demo.LR, demo.STEPS // 10)
    assert tuple(cfg.data.crop_scale) == demo.CROP_SCALE
    assert t.checkpoint_every == t.visualize_every == demo.STEPS  # one checkpoint and picture, at the end
    # only the pretraining changes: the model and the probes stay the preset's, as typed
    tiny = load_config("tiny", [])
    assert cfg.model == tiny.model and cfg.probe == tiny.probe


def test_the_demo_s_steps_flag_moves_the_schedule_with_it():
    cfg = load_config("tiny", demo.pretrain_sets(30, "demo-x"))
    assert (cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.checkpoint_every) == (30, 3, 30)
    assert demo.parse_args([]).steps == demo.STEPS


def test_the_summary_shows_the_mean_over_draws_with_its_std(capsys):
    top1 = {"linear_pretrained": 0.64, "linear_random_init": 0.52, "attentive_pretrained": 0.65,
            "attentive_random_init": 0.56}
    r = {"top1": top1, "top5": dict.fromkeys(top1, 0.97), "top1_std": dict.fromkeys(top1, 0.02),
         "probe_draws": 5, "probe_images": 300, "test_images": 2000, "stages": {"pretrain": 1.0},
         "total_s": 1.0, "run_id": "r", "model_uri": "models:/m/1", "tracking_uri": "sqlite:///x",
         "data": "d", "checkpoints": "c"}
    demo.print_summary(r)
    out = capsys.readouterr().out
    assert "300 labelled images (5 seeded draws: mean ± std over them), 2000 test images" in out
    assert "| linear | 0.640 ± 0.020 | 0.520 ± 0.020 | +12.0 points |" in out
    assert "| attentive | 0.650 ± 0.020 | 0.560 ± 0.020 | +9.0 points |" in out
    assert demo.parse_args([]).probe_draws == demo.PROBE_DRAWS == 5
