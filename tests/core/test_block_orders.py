"""model.block_order=pseudo_random: the reference's K prefix-distinct permutations, one drawn per
training step; the objective for each order equals the raster-order reference."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from xtra_core.config import ConfigError, preset
from xtra_core.masks import block_order, block_orders
from xtra_core.model import XTRA
from xtra_core.reference import reference_loss


def reference_rows(num_blocks: int, seed: int) -> torch.Tensor:
    """The reference's `create_random_permutations` loop as it reads: global generator seeded,
    randperm until no kept row shares a prefix of any length 1..K-1 with the draw."""
    torch.manual_seed(seed)
    rows: list[torch.Tensor] = []
    while len(rows) < num_blocks:
        row = torch.randperm(num_blocks)
        if all(not torch.equal(r[:n], row[:n]) for r in rows for n in range(1, num_blocks)):
            rows.append(row)
    return torch.stack(rows)


def pseudo_random_model(seed: int = 0) -> XTRA:
    torch.manual_seed(0)
    return XTRA(dataclasses.replace(preset("tiny").model, block_order="pseudo_random", order_seed=seed))


@pytest.mark.parametrize("num_blocks,seed", [(4, 0), (16, 0), (16, 3)])
def test_pseudo_random_orders_are_the_references_prefix_distinct_permutations(num_blocks, seed):
    rows = block_orders(num_blocks, "pseudo_random", seed)
    assert torch.equal(rows, reference_rows(num_blocks, seed))
    assert rows.shape == (num_blocks, num_blocks)
    assert all(torch.equal(r.sort().values, torch.arange(num_blocks)) for r in rows)
    prefixes = {tuple(r[:n].tolist()) for r in rows for n in range(1, num_blocks)}
    assert len(prefixes) == num_blocks * (num_blocks - 1)  # no two rows share any prefix


def test_raster_and_random_keep_one_order():
    assert torch.equal(block_orders(16, "raster"), torch.arange(16)[None])
    assert block_orders(16, "random", 5).shape == (1, 16)
    assert torch.equal(block_order(16, "random", 5), block_orders(16, "random", 5)[0])
    assert not torch.equal(block_order(16, "random", 5), torch.arange(16))


def test_each_training_step_uses_one_of_the_orders_and_eval_the_first():
    model = pseudo_random_model()
    rows = {tuple(r.tolist()) for r in model.layout.orders}
    x = torch.randn(2, 3, 32, 32)
    model.train()
    seen = set()
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(40):
            model.loss(x)
            seen.add(tuple(model.layout.order.tolist()))
    assert seen <= rows and len(seen) > 4  # drawn per step, from the set
    model.eval()
    with torch.no_grad():
        model.loss(x)
    assert torch.equal(model.layout.order, model.layout.orders[0])


def test_loss_for_every_order_equals_the_raster_reference():
    model = pseudo_random_model().eval()
    x = torch.randn(2, 3, 32, 32)
    losses = []
    with torch.no_grad():
        for i in range(model.layout.num_orders):
            model.layout.use_order(i)
            z = model.decoder_output_by_block(x, drop_last_block=True)
            ours = model.forward_loss([h(z) for h in model.heads], model.targets(x))
            assert torch.allclose(ours, reference_loss(model, x), atol=1e-6)
            losses.append(float(ours))
    assert len(set(losses)) > 1  # the order changes the task


def test_unknown_block_order_is_one_error_naming_the_choices():
    with pytest.raises(ConfigError, match="pseudo_random"):
        dataclasses.replace(preset("tiny").model, block_order="spiral").validate()


# --------------------------------------------------------------------------- deterministic draws


def small_model(block_order: str = "pseudo_random", seed: int = 0) -> XTRA:
    """The tiny preset's 16 blocks on a one-layer trunk (the draws do not depend on the width)."""
    cfg = dataclasses.replace(
        preset("tiny").model, block_order=block_order, order_seed=seed, encoder_width=48,
        encoder_depth=1, projection_hidden=48, decoder_width=48, decoder_depth=1, head_hidden=48,
    )
    return XTRA(cfg)


def drawn_orders(model: XTRA, steps: int) -> list[int]:
    """The order index each of `steps` training steps draws (what `loss` does first in training)."""
    model.train()
    return [model.layout.draw_order() for _ in range(steps)]


def test_models_with_the_same_order_seed_draw_the_same_orders_whatever_the_global_generator():
    a, b = small_model(seed=3), small_model(seed=3)
    torch.manual_seed(1)
    first = drawn_orders(a, 30)
    torch.manual_seed(2)  # another global generator state: no effect on the draws
    assert drawn_orders(b, 30) == first
    assert len(set(first)) > 4  # still a draw over the orders, not one of them
    assert set(first) <= set(range(a.layout.num_orders))
    assert drawn_orders(small_model(seed=4), 30) != first  # the seed picks the sequence


