"""Probes: heads that learn where the answer is known, attention pooling shapes and masking, a
frozen trunk, Table 2 in the presets, and the `xtra probe` job end to end (Ray Data + a real
MLflow sqlite store)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import cli
from pipelines.config_io import load_config
from pipelines.errors import UserError
from pipelines.probe.driver import (
    check_labels,
    encode_images,
    freeze,
    mean_of_draws,
    random_encoder,
    split_draws,
    split_listings,
    state_checksum,
)
from xtra_core.config import ConfigError, ModelConfig, ProbeConfig, build_config, preset
from xtra_core.export import save_encoder
from xtra_core.probes import (
    AttentiveProbe,
    LinearProbe,
    LRGrid,
    ProbeTrainer,
    build_probe,
    evaluate,
    topk_correct,
)

COLORS = [(230, 30, 30), (30, 200, 40), (40, 40, 230), (230, 220, 30), (30, 210, 220), (220, 40, 210)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine: one thread avoids oversubscription (10-50x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model_cfg() -> ModelConfig:
    """16 px, patch 4 -> 4x4 tokens, 2x2 blocks of 2x2 patches; width 32, depth 3."""
    return ModelConfig(
        image_size=16, patch_size=4, block_size=2, encoder_width=32, encoder_depth=3,
        encoder_heads=2, projection_hidden=64, decoder_width=32, decoder_depth=1,
        decoder_heads=2, head_hidden=64,
    )


def make_color_dataset(root: Path, n_train: int, n_test: int, classes: int = 6) -> Path:
    """`root/{train,test}/<class>/*.png`: noisy 20x20 images of one colour per class (separable)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-25, 26, size=(20, 20, 3))
                img = np.clip(np.array(COLORS[c]) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def clusters(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters: features [n, dim] around class means 4 sigma apart, labels [n]."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 4 / dim**0.5 * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return means[y] + torch.randn(n, dim, generator=g) * 0.5 + 7.0, y  # offset: BN must handle it


def fit(probe: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, epochs: int,
        cfg: ProbeConfig | None = None) -> None:
    cfg = cfg or ProbeConfig()
    steps = epochs * (len(y) // 32)
    trainer = ProbeTrainer(probe, cfg, lr, steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(32):
            if len(idx) > 1:
                trainer.step(x[idx], y[idx])


# --------------------------------------------------------------------------- heads (pure torch)


def test_linear_probe_reaches_high_accuracy_on_separable_features():
    torch.manual_seed(0)
    x, y = clusters(1200, 24, 8, seed=0)
    xt, yt = clusters(400, 24, 8, seed=1)
    probe = LinearProbe(24, 8)
    before = evaluate(probe, [(xt, yt)], 8)["top1"]
    fit(probe, x, y, lr=3e-3, epochs=8)
    after = evaluate(probe, [(xt, yt)], 8)
    assert before < 0.5 and after["top1"] > 0.97 and after["top5"] == 1.0


def test_attentive_probe_finds_the_one_informative_token():
    # class signal in ONE token at a random position; the other 15 tokens are pure noise
    g = torch.Generator().manual_seed(0)
    n, tokens, dim, classes = 1500, 16, 32, 4
    means = torch.randn(classes, dim, generator=g) * 2

    def data(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (m,), generator=g)
        x = torch.randn(m, tokens, dim, generator=g)
        where = torch.randint(0, tokens, (m,), generator=g)
        x[torch.arange(m), where] = means[y] + 5.0 + 0.3 * torch.randn(m, dim, generator=g)
        return x, y

    x, y = data(n)
    xt, yt = data(500)
    torch.manual_seed(0)
    probe = AttentiveProbe(dim, classes, heads=4)
    fit(probe, x, y, lr=3e-3, epochs=10)
    assert evaluate(probe, [(xt, yt)], classes)["top1"] > 0.95


def test_attentive_pooling_shapes():
    probe = AttentiveProbe(48, 7, heads=6)
    x = torch.randn(5, 9, 48)
    assert probe.pool(x).shape == (5, 48)
    assert probe(x).shape == (5, 7)
    assert build_probe("linear", 48, 7)(x).shape == (5, 7)
    assert LinearProbe(48, 7)(x.mean(1)).shape == (5, 7)  # cached, already pooled features
    with pytest.raises(ValueError, match="not divisible"):
        AttentiveProbe(48, 7, heads=5)


def textbook_pool(probe: AttentiveProbe, tokens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """AIM's attention pooling as written: K and V projections of every token, then SDPA."""
    b, n, d = tokens.shape
    x = probe.normalize(tokens, padding)
    h, dh = probe.heads, d // probe.heads
    q = probe.query.expand(b, 1, d).reshape(b, 1, h, dh).transpose(1, 2)
    k = probe.k(x).reshape(b, n, h, dh).transpose(1, 2)
    v = probe.v(x).reshape(b, n, h, dh).transpose(1, 2)
    mask = None if padding is None else ~padding[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, d)


@pytest.mark.parametrize("padded", [False, True])
def test_folded_attentive_pooling_equals_the_textbook_form_with_its_gradients(padded: bool):
    torch.manual_seed(0)
    probe = AttentiveProbe(48, 5, heads=6).double()
    with torch.no_grad():  # an informative query and keys: the trunc-normal init is near uniform
        for w in (probe.query, probe.k.weight, probe.v.weight):
            w.normal_()
    tokens = torch.randn(4, 9, 48, dtype=torch.float64)
    padding = (torch.arange(9)[None, :] >= torch.tensor([9, 5, 2, 7])[:, None]) if padded else None
    grads = []
    for pool in (probe.pool, lambda t, p: textbook_pool(probe, t, p)):
        probe.zero_grad()
        out = pool(tokens, padding)
        (out * torch.linspace(-1, 1, 48, dtype=torch.float64)).sum().backward()
        grads.append((out.detach(), [w.grad.clone() for w in (probe.query, probe.k.weight, probe.v.weight)]))
    (folded, g_folded), (textbook, g_textbook) = grads
    assert torch.allclose(folded, textbook, rtol=1e-10, atol=1e-12)
    assert folded.std() > 0.1  # not a degenerate pooling
    for a, b in zip(g_folded, g_textbook):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12) and b.abs().max() > 1e-3


@pytest.mark.parametrize("train_mode", [False, True])
def test_attentive_padding_keys_do_not_change_the_output(train_mode: bool):
    torch.manual_seed(0)
    probe = AttentiveProbe(16, 3, heads=2)
    probe.train(train_mode)
    # both samples see their own number of real tokens: 5 and 3, padded to 8 with garbage
    real = [torch.randn(5, 16), torch.randn(3, 16)]
    padded = torch.randn(2, 8, 16) * 100
    padding = torch.ones(2, 8, dtype=torch.bool)
    for i, r in enumerate(real):
        padded[i, : len(r)] = r
        padding[i, : len(r)] = False
    out = probe(padded, padding)  # [2, 3]
    if not train_mode:  # eval: BatchNorm uses running stats, each sample stands alone
        for i, r in enumerate(real):
            assert torch.allclose(out[i], probe(r[None])[0], atol=1e-5)
    # changing the padded tokens changes nothing (in training mode: not even the BN statistics)
    garbage = padded.clone()
    garbage[padding] = torch.randn(int(padding.sum()), 16) * 1e3
    assert torch.allclose(probe(garbage, padding), out, atol=1e-5)
    # a real token does change the output
    moved = padded.clone()
    moved[0, 0] += 5.0
    assert not torch.allclose(probe(moved, padding)[0], out[0], atol=1e-4)
    with pytest.raises(ValueError, match="every token"):
        probe(padded, torch.ones(2, 8, dtype=torch.bool))


def test_topk_correct_counts():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 1])
    assert topk_correct(logits, labels, ks=(1, 2, 5)) == {1: 1, 2: 3}  # k=5 > C is skipped
    assert "top5" not in evaluate(torch.nn.Identity(), [(logits, labels)], 3)


def test_cosine_schedule_reaches_min_lr_and_clips_gradients():
    cfg = ProbeConfig(min_lr=1e-5, grad_clip=0.5)
    probe = LinearProbe(4, 2)
    trainer = ProbeTrainer(probe, cfg, 1e-3, total_steps=10)
    assert trainer.lr_at(0) == pytest.approx(1e-3)
    assert trainer.lr_at(10) == pytest.approx(1e-5)
    x, y = torch.randn(8, 4) * 1e4, torch.randint(0, 2, (8,))
    trainer.step(x, y)
    norm = torch.cat([p.grad.flatten() for p in probe.parameters()]).norm()
    assert norm <= 0.5 + 1e-4
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert trainer.optimizer.defaults["betas"] == (0.9, 0.999)


def test_warmup_rises_linearly_from_the_start_lr_then_cosine_decays():
    cfg = ProbeConfig(min_lr=1e-5, warmup_start_lr=1e-4)
    trainer = ProbeTrainer(LinearProbe(4, 2), cfg, 1e-3, total_steps=110, warmup_steps=10)
    lrs = [trainer.lr_at(s) for s in range(111)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[5] == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lrs[10] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[110] == pytest.approx(1e-5)


def test_attentive_probe_has_no_key_value_bias():
    probe = AttentiveProbe(64, 5, heads=16)
    assert probe.k.bias is None and probe.v.bias is None
    assert {n for n, _ in probe.named_parameters()} == {"query", "k.weight", "v.weight",
                                                         "linear.weight", "linear.bias"}


def test_attentive_probe_overfits_a_tiny_labelled_set():
    # 48 samples of pure-noise tokens with random labels: only memorisation reaches 100%
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 16, 64, generator=g)  # [B, N, D]
    y = torch.randint(0, 6, (48,), generator=g)
    torch.manual_seed(0)
    probe = AttentiveProbe(64, 6, heads=16)
    cfg = ProbeConfig(weight_decay=0.0, min_lr=1e-3)
    trainer = ProbeTrainer(probe, cfg, lr=1e-2, total_steps=300, warmup_steps=10)
    before = evaluate(probe, [(x, y)], 6)["top1"]
    for _ in range(300):
        trainer.step(x, y)
    after = evaluate(probe, [(x, y)], 6)
    assert before < 0.5 and after["top1"] == 1.0 and after["loss"] < 0.05


def test_lr_grid_heads_train_exactly_as_if_alone():
    # side-by-side training shares the batches, nothing else: each head equals a solo run
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 9, 32, generator=g), torch.randint(0, 4, (16,), generator=g))
               for _ in range(6)]
    cfg = ProbeConfig()
    grid = LRGrid(lambda: AttentiveProbe(32, 4, heads=4), (1e-3, 3e-2), cfg, 6, 2, seed=5)
    for x, y in batches:
        grid.step(x, y)
    for lr, head in zip(grid.lrs, grid.heads):
        torch.manual_seed(5)
        solo = AttentiveProbe(32, 4, heads=4)
        trainer = ProbeTrainer(solo, cfg, lr, 6, 2)
        for x, y in batches:
            trainer.step(x, y)
        for (name, a), b in zip(head.state_dict().items(), solo.state_dict().values()):
            assert torch.equal(a, b), (lr, name)
    assert not torch.equal(grid.heads[0].k.weight, grid.heads[1].k.weight)
    records = grid.evaluate(batches, 4)
    assert [r["top1"] for r in records] == [evaluate(h, batches, 4)["top1"] for h in grid.heads]


