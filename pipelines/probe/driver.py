"""`xtra probe`: linear and attentive probes on a frozen XTRA encoder, scores into MLflow.

    xtra probe --model models:/xtra-encoder/3 --data s3://bucket/cifar10 --kind both
    ray job submit -- python -m pipelines.cli probe --model models:/xtra-encoder@champion --data ...

What happens (Table 2 of the paper, scaled by the `probe` config section):

1. The encoder comes from the registry (`models:/name/version`, `models:/name@alias`) or a local
   export directory; `--random-init` probes a freshly initialised encoder of the same ModelConfig
   (seeded by `probe.seed`), the baseline every pretrained score is read against. The encoder is
   frozen (eval mode, `requires_grad=False`, features under `no_grad`); every Tune trial checks that
   its weights' checksum is unchanged at the end.
2. The labelled train and test splits are listed (`pipelines.data.listing`); unlabelled images and a
   class mismatch between the splits are errors. `probe.max_train_images` takes a seeded subsample of
   train, then `probe.val_fraction` of it is carved out (seeded) as the validation split. The test
   split is used once, by the probe of the best validation learning rate.
3. Linear probe, on cached features. The frozen encoder is run once over train/val/test (resize +
   centre crop) with Ray Data batch inference (`map_batches` on an actor pool holding the encoder),
   keeping the token mean of the last block, [n, D]. Every learning rate then trains a
   BatchNorm + Linear head on those arrays. One encoder pass instead of (learning rates x epochs)
   passes makes the grid search cheap; the probe of a frozen trunk on fixed views is logistic
   regression on fixed features, as iGPT's linear probe and the reference figure in DESIGN.md.
4. Attentive probe, on augmented images. The Table 2 recipe (RandomResizedCrop `probe.crop_scale` +
   flip) needs a fresh view per epoch, so each trial streams augmented images
   (`pipelines.data.build_dataset`) through the frozen encoder (mean of the last
   `probe.attentive_last_n` blocks, [B, N, D]) and trains the attention-pooling head.
5. Ray Tune runs one trial per learning rate (`tune.grid_search(probe.lrs)`); each trial reports
   val top-1/top-5 per epoch and checkpoints its head at the end. The best val top-1 (ties: lower val
   loss, then smaller LR) is evaluated on the test split.
6. Output: one JSON line per kind on stdout (`kind`, `top1`, `top5`, `best_lr`, ...). Scores are
   logged as metrics `probe/<kind>/top1|top5|best_lr|val_top1` on the pretraining run of the model
   version (or a new run tagged with the model it probes) and set as tags on the registered model
   version. Random-init scores use the prefix `probe_random/`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.data.images import normalize
from pipelines.data.listing import Listing, list_split
from pipelines.errors import UserError
from xtra_core.config import ModelConfig, XTRAConfig
from xtra_core.model import Encoder, build_model
from xtra_core.probes import ProbeTrainer, build_probe, evaluate

logger = logging.getLogger("xtra.probe")

FEATURES_PER_KIND = {"linear": "cached", "attentive": "augmented"}


# --------------------------------------------------------------------------- the frozen encoder


def freeze(encoder: Encoder) -> Encoder:
    """Eval mode (no stochastic depth) and no gradients: the trunk of a probe."""
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


def state_checksum(module: torch.nn.Module) -> str:
    """blake2b over every parameter and buffer (name, dtype, bytes): equal iff bit-identical."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode_images(
    encoder: Encoder,
    images: torch.Tensor,
    last_n: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """uint8 images [B, H, W, 3] -> frozen features [B, N, D] (mean of the last `last_n` blocks)."""
    device = next(encoder.parameters()).device
    with torch.no_grad():
        x = normalize(images.to(device), mean, std)  # [B, 3, H, W]
        return encoder(x, last_n=last_n)


