"""The linear probe is a converged convex solve: L-BFGS reaches the optimum scikit-learn's
LogisticRegression (lbfgs, tol 1e-10, an independent solver of the same objective) finds, and on
real features (Fashion-MNIST through a random-init `tiny` encoder) the probe's test top-1 is within
0.5 points of that converged logistic regression's, weight decay chosen on the same val split."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.probe.linear import linear_probe, solve_lbfgs, train_adamw
from pipelines.probe.loading import encode_images, random_encoder
from xtra_core.config import ProbeConfig, preset
from xtra_core.probes import (
    fit_logistic_regression,
    linear_probe_from_solution,
    standardize,
    standardize_stats,
)

sklearn_lm = pytest.importorskip("sklearn.linear_model")
FASHION_MNIST = os.environ.get("XTRA_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def overlapping_classes(n: int, dim: int = 24, classes: int = 5, seed: int = 0):
    """Gaussian classes that overlap (no separable optimum at infinity): x [n, dim], y [n]."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 0.6
    y = torch.randint(0, classes, (n,), generator=g)
    return means[y] + torch.randn(n, dim, generator=g) + 3.0, y


def sklearn_fit(z: np.ndarray, y: np.ndarray, weight_decay: float, tol: float = 1e-10):
    """sklearn minimises C * sum CE + ||W||^2 / 2 = n C (mean CE + ||W||^2 / (2 n C))."""
    return sklearn_lm.LogisticRegression(C=1.0 / (len(y) * weight_decay), tol=tol,
                                         max_iter=10_000).fit(z, y)


@pytest.mark.parametrize("weight_decay", [1e-4, 1e-2])
def test_lbfgs_reaches_the_optimum_of_an_independent_solver(weight_decay: float):
    x, y = overlapping_classes(1500)
    mean, var = standardize_stats(x)
    z = standardize(x, mean, var)
    sol = fit_logistic_regression(z, y, 5, weight_decay)
    ref = sklearn_fit(z.numpy(), y.numpy(), weight_decay)
    assert sol.grad_norm < 1e-5
    np.testing.assert_allclose(sol.weight.numpy(), ref.coef_, atol=2e-3)
    # sklearn's intercept is defined up to a constant shift over classes
    db = sol.bias.numpy() - ref.intercept_
    np.testing.assert_allclose(db - db.mean(), 0.0, atol=2e-3)
    # the probe module built from it reproduces the solver's logits from raw features
    head = linear_probe_from_solution(sol, mean, var)
    with torch.no_grad():
        np.testing.assert_allclose(head(x).numpy(), (z @ sol.weight.T + sol.bias).numpy(), atol=1e-3)


def test_weight_decay_is_chosen_on_val_and_test_is_scored_once():
    x, y = overlapping_classes(1800, seed=1)
    feats = {"train": (x[:1000].numpy(), y[:1000].numpy()), "val": (x[1000:1400].numpy(), y[1000:1400].numpy()),
             "test": (x[1400:].numpy(), y[1400:].numpy())}
    cfg = ProbeConfig(linear_weight_decays=(1e-5, 1e-3, 1e-1, 10.0))
    head, rec = solve_lbfgs(cfg, feats, 5)
    by_wd = rec["val_top1_by_weight_decay"]
    assert set(by_wd) == {"1e-05", "0.001", "0.1", "10"}
    assert by_wd[f"{rec['best_weight_decay']:g}"] == max(by_wd.values()) == rec["val_top1"]
    assert by_wd["10"] < max(by_wd.values())  # a crushing penalty loses on val
    out = linear_probe(cfg, feats, 5)
    assert out["n_test"] == 400 and out["best_weight_decay"] == rec["best_weight_decay"]


def test_adamw_recipe_stays_available_and_learns():
    x, y = overlapping_classes(1500, seed=2)
    feats = {"train": (x[:1000].numpy(), y[:1000].numpy()), "val": (x[1000:].numpy(), y[1000:].numpy())}
    cfg = ProbeConfig(linear_solver="adamw", lrs=(1e-3, 1e-2), epochs=5, batch_size=64)
    head, rec = train_adamw(cfg, feats, 5)
    lb_head, lb = solve_lbfgs(ProbeConfig(), feats, 5)
    assert rec["best_lr"] in (1e-3, 1e-2) and set(rec["val_top1_by_lr"]) == {"0.001", "0.01"}
    assert rec["val_top1"] > 0.5 and rec["val_top1"] <= lb["val_top1"] + 0.03