@pytest.mark.parametrize("name,image,resize", [("vit_b16", 256, 300), ("vit_h14", 224, 256)])
def test_presets_carry_table_2_attentive_probe_settings(name: str, image: int, resize: int):
    cfg = preset(name)
    p = cfg.probe
    assert p.lrs == (1e-4, 3e-4, 5e-4, 1e-3, 1.5e-3, 2e-3, 4e-3, 8e-3)  # [1..80] x 1e-4
    assert (p.min_lr, p.weight_decay, p.betas, p.grad_clip) == (1e-5, 0.1, (0.9, 0.999), 3.0)
    assert (p.epochs, p.batch_size, p.warmup_epochs) == (100, 4096, 10.0)  # IN-1k column
    assert p.crop_scale == (0.08, 1.0) and p.crop_ratio == pytest.approx((0.75, 1.333), abs=1e-3)
    assert (p.hflip_prob, p.rand_augment, p.random_erasing) == (0.5, "rand-m9-mstd0.5-inc1", 0.25)
    assert (p.attentive_heads, p.attentive_last_n) == (16, 6)
    assert p.attentive_features == "augmented" and p.linear_solver == "lbfgs"
    assert (cfg.model.image_size, p.eval_resize) == (image, resize)  # resize, then centre crop
    if name == "vit_h14":
        assert cfg.model.head_hidden == 9408