def random_encoder(model_cfg: ModelConfig, seed: int) -> Encoder:
    """A freshly initialised encoder (XTRA's own init) of `model_cfg`, the same for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(copy.deepcopy(model_cfg)).encoder


def load_frozen_encoder(
    cfg: XTRAConfig, model_ref: str | None, random_init: bool
) -> tuple[Encoder, ModelConfig, dict[str, Any]]:
    """(frozen encoder, its ModelConfig, info) for `--model` / `--random-init`.

    info: the registry's name/version/run_id for registry URIs, `source`, and `random_init`."""
    from pipelines.tracking.registry import load_encoder_with_info

    if model_ref:
        encoder, model_cfg, info = load_encoder_with_info(model_ref)
    elif random_init:
        encoder, model_cfg, info = None, copy.deepcopy(cfg.model), {"source": "config"}
    else:
        raise UserError(
            "xtra probe needs --model (models:/name/version, models:/name@alias or an export "
            "directory), or --random-init to probe a random encoder of the config's model"
        )
    if random_init:
        encoder = random_encoder(model_cfg, cfg.probe.seed)
    info = {**info, "random_init": random_init}
    return freeze(encoder), model_cfg, info


# --------------------------------------------------------------------------- the splits


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
    p = cfg.probe
    train = list_split(cfg.data, cfg.data.train_split)
    test = list_split(cfg.data, cfg.data.test_split)
    num_classes = check_labels(train, test)
    n = len(train)
    rows = np.arange(n)
    if p.max_train_images is not None and p.max_train_images < n:
        rng = np.random.default_rng([p.seed, 1])
        rows = np.sort(rng.choice(n, size=p.max_train_images, replace=False))
    if len(rows) < 3:
        raise UserError(f"{train.uri}: {len(rows)} train image(s): too few to carve out a val split")
    perm = np.random.default_rng([p.seed, 2]).permutation(len(rows))
    n_val = min(len(rows) - 2, max(1, round(p.val_fraction * len(rows))))  # >= 2 left for BatchNorm
    val_rows, train_rows = np.sort(rows[perm[:n_val]]), np.sort(rows[perm[n_val:]])
    return ProbeSplits(_subset(train, train_rows), _subset(train, val_rows), test, num_classes)


def probe_data_config(cfg: XTRAConfig, model_cfg: ModelConfig) -> XTRAConfig:
    """The config the data pipeline sees: the encoder's image size, the probe's crop scale/seed."""
    out = copy.deepcopy(cfg)
    out.model = copy.deepcopy(model_cfg)
    out.data.crop_scale = tuple(cfg.probe.crop_scale)
    out.data.seed = cfg.probe.seed
    return out


# --------------------------------------------------------------------------- batch inference


class EncoderInference:
    """Ray Data actor: the frozen encoder (optionally with a trained probe head) over batches.

    In: `image` uint8 [B, H, W, 3], `label` [B], `path` [B]. Out: `features` float32 [B, D] (the
    token mean of the last block) or, with `head`, `logits` float32 [B, C]; `label` and `path`
    pass through. Object refs arrive wrapped in a list so Ray does not resolve them early.
    """

    def __init__(
        self,
        encoder_ref: list[Any],
        model_cfg: ModelConfig,
        mean: Sequence[float],
        std: Sequence[float],
        last_n: int,
        head_ref: list[Any] | None = None,
        use_gpu: bool = False,
    ) -> None:
        import ray

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.encoder = Encoder(model_cfg)
        self.encoder.load_state_dict(ray.get(encoder_ref[0]))
        freeze(self.encoder.to(self.device))
        self.mean, self.std, self.last_n = tuple(mean), tuple(std), last_n
        self.head = None
        if head_ref is not None:
            self.head = _head_from_state(ray.get(head_ref[0])).to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feats = encode_images(
            self.encoder, torch.as_tensor(batch["image"]), self.last_n, self.mean, self.std
        )  # [B, N, D]
        out = {"label": batch["label"], "path": batch["path"]}
        if self.head is None:
            out["features"] = feats.mean(1).float().cpu().numpy()  # [B, D]
        else:
            with torch.no_grad():
                out["logits"] = self.head(feats).float().cpu().numpy()  # [B, C]
        return out


