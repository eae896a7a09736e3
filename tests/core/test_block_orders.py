"""model.block_order=pseudo_random: the reference's K prefix-distinct permutations, one drawn per
training step; the objective for each order equals the raster-order reference."""

from __future__ import annotations

import dataclasses

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