def test_tiny_probe_defaults_are_the_small_data_recipe_and_table_2_stays_in_the_big_presets():
    p = preset("tiny").probe
    assert (p.attentive_features, p.epochs, p.warmup_epochs, p.lrs) == ("cached", 40, 4.0,
                                                                        (1e-2, 3e-2))
    assert p.attentive_last_n == 2 and p.linear_solver == "lbfgs"
    assert preset("vit_b16").probe.epochs == preset("vit_h14").probe.epochs == 100


def test_frozen_encoder_is_bit_identical_after_probe_training():
    encoder = freeze(random_encoder(small_model_cfg(), seed=0))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    checksum = state_checksum(encoder)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    probe = AttentiveProbe(32, 3, heads=2)
    trainer = ProbeTrainer(probe, ProbeConfig(), lr=1.0, total_steps=5)  # a huge LR
    images = torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8)
    for _ in range(5):
        feats = encode_images(encoder, images, 2, (0.5,) * 3, (0.25,) * 3)  # [6, 16, 32]
        assert feats.shape == (6, 16, 32) and not feats.requires_grad
        trainer.step(feats, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert all(p.grad is None for p in encoder.parameters())
    assert state_checksum(encoder) == checksum
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_random_init_encoder_is_seeded():
    a, b = random_encoder(small_model_cfg(), 3), random_encoder(small_model_cfg(), 3)
    assert state_checksum(a) == state_checksum(b)
    assert state_checksum(random_encoder(small_model_cfg(), 4)) != state_checksum(a)


# --------------------------------------------------------------------------- splits and bad data


def data_cfg(uri: Path, **probe):
    return build_config("tiny", None, {"data.uri": str(uri), **{f"probe.{k}": v for k, v in probe.items()}})


def test_val_split_is_seeded_carved_from_train_and_never_test(tmp_path):
    root = make_color_dataset(tmp_path / "d", n_train=10, n_test=2, classes=3)
    cfg = data_cfg(root, max_train_images=20, val_fraction=0.25)
    s = split_listings(cfg)
    train = set(s.train.table.column("path").to_pylist())
    val = set(s.val.table.column("path").to_pylist())
    test = set(s.test.table.column("path").to_pylist())
    assert len(train) == 15 and len(val) == 5 and len(test) == 6 and s.num_classes == 3
    assert not train & val and not (train | val) & test
    assert all("/train/" in p for p in train | val)
    again = split_listings(cfg)
    assert set(again.val.table.column("path").to_pylist()) == val
    other = split_listings(data_cfg(root, max_train_images=20, val_fraction=0.25, seed=1))
    assert set(other.val.table.column("path").to_pylist()) != val


def paths_of(listing) -> set[str]:
    return set(listing.table.column("path").to_pylist())


def test_draws_are_seeded_subsamples_of_train_over_one_test_split_and_draw_0_is_the_single_draw(tmp_path):
    root = make_color_dataset(tmp_path / "d", n_train=10, n_test=4, classes=3)  # 30 train images
    sets = {"max_train_images": 12, "val_fraction": 0.25, "max_test_images": 8}
    single = split_listings(data_cfg(root, **sets))
    draws = split_draws(data_cfg(root, draws=3, **sets))
    assert len(draws) == 3
    assert paths_of(draws[0].train) == paths_of(single.train) and paths_of(draws[0].val) == paths_of(single.val)
    seen = []
    for d in draws:
        train, val = paths_of(d.train), paths_of(d.val)
        assert (len(train), len(val)) == (9, 3) and not train & val
        assert paths_of(d.test) == paths_of(single.test)  # the same 8 test images for every draw
        seen.append(train | val)
    assert len({frozenset(s) for s in seen}) == 3  # three different draws of 12 from 30
    again = split_draws(data_cfg(root, draws=3, **sets))
    assert [paths_of(d.val) for d in again] == [paths_of(d.val) for d in draws]  # seeded
    with pytest.raises(ConfigError, match="probe.draws"):
        data_cfg(root, draws=0)


def test_mean_of_draws_averages_scores_and_keeps_every_draw():
    records = [{"kind": "linear", "solver": "lbfgs", "top1": t, "top5": 0.9, "val_top1": v,
                "val_top5": None, "best_lr": None, "best_weight_decay": w}
               for t, v, w in ((0.60, 0.5, 0.1), (0.66, 0.7, 0.01), (0.63, 0.6, 0.1))]
    r = mean_of_draws(records)
    assert r["top1"] == pytest.approx(0.63) and r["val_top1"] == pytest.approx(0.6)
    assert r["top1_std"] == pytest.approx(0.03) and r["top1_by_draw"] == [0.60, 0.66, 0.63]
    assert r["val_top5"] is None and r["draws"] == 3
    assert r["best_weight_decay"] == 0.1 and r["best_weight_decay_by_draw"] == [0.1, 0.01, 0.1]
    assert mean_of_draws(records[:1]) is records[0]  # one draw: the record as it was


def test_max_test_images_is_a_seeded_subsample_of_test(tmp_path):
    root = make_color_dataset(tmp_path / "d", n_train=4, n_test=5, classes=3)  # 15 test images

    def test_paths(**probe):
        return split_listings(data_cfg(root, **probe)).test.table.column("path").to_pylist()

    full = test_paths()
    few = test_paths(max_test_images=6)
    assert len(full) == 15 and len(few) == 6 and set(few) < set(full)
    assert test_paths(max_test_images=6) == few
    assert test_paths(max_test_images=6, seed=1) != few
    assert test_paths(max_test_images=100) == full
    with pytest.raises(ConfigError, match="probe.max_test_images"):
        load_config("tiny", [f"data.uri={root}", "probe.max_test_images=0"])


def test_dataset_without_labels_is_a_clear_error(tmp_path):
    root = tmp_path / "flat"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(root / split / f"{i}.png")
    with pytest.raises(UserError, match="have no label"):
        split_listings(data_cfg(root))
    manifest = tmp_path / "m"
    manifest.mkdir()
    for split in ("train", "test"):
        (manifest / f"{split}.csv").write_text("path\n" + "\n".join(
            str(root / split / f"{i}.png") for i in range(3)) + "\n")
    with pytest.raises(UserError, match="have no label"):
        split_listings(data_cfg(manifest))


def test_class_mismatch_between_splits_is_a_clear_error(tmp_path):
    root = make_color_dataset(tmp_path / "d", n_train=2, n_test=2, classes=3)
    extra = root / "test" / "zebra"
    extra.mkdir()
    Image.new("RGB", (8, 8)).save(extra / "0.png")
    with pytest.raises(UserError, match=r"class mismatch.*only in test: \['zebra'\]"):
        split_listings(data_cfg(root))
    train, test = split_listings(data_cfg(make_color_dataset(tmp_path / "e", 2, 2, 3))).train, None
    assert check_labels(train, train) == 3 and test is None


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bad_model_references_exit_2_with_one_line(tmp_path, capsys):
    root = make_color_dataset(tmp_path / "d", 2, 2, 3)
    db = f"sqlite:///{tmp_path}/mlflow.db"
    base = ["probe", "--data", str(root), "--set", f"mlflow.tracking_uri={db}"]
    code, out, err = run_cli([*base, "--model", str(tmp_path / "nope")], capsys)
    assert code == 2 and "no such directory" in err and out == ""
    code, _, err = run_cli(base, capsys)
    assert code == 2 and "--random-init" in err
    code, _, err = run_cli([*base, "--model", "models:/no-such-model/1"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("xtra: error:")]
    assert code == 2 and len(errors) == 1 and "not found in the registry" in errors[0]


# --------------------------------------------------------------------------- the job (Ray, MLflow)


@pytest.mark.slow
@pytest.mark.parametrize("features", ["cached", "augmented"])
def test_attentive_probe_on_cached_features_encodes_the_train_images_once(
    tmp_path, ray_cluster, monkeypatch, features
):
    from pipelines.probe import attentive

    root = make_color_dataset(tmp_path / "colors", n_train=8, n_test=2)
    dotted = {f"model.{k}": v for k, v in vars(small_model_cfg()).items()}
    cfg = build_config("tiny", None, {
        **dotted, "data.uri": str(root), "probe.epochs": 3, "probe.lrs": [0.03],
        "probe.batch_size": 12, "probe.val_fraction": 0.25, "probe.attentive_last_n": 2,
        "probe.attentive_features": features,
    })
    splits = split_listings(cfg)
    encoded: list[int] = []
    real = attentive.encode_images

    def counting(encoder, images, *args):
        encoded.append(len(images))
        return real(encoder, images, *args)

    monkeypatch.setattr(attentive, "encode_images", counting)
    encoder = random_encoder(cfg.model, seed=7)
    out = attentive.train_attentive(cfg, splits, {k: v for k, v in encoder.state_dict().items()})
    n_train, n_val, n_test = len(splits.train), len(splits.val), len(splits.test)
    if features == "cached":  # every split's eval views once
        assert sum(encoded) == n_train + n_val + n_test, (features, encoded)
    else:  # fresh views every epoch, val after every epoch, test once
        assert sum(encoded) == 3 * n_train + 3 * n_val + n_test, (features, encoded)
    assert out["features"] == features
    # one colour per class: learnt from the clean views; RandAugment recolours a third of the
    # augmented ones, so 3 epochs there only beat chance (1/6) well
    assert out["top1"] >= (0.9 if features == "cached" else 0.4), out


@pytest.mark.slow
def test_probe_draws_share_one_feature_pass_and_their_mean_lands_in_mlflow(
    tmp_path, ray_cluster, monkeypatch, caplog
):
    import logging

    from mlflow import MlflowClient

    from pipelines.probe import features
    from pipelines.probe.driver import probe

    caplog.set_level(logging.INFO, logger="xtra.probe")
    root = make_color_dataset(tmp_path / "colors", n_train=10, n_test=2)  # 60 train, 12 test
    db = f"sqlite:///{tmp_path}/mlflow.db"
    dotted = {f"model.{k}": v for k, v in vars(small_model_cfg()).items()}
    cfg = build_config("tiny", None, {
        **dotted, "data.uri": str(root), "mlflow.tracking_uri": db, "probe.epochs": 2,
        "probe.lrs": [0.03], "probe.batch_size": 8, "probe.max_train_images": 16,
        "probe.draws": 3, "probe.attentive_last_n": 2, "probe.linear_weight_decays": [0.01],
    })
    passes: list[int] = []
    real = features._inference

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        passes.append(len(out["label"]))
        return out

    monkeypatch.setattr(features, "_inference", counting)
    results = probe(cfg, None, ["linear", "attentive"], random_init=True)
    draws = split_draws(cfg)
    distinct = set().union(*(paths_of(d.train) | paths_of(d.val) for d in draws))
    assert passes == [len(distinct) + 12]  # one pass, every image once, for both kinds and all draws
    assert 16 < len(distinct) <= 48
    for r in results:
        assert r["draws"] == 3 and len(r["top1_by_draw"]) == 3
        assert r["top1"] == pytest.approx(np.mean(r["top1_by_draw"]))
        assert r["top1_std"] == pytest.approx(np.std(r["top1_by_draw"], ddof=1))
        assert (r["n_train"], r["n_val"]) == (14, 2)
    assert f"linear + attentive: cached features of {len(distinct) + 12} images" in caplog.text
    assert "linear: draw 3/3" in caplog.text and "attentive: draw 3/3" in caplog.text
    # the first draw prints its per-step lines, the later ones only their summary line
    assert caplog.text.count("linear: weight decay 1/1") == 1
    run = MlflowClient(db).get_run(results[0]["mlflow_run_id"])
    for r in results:
        assert run.data.metrics[f"probe_random/{r['kind']}/top1"] == pytest.approx(r["top1"])
        assert run.data.metrics[f"probe_random/{r['kind']}/top1_std"] == pytest.approx(r["top1_std"])
        assert run.data.metrics[f"probe_random/{r['kind']}/draws"] == 3


@pytest.mark.slow
def test_probe_job_scores_land_in_mlflow_run_and_registry_tags(tmp_path, capsys, caplog,
                                                               ray_cluster):
    import mlflow
    from mlflow import MlflowClient

    from pipelines.tracking.registry import log_and_register_encoder
    from pipelines.tracking.store import experiment_id

    root = make_color_dataset(tmp_path / "colors", n_train=12, n_test=4)
    db = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(db)
    # created as the product creates it: artifacts next to the store (not ./mlruns in the checkout)
    mlflow.set_experiment(experiment_id=experiment_id(db, "xtra"))
    encoder = random_encoder(small_model_cfg(), seed=7)  # stands in for a pretrained encoder
    export = save_encoder(encoder.state_dict(), small_model_cfg(), tmp_path / "export")
    weights_before = (export / "encoder.safetensors").read_bytes()
    with mlflow.start_run() as run:
        reg = log_and_register_encoder(export, "enc")
    sets = [
        "probe.epochs=3", "probe.lrs=[0.003,0.03]", "probe.batch_size=16", "probe.val_fraction=0.25",
        "probe.attentive_last_n=2", "probe.linear_weight_decays=[0.0001,0.01]",
        "probe.eval_resize=20", f"mlflow.tracking_uri={db}",
    ]
    args = ["probe", "--model", reg["model_uri"], "--data", str(root), "--kind", "both"]
    code, out, err = run_cli([*args, *[a for s in sets for a in ("--set", s)]], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["kind"] for r in lines] == ["linear", "attentive"]
    for r in lines:
        assert 0.0 <= r["top1"] <= 1.0 and 0.0 <= r["top5"] <= 1.0
        assert (r["n_train"], r["n_val"], r["n_test"], r["num_classes"]) == (54, 18, 24, 6)
    linear, attentive = lines
    assert linear["top1"] >= 0.9, linear  # one colour per class: separable even for a random trunk
    # 12 steps on views that RandAugment recolours (Invert, Solarize, Color...) about a third of
    # the time: far above chance (1/6), not always at the linear probe's level
    assert attentive["top1"] >= 0.6, attentive
    assert linear["solver"] == "lbfgs" and linear["best_lr"] is None
    assert linear["best_weight_decay"] in (1e-4, 1e-2)
    assert set(linear["val_top1_by_weight_decay"]) == {"0.0001", "0.01"}
    assert attentive["best_lr"] in (0.003, 0.03)
    assert set(attentive["val_top1_by_lr"]) == {"0.003", "0.03"}
    # progress: every weight decay and every epoch, with the best val score so far
    assert "linear: weight decay 2/2" in caplog.text and "attentive: epoch 3/3: best val top-1" in caplog.text
    assert (export / "encoder.safetensors").read_bytes() == weights_before

    client = MlflowClient(db)
    metrics = client.get_run(run.info.run_id).data.metrics
    mv = client.get_model_version("enc", reg["version"])
    for r in lines:
        assert metrics[f"probe/{r['kind']}/top1"] == pytest.approx(r["top1"])
        assert metrics[f"probe/{r['kind']}/top5"] == pytest.approx(r["top5"])
        assert float(mv.tags[f"probe/{r['kind']}/top1"]) == pytest.approx(r["top1"], abs=1e-5)

    # the random-init baseline lands beside it under its own prefix, overwriting nothing
    code, out, err = run_cli([*args, "--random-init", "--kind", "linear",
                              *[a for s in sets for a in ("--set", s)], "--set", "probe.lrs=[0.03]",
                              "--set", "probe.epochs=2"],
                             capsys)
    assert code == 0, err
    (rand,) = [json.loads(line) for line in out.strip().splitlines()]
    assert rand["random_init"] is True and rand["kind"] == "linear"
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["probe_random/linear/top1"] == pytest.approx(rand["top1"])
    assert metrics["probe/linear/top1"] == pytest.approx(lines[0]["top1"])
    assert "probe_random/linear/top1" in client.get_model_version("enc", reg["version"]).tags