def _head_from_state(state: dict[str, Any]) -> torch.nn.Module:
    head = build_probe(state["kind"], state["dim"], state["num_classes"], state.get("heads"))
    head.load_state_dict(state["weights"])
    return head


def _inference(
    cfg: XTRAConfig,
    listings: Sequence[Listing],
    encoder_ref: Any,
    last_n: int,
    head_ref: Any | None = None,
) -> dict[str, np.ndarray]:
    """Run `EncoderInference` over the concatenated listings (eval transform) on an actor pool.

    -> {"path": [n] object, "label": [n], "features" [n, D] or "logits" [n, C]}, rows in any order
    (bad files dropped)."""
    import pyarrow as pa
    import ray

    from pipelines.data.stream import build_dataset

    base = listings[0]
    both = dataclasses.replace(base, table=pa.concat_tables([lst.table for lst in listings]))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ds = build_dataset(cfg.data, cfg.model.image_size, "probe", 0, train=False, listing=both,
                       with_paths=True)
    ds = ds.map_batches(
        EncoderInference,
        fn_constructor_kwargs={
            "encoder_ref": [encoder_ref],
            "model_cfg": cfg.model,
            "mean": cfg.data.mean,
            "std": cfg.data.std,
            "last_n": last_n,
            "head_ref": None if head_ref is None else [head_ref],
            "use_gpu": cfg.train.use_gpu,
        },
        batch_size=cfg.probe.batch_size,
        batch_format="numpy",
        concurrency=(1, max(1, cpus // 2)),
        num_cpus=1,
        num_gpus=1 if cfg.train.use_gpu else 0,
    )
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        raise UserError(f"{base.uri}: no image could be decoded")
    return {k: np.concatenate(v) for k, v in parts.items()}


def _rows_for(listing: Listing, out: dict[str, np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Pick `listing`'s rows (listing order, bad files skipped) out of an inference result."""
    from pipelines.data.storage import uri_of

    index = {p: i for i, p in enumerate(out["path"].tolist())}
    paths = [uri_of(listing.filesystem, p) for p in listing.table.column("path").to_pylist()]
    rows = np.array([index[p] for p in paths if p in index], dtype=np.int64)
    return out[key][rows], out["label"][rows].astype(np.int64)


def extract_features(
    cfg: XTRAConfig, splits: ProbeSplits, encoder_ref: Any
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One batch-inference pass: {"train"|"val"|"test": (features [n, D] float32, labels [n])}."""
    listings = {"train": splits.train, "val": splits.val, "test": splits.test}
    out = _inference(cfg, list(listings.values()), encoder_ref, last_n=1)
    return {name: _rows_for(lst, out, "features") for name, lst in listings.items()}


# --------------------------------------------------------------------------- Tune trials


@dataclass
class TrialSetup:
    """What every trial of one probe kind shares (sent once through the object store)."""

    kind: str
    cfg: XTRAConfig  # the probe-data config (encoder's model section)
    num_classes: int
    encoder_state: dict[str, torch.Tensor] | None  # attentive: the trunk
    encoder_checksum: str | None
    features: dict[str, tuple[np.ndarray, np.ndarray]] | None  # linear: cached train/val
    splits: ProbeSplits | None  # attentive: train/val listings


def _probe_heads(cfg: XTRAConfig) -> int:
    return cfg.probe.attentive_heads or cfg.model.encoder_heads


def _new_head(setup: TrialSetup) -> torch.nn.Module:
    torch.manual_seed(setup.cfg.probe.seed)
    return build_probe(
        setup.kind, setup.cfg.model.encoder_width, setup.num_classes, _probe_heads(setup.cfg)
    )


def _head_state(setup: TrialSetup, head: torch.nn.Module) -> dict[str, Any]:
    return {
        "kind": setup.kind,
        "dim": setup.cfg.model.encoder_width,
        "num_classes": setup.num_classes,
        "heads": _probe_heads(setup.cfg),
        "weights": {k: v.detach().cpu() for k, v in head.state_dict().items()},
    }


def _report(setup: TrialSetup, head: torch.nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
    from ray import tune

    if epoch < setup.cfg.probe.epochs - 1:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(_head_state(setup, head), Path(d) / "head.pt")
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _val_metrics(val: dict[str, float]) -> dict[str, float]:
    return {f"val_{k}": v for k, v in val.items() if k != "n"}


def linear_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One LR of the linear probe on cached features [n, D]; reports val metrics every epoch."""
    p = setup.cfg.probe
    x_train, y_train = (torch.as_tensor(a) for a in setup.features["train"])
    x_val, y_val = (torch.as_tensor(a) for a in setup.features["val"])
    head = _new_head(setup)
    g = torch.Generator().manual_seed(p.seed)

    def batches() -> list[torch.Tensor]:
        out = list(torch.randperm(len(y_train), generator=g).split(p.batch_size))
        if len(out) > 1 and len(out[-1]) < 2:  # BatchNorm needs 2 samples: fold into the previous
            out[-2] = torch.cat([out[-2], out.pop()])
        return out

    steps_per_epoch = len(batches())
    trainer = ProbeTrainer(head, p, config["lr"], p.epochs * steps_per_epoch)
    for epoch in range(p.epochs):
        losses = [trainer.step(x_train[i], y_train[i]) for i in batches()]
        val = evaluate(head, _chunks(x_val, y_val, p.batch_size), setup.num_classes)
        _report(setup, head, epoch, {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                                     **_val_metrics(val)})


def _chunks(x: torch.Tensor, y: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(y), size):
        yield x[i : i + size], y[i : i + size]


def attentive_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One LR of the attentive probe: augmented images streamed through the frozen encoder."""
    from pipelines.data.stream import build_dataset

    p, cfg = setup.cfg.probe, setup.cfg
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    encoder = Encoder(cfg.model)
    encoder.load_state_dict(setup.encoder_state)
    freeze(encoder.to(device))
    head = _new_head(setup).to(device)
    steps_per_epoch = max(1, math.ceil(len(setup.splits.train) / p.batch_size))
    trainer = ProbeTrainer(head, p, config["lr"], p.epochs * steps_per_epoch)
    mean, std, last_n = cfg.data.mean, cfg.data.std, p.attentive_last_n

    def feature_batches(listing: Listing, epoch: int, train: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = build_dataset(cfg.data, cfg.model.image_size, "probe", epoch, train=train, listing=listing)
        for b in ds.iter_torch_batches(batch_size=p.batch_size, device="cpu"):
            feats = encode_images(encoder, b["image"], last_n, mean, std)  # [B, N, D]
            yield feats, b["label"].to(device)

    for epoch in range(p.epochs):
        losses = [trainer.step(f, y) for f, y in feature_batches(setup.splits.train, epoch, True)]
        val = evaluate(head, feature_batches(setup.splits.val, 0, False), setup.num_classes)
        metrics = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **_val_metrics(val)}
        if epoch == p.epochs - 1 and state_checksum(encoder.cpu()) != setup.encoder_checksum:
            raise RuntimeError("the frozen encoder's weights changed during probe training")
        _report(setup, head, epoch, metrics)


def _nan_low(v: Any) -> float:
    v = float(v) if v is not None else float("nan")
    return -math.inf if math.isnan(v) else v


def tune_probe(setup: TrialSetup, storage_path: str) -> tuple[dict[str, Any], dict[str, Any], list[dict]]:
    """Grid-search `probe.lrs` with Ray Tune, one trial per LR.

    -> (best trial's last metrics + lr, its head state, [{lr, val_top1, val_loss}] per trial)."""
    import ray
    from ray import tune

    fn = linear_trial if setup.kind == "linear" else attentive_trial
    resources: dict[str, float] = {"cpu": 1}
    if setup.cfg.train.use_gpu and setup.kind == "attentive":
        resources["gpu"] = 1
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # streaming trials leave half the CPUs to the Ray Data decode tasks they start
    concurrent = None if setup.kind == "linear" else max(1, cpus // 2)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(fn, setup=setup), resources),
        param_space={"lr": tune.grid_search(list(setup.cfg.probe.lrs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"probe-{setup.kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=storage_path,
            verbose=0,
        ),
    )
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"{len(grid.errors)} probe trial(s) failed; first error: {grid.errors[0]}")
    trials = []
    for result in grid:
        m = result.metrics or {}
        trials.append({"lr": result.config["lr"], "val_top1": m.get("val_top1"),
                       "val_loss": m.get("val_loss"), "val_top5": m.get("val_top5"),
                       "result": result})
    best = max(trials, key=lambda t: (_nan_low(t["val_top1"]), -_nan_low(t["val_loss"]), -t["lr"]))
    with best["result"].checkpoint.as_directory() as d:
        head_state = torch.load(Path(d) / "head.pt", weights_only=False)
    summary = [{k: t[k] for k in ("lr", "val_top1", "val_loss")} for t in sorted(trials, key=lambda t: t["lr"])]
    return {**best["result"].metrics, "lr": best["lr"]}, head_state, summary


# --------------------------------------------------------------------------- test + logging


def logits_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Top-1 (and top-5 if > 5 classes) of logits [n, C] against labels [n]."""
    probe = torch.nn.Identity()
    return evaluate(probe, [(torch.as_tensor(logits), torch.as_tensor(labels))], num_classes)


def run_probe(
    kind: str,
    cfg: XTRAConfig,
    splits: ProbeSplits,
    encoder: Encoder,
    storage_path: str,
    features: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Tune one probe kind, evaluate its best head on test -> the result record (no logging)."""
    import ray

    checksum = state_checksum(encoder)
    setup = TrialSetup(
        kind=kind,
        cfg=cfg,
        num_classes=splits.num_classes,
        encoder_state=None if kind == "linear" else encoder.state_dict(),
        encoder_checksum=checksum,
        features=None if kind != "linear" else {k: features[k] for k in ("train", "val")},
        splits=None if kind == "linear" else splits,
    )
    best, head_state, by_lr = tune_probe(setup, storage_path)
    head = _head_from_state(head_state)
    if kind == "linear":
        x_test, y_test = features["test"]
        test = evaluate(head, _chunks(torch.as_tensor(x_test), torch.as_tensor(y_test), 4096),
                        splits.num_classes)
    else:
        out = _inference(cfg, [splits.test], ray.put(encoder.state_dict()),
                         last_n=cfg.probe.attentive_last_n, head_ref=ray.put(head_state))
        logits, labels = _rows_for(splits.test, out, "logits")
        test = logits_metrics(logits, labels, splits.num_classes)
    if state_checksum(encoder) != checksum:
        raise RuntimeError("the frozen encoder's weights changed during probing")
    n_train = len(features["train"][1]) if features else len(splits.train)
    n_val = len(features["val"][1]) if features else len(splits.val)
    return {
        "kind": kind,
        "top1": test["top1"],
        "top5": test.get("top5"),
        "best_lr": best["lr"],
        "val_top1": best.get("val_top1"),
        "val_top5": best.get("val_top5"),
        "val_top1_by_lr": {f"{t['lr']:g}": t["val_top1"] for t in by_lr},
        "n_train": n_train,
        "n_val": n_val,
        "n_test": int(test["n"]),
        "num_classes": splits.num_classes,
        "epochs": cfg.probe.epochs,
        "features": FEATURES_PER_KIND[kind],
    }


def log_scores(
    tracking_uri: str, cfg: XTRAConfig, info: dict[str, Any], results: Sequence[dict[str, Any]]
) -> str:
    """Metrics on the pretraining run (or a new run tagged with the model), tags on the model
    version. Returns the run id the metrics went to."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    prefix = "probe_random" if info.get("random_init") else "probe"
    run_id = info.get("run_id")
    if run_id:
        try:
            if client.get_run(run_id).info.lifecycle_stage == "deleted":
                run_id = None
        except MlflowException:
            run_id = None
    new_run = run_id is None
    if new_run:
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.mlflow.experiment)
        tags = {"xtra.probe_of": str(info.get("source")), "xtra.random_init": str(info.get("random_init"))}
        if info.get("run_id"):
            tags["xtra.pretrain_run_id"] = info["run_id"]
        if info.get("name"):
            tags["xtra.model_version"] = f"{info['name']}/{info['version']}"
        run_id = client.create_run(exp_id, run_name=f"{prefix}-{'-'.join(r['kind'] for r in results)}",
                                   tags=tags).info.run_id
    ts = int(time.time() * 1000)
    for r in results:
        for key in ("top1", "top5", "best_lr", "val_top1"):
            if r.get(key) is not None:
                client.log_metric(run_id, f"{prefix}/{r['kind']}/{key}", float(r[key]), timestamp=ts)
        if info.get("name") and info.get("version"):
            for key in ("top1", "top5", "best_lr"):
                if r.get(key) is not None:
                    client.set_model_version_tag(info["name"], info["version"],
                                                 f"{prefix}/{r['kind']}/{key}", f"{r[key]:.6g}")
    if new_run:
        client.set_terminated(run_id)
    return run_id


# --------------------------------------------------------------------------- entry points


def tune_storage(cfg: XTRAConfig) -> str:
    """Where Tune keeps trial results and probe-head checkpoints: `train.storage_path` (a shared
    directory or s3:// on a multi-node cluster), else ~/xtra_runs."""
    path = cfg.train.storage_path or "~/xtra_runs"
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def probe(
    cfg: XTRAConfig, model_ref: str | None, kinds: Sequence[str], random_init: bool = False
) -> list[dict[str, Any]]:
    """The whole job: load, split, probe each kind, log. Returns one result record per kind."""
    import mlflow
    import ray
    from ray.data import DataContext

    from pipelines.tracking.registry import check_tracking, tracking_uri

    uri = tracking_uri(cfg)
    check_tracking(uri)
    mlflow.set_tracking_uri(uri)
    encoder, model_cfg, info = load_frozen_encoder(cfg, model_ref, random_init)
    pcfg = probe_data_config(cfg, model_cfg)
    if "attentive" in kinds and not 1 <= pcfg.probe.attentive_last_n <= len(encoder.blocks):
        raise UserError(f"probe.attentive_last_n={pcfg.probe.attentive_last_n} must be in "
                        f"1..{len(encoder.blocks)} (the encoder's depth)")
    if "attentive" in kinds and model_cfg.encoder_width % _probe_heads(pcfg):
        raise UserError(f"probe.attentive_heads={_probe_heads(pcfg)} does not divide the encoder "
                        f"width {model_cfg.encoder_width}")
    splits = split_listings(pcfg)
    if not ray.is_initialized():
        ray.init()
    DataContext.get_current().enable_progress_bars = False
    storage = tune_storage(cfg)
    logger.info("probing %s (random_init=%s): %d train, %d val, %d test images, %d classes",
                info.get("source"), random_init, len(splits.train), len(splits.val),
                len(splits.test), splits.num_classes)
    features = None
    if "linear" in kinds:
        t0 = time.perf_counter()
        features = extract_features(pcfg, splits, ray.put(encoder.state_dict()))
        logger.info("linear: cached features of %d images in %.1f s",
                    sum(len(v[1]) for v in features.values()), time.perf_counter() - t0)
    results = []
    for kind in kinds:
        t0 = time.perf_counter()
        r = run_probe(kind, pcfg, splits, encoder, storage, features if kind == "linear" else None)
        logger.info("%s: best lr %g, val top-1 %.4f, test top-1 %.4f (%.1f s)", kind, r["best_lr"],
                    r["val_top1"], r["top1"], time.perf_counter() - t0)
        r.update(random_init=random_init, model=info.get("source"))
        results.append(r)
    run_id = log_scores(uri, cfg, info, results)
    for r in results:
        r["mlflow_run_id"] = run_id
    return results