def test_a_draw_leaves_the_global_generator_untouched():
    model = small_model()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    drawn_orders(model, 3)
    assert torch.equal(torch.get_rng_state(), state)


def test_draws_over_many_steps_are_uniform_over_the_orders():
    model = small_model()
    counts = torch.bincount(torch.tensor(drawn_orders(model, 1600)), minlength=model.layout.num_orders)
    assert counts.shape == (16,) and counts.min() > 60 and counts.max() < 140  # 100 expected each


def test_a_model_loaded_from_a_state_dict_after_n_steps_continues_with_the_uninterrupted_orders(tmp_path):
    uninterrupted = small_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for _ in range(7):
            uninterrupted.train().loss(x)  # 7 training steps, each drawing its order
        uninterrupted.eval().loss(x)  # eval draws nothing
    assert int(uninterrupted.layout.draws) == 7
    torch.save(uninterrupted.state_dict(), tmp_path / "state.pt")
    after = drawn_orders(uninterrupted, 5)  # steps 8..12

    resumed = small_model()
    drawn_orders(resumed, 2)  # a fresh model's own count is replaced by the checkpoint's
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert drawn_orders(resumed, 5) == after
    assert int(resumed.layout.draws) == 12


def test_a_state_without_the_draw_count_still_loads_strictly():
    model = small_model()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("layout.draws")}
    assert len(state) == len(model.state_dict()) - 1
    fresh = small_model()
    fresh.load_state_dict(state, strict=True)  # a checkpoint or export from before the count
    assert drawn_orders(fresh, 3) == drawn_orders(small_model(), 3)


def test_raster_and_random_models_have_no_draw_count_and_draw_nothing():
    for order in ("raster", "random"):
        model = small_model(order, seed=5)
        assert not any(k.endswith("draws") for k in model.state_dict())
        assert drawn_orders(model, 3) == [0, 0, 0]


@pytest.fixture
def one_process_group():
    from benchmarks.mfu import end_process_group, single_process_group

    single_process_group(torch.device("cpu"))
    yield
    end_process_group()


@pytest.mark.slow  # two real DeepSpeed engines in one process (~10 s each to build)
def test_a_resumed_deepspeed_run_draws_the_orders_of_the_uninterrupted_run(one_process_group, tmp_path):
    from pipelines.pretrain import trainer
    from pipelines.pretrain.plan import RunPlan
    from xtra_core.config import build_config

    cfg = build_config("tiny", None, {
        "model.image_size": 16, "model.patch_size": 4, "model.block_size": 1,  # 16 blocks
        "model.encoder_width": 32, "model.encoder_depth": 1, "model.encoder_heads": 2,
        "model.projection_hidden": 64, "model.decoder_width": 32, "model.decoder_depth": 1,
        "model.decoder_heads": 2, "model.head_hidden": 64, "model.block_order": "pseudo_random",
        "train.num_workers": 1, "train.global_batch_size": 8, "train.micro_batch_size": 4,
        "train.zero_stage": 2, "train.log_every": 3, "train.checkpoint_every": 3,
        "train.warmup_steps": 1, "train.max_steps": 6,
    })
    g = torch.Generator().manual_seed(0)
    micro_batches = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(12)]  # 2 per step
    saved = tmp_path / "step3"

    def keep_step_3(metrics, checkpoint_dir):
        if checkpoint_dir and metrics["step"] == 3:
            shutil.copytree(checkpoint_dir, saved)

    def run(start: int, checkpoint: Path | None) -> tuple[list[int], list[float]]:
        plan = RunPlan(total_steps=6, steps_per_epoch=6, rows_per_epoch=48, start_step=start, stop_step=6)
        engine, scheduler = trainer.build_engine(cfg, plan)
        step = trainer.resume(engine, str(checkpoint) if checkpoint else None, plan)
        orders, losses = [], []

        def record(module, _inputs, loss):
            orders.append(int(module.layout.current))
            losses.append(float(loss.detach()))

        engine.module.register_forward_hook(record)
        torch.manual_seed(123 + start)  # the global generator differs between the two runs
        batches = trainer.skip(micro_batches, 2 * step)
        assert trainer.fit(engine, scheduler, batches, cfg, plan, step, keep_step_3) == 6
        return orders, losses

    orders, losses = run(0, None)
    assert len(orders) == 12 and len(set(orders)) > 1
    resumed_orders, resumed_losses = run(3, saved)
    assert resumed_orders == orders[6:]  # micro steps 7..12: the same orders
    assert resumed_losses == pytest.approx(losses[6:], rel=1e-5)  # and so the same objective