def test_adamw_recipe_is_the_references_weight_decay_0_on_the_train_views_it_is_given(monkeypatch):
    from pipelines.probe import linear

    grids = []

    class SpyGrid(linear.LRGrid):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            grids.append(self)

    monkeypatch.setattr(linear, "LRGrid", SpyGrid)
    x, y = overlapping_classes(600, seed=3)
    feats = {"train": (x[:400].numpy(), y[:400].numpy()), "val": (x[400:500].numpy(), y[400:500].numpy()),
             "test": (x[500:].numpy(), y[500:].numpy())}
    seen: list[int] = []

    def views(epoch: int):  # stands in for augmented_batches: new draws every epoch
        seen.append(epoch)
        g = torch.Generator().manual_seed(epoch)
        for i in range(0, 400, 64):
            yield x[i : i + 64] + 0.1 * torch.randn(len(x[i : i + 64]), 24, generator=g), y[i : i + 64]

    cfg = ProbeConfig(linear_solver="adamw", lrs=(1e-3, 1e-2), epochs=3, batch_size=64)
    assert cfg.weight_decay == 0.1  # the attentive probe's; the linear probe must not use it
    out = linear_probe(cfg, feats, 5, views)
    assert seen == [0, 1, 2] and out["features"] == "augmented" and out["weight_decay"] == 0.0
    groups = [g for grid in grids for t in grid.trainers for g in t.optimizer.param_groups]
    assert groups and all(g["weight_decay"] == 0.0 for g in groups)
    assert out["val_top1"] > 0.5


def test_linear_views_are_random_resized_crop_and_flip_only():
    from pipelines.probe.linear import linear_view_config

    cfg = preset("vit_b16")
    view = linear_view_config(cfg).probe
    assert (view.rand_augment, view.random_erasing) == ("", 0.0)
    assert (view.crop_scale, view.crop_ratio, view.hflip_prob) == (
        cfg.probe.crop_scale, cfg.probe.crop_ratio, cfg.probe.hflip_prob)
    assert cfg.probe.rand_augment and cfg.probe.random_erasing == 0.25  # the attentive probe's: kept


def test_one_encoder_pass_gives_both_probes_their_features():
    from pipelines.probe.loading import encode_pooled_and_tokens

    cfg = preset("tiny")
    encoder = random_encoder(cfg.model, seed=1).eval()
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    pooled, tokens = encode_pooled_and_tokens(encoder, images, 2, cfg.data.mean, cfg.data.std)
    linear = encode_images(encoder, images, 1, cfg.data.mean, cfg.data.std).mean(1)
    attentive = encode_images(encoder, images, 2, cfg.data.mean, cfg.data.std)
    torch.testing.assert_close(pooled, linear)
    torch.testing.assert_close(tokens, attentive)
    assert encode_pooled_and_tokens(encoder, images, 0, cfg.data.mean, cfg.data.std)[1] is None


def fashion_mnist(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` images of a split, as uint8 RGB [n, 32, 32, 3] (bilinear up from 28 px)."""
    from pipelines.data.commands import read_idx

    stem = {"train": "train", "test": "t10k"}[split]
    images = read_idx(f"{FASHION_MNIST}/{stem}-images-idx3-ubyte.gz")[:n]
    labels = read_idx(f"{FASHION_MNIST}/{stem}-labels-idx1-ubyte.gz")[:n].astype(np.int64)
    rgb = np.stack([np.asarray(Image.fromarray(im).convert("RGB").resize((32, 32), Image.BILINEAR))
                    for im in images])
    return rgb, labels


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(f"{FASHION_MNIST}/t10k-images-idx3-ubyte.gz"),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_linear_probe_matches_converged_logistic_regression_on_fashion_mnist():
    cfg = preset("tiny")
    encoder = random_encoder(cfg.model, seed=0).eval()

    def features(images: np.ndarray) -> np.ndarray:
        out = [encode_images(encoder, torch.as_tensor(images[i : i + 250]), 1, cfg.data.mean,
                             cfg.data.std).mean(1) for i in range(0, len(images), 250)]
        return torch.cat(out).numpy()  # [n, 192]

    x, y = fashion_mnist("train", 2500)
    xt, yt = fashion_mnist("test", 1000)
    f, ft = features(x), features(xt)
    feats = {"train": (f[:2000], y[:2000]), "val": (f[2000:], y[2000:]), "test": (ft, yt)}
    probe_cfg = ProbeConfig(linear_weight_decays=(1e-3, 1e-2, 1e-1))  # sklearn is slow below
    ours = linear_probe(probe_cfg, feats, 10)

    # the independent reference: sklearn on the same standardised features, C chosen on val
    mean, var = standardize_stats(torch.as_tensor(f[:2000]))
    z = {k: standardize(torch.as_tensor(v[0]), mean, var).numpy() for k, v in feats.items()}
    fits = {wd: sklearn_fit(z["train"], y[:2000], wd, tol=1e-7) for wd in probe_cfg.linear_weight_decays}
    best = max(fits, key=lambda wd: (fits[wd].score(z["val"], y[2000:]), wd))
    ref = fits[best].score(z["test"], yt)
    print(f"linear probe top-1 {ours['top1']:.4f} (wd {ours['best_weight_decay']:g}), "
          f"sklearn {ref:.4f} (wd {best:g})")
    assert abs(ours["top1"] - ref) <= 0.005
    assert ours["top1"] > 0.6  # a random tiny encoder's features hold Fashion-MNIST's classes
