"""The probe's three splits: train and test listed (`pipelines.data.listing`), fully labelled with
the same classes, `probe.max_train_images` a seeded subsample of train, `probe.val_fraction` of it
carved out (seeded) as val, `probe.max_test_images` a seeded subsample of test. The test split
is read once per draw, by the head chosen on val. `probe.draws` > 1 draws the train subsample and
its val split again (seeded) for each draw; the probe reports the mean over the draws."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np

from pipelines.data.listing import Listing, list_split
from pipelines.errors import UserError
from xtra_core.config import ModelConfig, XTRAConfig


@dataclass
class ProbeSplits:
    """Listings of the three splits (val carved out of train) and the class count."""

    train: Listing
    val: Listing
    test: Listing
    num_classes: int


def _subset(listing: Listing, rows: np.ndarray) -> Listing:
    return dataclasses.replace(listing, table=listing.table.take(rows))


def _labels(listing: Listing) -> np.ndarray:
    return listing.table.column("label").to_numpy()


def check_labels(train: Listing, test: Listing) -> int:
    """Both splits fully labelled with the same classes; returns the number of classes."""
    for split, listing in (("train", train), ("test", test)):
        missing = int((_labels(listing) < 0).sum())
        if missing:
            raise UserError(
                f"{listing.uri}: {missing} of {len(listing)} {split} images have no label; probing "
                "needs labelled data: <split>/<class>/<image> folders or a manifest with a 'label' "
                "column"
            )
    tr, te = set(np.unique(_labels(train)).tolist()), set(np.unique(_labels(test)).tolist())
    if tr != te:
        names = train.classes or test.classes

        def show(labels: set[int]) -> list[str]:
            return [names[i] if i < len(names) else str(i) for i in sorted(labels)][:10]

        raise UserError(
            f"class mismatch: train ({train.uri}) has {len(tr)} classes, test ({test.uri}) has "
            f"{len(te)}; only in train: {show(tr - te)}, only in test: {show(te - tr)}"
        )
    if len(tr) < 2:
        raise UserError(f"{train.uri}: a probe needs at least 2 classes, found {len(tr)}")
    return max(len(train.classes), max(tr) + 1)


def split_listings(cfg: XTRAConfig) -> ProbeSplits:
    """List train and test, check labels, subsample train (seeded) and carve out val (seeded)."""
    return split_draws(cfg)[0]


def split_draws(cfg: XTRAConfig) -> list[ProbeSplits]:
    """`probe.draws` seeded draws of the train subsample and its val split, over one listing of
    train and test (the same test subsample for every draw). Draw 0 is `split_listings`'."""
    p = cfg.probe
    train = list_split(cfg.data, cfg.data.train_split)
    test = list_split(cfg.data, cfg.data.test_split)
    num_classes = check_labels(train, test)
    if p.max_test_images is not None and p.max_test_images < len(test):
        rng = np.random.default_rng([p.seed, 3])
        test = _subset(test, np.sort(rng.choice(len(test), size=p.max_test_images, replace=False)))
    out, n = [], len(train)
    for draw in range(p.draws):
        key = [] if draw == 0 else [draw]  # draw 0 keeps the seeds of a single-draw probe
        rows = np.arange(n)
        if p.max_train_images is not None and p.max_train_images < n:
            rng = np.random.default_rng([p.seed, 1, *key])
            rows = np.sort(rng.choice(n, size=p.max_train_images, replace=False))
        if len(rows) < 3:
            raise UserError(f"{train.uri}: {len(rows)} train image(s): too few to carve out a val split")
        perm = np.random.default_rng([p.seed, 2, *key]).permutation(len(rows))
        n_val = min(len(rows) - 2, max(1, round(p.val_fraction * len(rows))))  # >= 2 left for BatchNorm
        val_rows, train_rows = np.sort(rows[perm[:n_val]]), np.sort(rows[perm[n_val:]])
        out.append(ProbeSplits(_subset(train, train_rows), _subset(train, val_rows), test, num_classes))
    return out


def probe_data_config(cfg: XTRAConfig, model_cfg: ModelConfig) -> XTRAConfig:
    """The config the probe reads data with: the probed encoder's model section."""
    out = copy.deepcopy(cfg)
    out.model = copy.deepcopy(model_cfg)
    return out
