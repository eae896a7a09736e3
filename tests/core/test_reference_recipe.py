"""The ablation baseline's optimiser against the reference's recipe (`xtra_core.reference`):
parameter groups by name, the LR schedule at its landmarks, and the weights after 3 steps."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pipelines.config_io import load_config
from pipelines.pretrain.trainer import lr_lambda
from xtra_core.config import preset
from xtra_core.model import XTRA
from xtra_core.optim import adamw, param_groups
from xtra_core.reference import ReferenceWarmupCosineLR, reference_param_groups

ABLATION = "configs/ablation_b16_in1k.yaml"


def ablation_recipe_on_tiny(epochs: int, steps_per_epoch: int):
    """The ablation config's train section (lr, wd, betas, warmup from 1e-4, eta_min) on the
    tiny model, scheduled over `epochs` x `steps_per_epoch` steps."""
    cfg = load_config(ABLATION)
    tiny = preset("tiny")
    tiny.train = dataclasses.replace(cfg.train, epochs=epochs)
    tiny.model = dataclasses.replace(tiny.model, projection_bias=cfg.model.projection_bias)
    return tiny, epochs * steps_per_epoch


def names_of(model: torch.nn.Module, groups: list[dict]) -> list[tuple[set[str], float]]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return [({ids[id(p)] for p in g["params"]}, g["weight_decay"]) for g in groups]


def test_ablation_config_is_the_reference_baseline():
    cfg = load_config(ABLATION)
    m, t = cfg.model, cfg.train
    assert (m.encoder_width, m.encoder_depth, m.encoder_heads, m.patch_size, m.image_size) == (768, 12, 12, 16, 256)
    assert (m.projection_hidden, m.decoder_width, m.decoder_heads, m.decoder_depth) == (4096, 384, 6, 8)
    assert (m.head_hidden, m.block_size, m.projection_bias, m.drop_path) == (6144, 4, False, 0.0)
    assert (t.lr, t.weight_decay, tuple(t.betas), t.warmup_start_lr) == (1e-3, 0.05, (0.9, 0.95), 1e-4)
    assert (t.warmup_epochs, t.min_lr, t.epochs, t.grad_clip) == (10, 1e-6, 100, 1.0)
    assert tuple(cfg.data.crop_ratio) == (0.75, 1.5)


def test_param_groups_are_the_reference_groups_by_name():
    torch.manual_seed(0)
    model = XTRA(preset("tiny").model)
    ours = names_of(model, param_groups(model, 0.05))
    ref = names_of(model, reference_param_groups(model, 1e-3, 0.05))
    assert ours == ref
    decay, no_decay = ours[0][0], ours[1][0]
    # the reference decays the position embeddings (3-D), not biases or norms
    assert {"encoder.pos_embed", "decoder.pos_embed", "encoder.patch_embed.weight"} <= decay
    assert {"encoder.patch_embed.bias", "encoder.norm.weight", "heads.0.fc2.bias"} <= no_decay
    assert "projection.2.bias" not in decay | no_decay  # the reference's projection: no bias


def test_attentive_probe_query_is_decayed_as_in_the_reference():
    from xtra_core.probes import AttentiveProbe

    probe = AttentiveProbe(64, 5, heads=4)
    (decay, _), (no_decay, _) = names_of(probe, param_groups(probe, 0.1))
    assert "query" in decay and "k.weight" in decay
    assert names_of(probe, param_groups(probe, 0.1)) == names_of(probe, reference_param_groups(probe, 1e-3, 0.1))
    assert no_decay == {n for n, p in probe.named_parameters() if p.ndim == 1}


def test_lr_schedule_equals_the_reference_at_every_step():
    cfg, total = ablation_recipe_on_tiny(epochs=100, steps_per_epoch=3)  # 300 steps, 30 warmup
    ours = lr_lambda(cfg, total, steps_per_epoch=3)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    warmup = int(cfg.train.warmup_epochs / cfg.train.epochs * total)  # the reference's rounding
    ref = ReferenceWarmupCosineLR(opt, warmup, total, cfg.train.warmup_start_lr, cfg.train.min_lr)
    ref_lrs = [opt.param_groups[0]["lr"]]
    for _ in range(total):
        opt.step()
        ref.step()
        ref_lrs.append(opt.param_groups[0]["lr"])
    our_lrs = [cfg.train.lr * ours(s) for s in range(total + 1)]
    assert our_lrs == pytest.approx(ref_lrs, rel=1e-9, abs=1e-15)
    assert our_lrs[0] == pytest.approx(1e-4)  # step 0: warmup_start_lr
    assert our_lrs[warmup - 1] == pytest.approx(1e-3) and our_lrs[warmup] == pytest.approx(1e-3)
    assert our_lrs[total] == pytest.approx(1e-6)  # the schedule's end: eta_min


@pytest.mark.parametrize("fused", [False, True])
def test_weights_after_three_steps_equal_the_reference_optimiser(fused):
    """for-loop AdamW kernel: bit for bit; the fused kernel (the product's default on CPU/CUDA):
    within 1e-6 of the reference (per-step updates are ~1e-4; the kernels round differently)."""
    cfg, total = ablation_recipe_on_tiny(epochs=100, steps_per_epoch=1)
    torch.manual_seed(0)
    ours_model = XTRA(cfg.model)
    ref_model = copy.deepcopy(ours_model)  # identical weights
    t = cfg.train
    ours_opt = adamw(ours_model, t.lr, t.weight_decay, t.betas, fused=fused)  # as build_engine
    ours_sched = torch.optim.lr_scheduler.LambdaLR(ours_opt, lr_lambda(cfg, total, 1))
    ref_opt = torch.optim.AdamW(reference_param_groups(ref_model, t.lr, t.weight_decay),
                                lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    warmup = int(t.warmup_epochs / t.epochs * total)
    ref_sched = ReferenceWarmupCosineLR(ref_opt, warmup, total, t.warmup_start_lr, t.min_lr)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(3)]
    before = {n: p.detach().clone() for n, p in ours_model.named_parameters()}
    for model, opt, sched in ((ours_model, ours_opt, ours_sched), (ref_model, ref_opt, ref_sched)):
        for x in batches:
            opt.zero_grad()
            model.loss(x).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            sched.step()
    ref_params = dict(ref_model.named_parameters())
    diff = 0.0
    for n, p in ours_model.named_parameters():
        diff = max(diff, float((p - ref_params[n]).detach().abs().max()))
        assert not torch.equal(p, before[n]), n  # every parameter moved
    assert diff <= (1e-6 if fused else 0.0)
    assert ours_sched.get_last_lr()[0] == pytest.approx(ref_sched.get_last_lr()[0])


def test_full_model_export_from_before_projection_bias_still_loads(tmp_path):
    """Exports written when the projection always had a bias (no `projection_bias` key)."""
    import json

    from xtra_core.export import load_model, save_model

    cfg = dataclasses.replace(preset("tiny").model, projection_bias=True)
    model = XTRA(cfg)
    save_model(model.state_dict(), cfg, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["model"]["projection_bias"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = load_model(tmp_path)
    assert torch.equal(loaded.projection[2].bias, model.projection[2].bias)
    assert XTRA(preset("tiny").model).projection[2].bias is None  # the default: the reference's
