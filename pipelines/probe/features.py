"""Cached features: the frozen encoder runs once over the eval views of train/val/test with Ray
Data batch inference (`map_batches` on an actor pool holding the encoder), keeping the token mean
of the last block, [n, D], for the linear probe. When the attentive probe reads the same eval views
(`probe.attentive_features="cached"`), the same pass also keeps its tokens (the mean of the last
`probe.attentive_last_n` blocks, [n, N, D]): one feature pass for both probes."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipelines.console import PROGRESS_EVERY_S, format_seconds
from pipelines.data.listing import Listing
from pipelines.errors import UserError
from pipelines.probe.loading import encode_pooled_and_tokens, freeze
from pipelines.probe.splits import ProbeSplits
from pipelines.probe.views import center_crop, eval_stream
from xtra_core.config import ModelConfig, XTRAConfig
from xtra_core.model import Encoder
from xtra_core.precision import local_precision

logger = logging.getLogger("xtra.probe")


class EncoderInference:
    """Ray Data actor: the frozen encoder over batches of eval views.

    In: `image` uint8 [B, R, R, 3] (centre-cropped here to the image size), `label` [B], `path`
    [B]. Out: `features` float32 [B, D] (the token mean of the last block), with `tokens_last_n`
    also `tokens` float32 [B, N, D] (the mean of the last `tokens_last_n` blocks); `label` and
    `path` pass through. The encoder runs in `train.bf16`'s precision on this actor's hardware.
    The encoder's object ref arrives wrapped in a list so Ray does not resolve it early."""

    def __init__(
        self,
        encoder_ref: list[Any],
        model_cfg: ModelConfig,
        mean: Sequence[float],
        std: Sequence[float],
        tokens_last_n: int = 0,
        use_gpu: bool = False,
        bf16: bool | str = False,
    ) -> None:
        import ray

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.bf16 = local_precision(bf16, use_gpu).bf16  # `train.bf16` on this actor's hardware
        self.encoder = Encoder(model_cfg)
        self.encoder.load_state_dict(ray.get(encoder_ref[0]))
        freeze(self.encoder.to(self.device))
        self.size = model_cfg.image_size
        self.mean, self.std, self.tokens_last_n = tuple(mean), tuple(std), tokens_last_n

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(center_crop(batch["image"], self.size))
        pooled, tokens = encode_pooled_and_tokens(self.encoder, images, self.tokens_last_n,
                                                  self.mean, self.std, self.bf16)
        out = {"label": batch["label"], "path": batch["path"],
               "features": pooled.cpu().numpy()}  # [B, D]
        if tokens is not None:
            out["tokens"] = tokens.cpu().numpy()  # [B, N, D]
        return out


def _inference(
    cfg: XTRAConfig, listings: Sequence[Listing], encoder_ref: Any, tokens_last_n: int = 0
) -> dict[str, np.ndarray]:
    """`EncoderInference` over the concatenated listings on an actor pool.

    -> {"path": [n] object, "label": [n], "features": [n, D] (and "tokens": [n, N, D])}, rows in
    any order (bad files dropped)."""
    import pyarrow as pa
    import ray

    base = listings[0]
    table = pa.concat_tables([lst.table for lst in listings])
    _, first = np.unique(table.column("path").to_numpy(zero_copy_only=False), return_index=True)
    if len(first) < table.num_rows:  # draws that share images: each is encoded once
        table = table.take(np.sort(first))
    both = dataclasses.replace(base, table=table)
    from pipelines.pretrain.resources import cpus_to_grow_to

    cpus = int(cpus_to_grow_to())  # an autoscaling cluster may start at zero CPUs
    ds = eval_stream(cfg, both).map_batches(
        EncoderInference,
        fn_constructor_kwargs={
            "encoder_ref": [encoder_ref],
            "model_cfg": cfg.model,
            "mean": cfg.data.mean,
            "std": cfg.data.std,
            "tokens_last_n": tokens_last_n,
            "use_gpu": cfg.train.use_gpu,
            "bf16": cfg.train.bf16,
        },
        batch_size=min(cfg.probe.batch_size, 1024),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cpus // 2)),
        num_cpus=1,
        num_gpus=1 if cfg.train.use_gpu else 0,
    )
    total = table.num_rows
    parts: dict[str, list[np.ndarray]] = {}
    done, t0, shown = 0, time.perf_counter(), time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
        done += len(batch["label"])
        if time.perf_counter() - shown >= PROGRESS_EVERY_S and done < total:
            shown = time.perf_counter()
            rate = done / (shown - t0)
            logger.info("features: %d/%d images (%.0f img/s, ETA %s)", done, total, rate,
                        format_seconds((total - done) / rate))
    if not parts:
        raise UserError(f"{base.uri}: no image could be decoded")
    return {k: np.concatenate(v) for k, v in parts.items()}


def rows_for(listing: Listing, out: dict[str, np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray]:
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
    return extract_shared_features(cfg, [splits], encoder_ref, 0)[0][0][0]


def extract_shared_features(
    cfg: XTRAConfig, draws: Sequence[ProbeSplits], encoder_ref: Any, tokens_last_n: int
) -> tuple[list[tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, tuple[np.ndarray, np.ndarray]]]], int]:
    """One batch-inference pass over every draw's images, for both probes: (per draw, (linear
    features {split: ([n, D], labels)}, attentive tokens {split: ([n, N, D], labels)}, empty when
    `tokens_last_n` is 0); the number of images encoded)."""
    listings = [lst for s in draws for lst in (s.train, s.val)] + [draws[0].test]
    out = _inference(cfg, listings, encoder_ref, tokens_last_n)
    keys = ("features", "tokens") if tokens_last_n else ("features",)
    test = {key: rows_for(draws[0].test, out, key) for key in keys}  # one copy for every draw
    result = []
    for s in draws:
        picked = {key: {"train": rows_for(s.train, out, key), "val": rows_for(s.val, out, key),
                        "test": test[key]} for key in keys}
        result.append((picked["features"], picked.get("tokens", {})))
    return result, len(out["label"])
