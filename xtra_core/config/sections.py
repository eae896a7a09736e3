"""The five config sections as dataclasses with defaults (the single source of the keys, types and
defaults), and `XTRAConfig` holding them.

Each section's `validate()` checks its ranges (from `ranges.RANGES`, written once) and the values
that clash; choices are checked here. Pure Python: nothing about YAML, Ray or pydantic.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from xtra_core.config.ranges import ConfigError, check_range


@dataclass
class ModelConfig:
    """The XTRA encoder-decoder. Sizes in pixels for images, in patches for `block_size`."""

    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    block_size: int = 2  # k: a block is k x k patches (k=1 is plain patch-causal AR, i.e. AIM)
    encoder_width: int = 192
    encoder_depth: int = 6
    encoder_heads: int = 3
    mlp_ratio: float = 4.0
    projection_hidden: int = 768  # encoder -> Linear -> GELU -> Linear -> decoder
    decoder_width: int = 192
    decoder_depth: int = 4
    decoder_heads: int = 3
    head_hidden: int = 1536  # hidden width of the shared per-block pixel MLP
    blocks_ahead: int = 1  # n: predict the next n blocks with n separate heads
    loss: str = "l2"  # "l2" (MSE) or "l1"
    # "raster"; "random": one fixed permutation drawn from order_seed (the paper's "fixed random");
    # "pseudo_random": the reference's `aim.pseudo_random`: K permutations with distinct first
    # blocks drawn from order_seed, one of them drawn at every training step (the first in eval)
    block_order: str = "raster"
    order_seed: int = 0
    projection_bias: bool = False  # bias of the projection's last Linear (the reference has none)
    drop_path: float = 0.0  # stochastic depth rate of the last encoder block (linear ramp)
    norm_pix_eps: float = 1e-6
    activation_checkpointing: bool = False  # recompute each transformer block in backward
    compile: bool = False  # torch.compile the model (pipelines apply it)
    # block-causal attention kernel: "sdpa" = scaled_dot_product_attention with the cached dense
    # bool mask; "flex" = FlexAttention with a BlockMask (block-sparse; GPU for training, since
    # torch has no FlexAttention backward on CPU: CPU training falls back to "sdpa")
    attention: str = "sdpa"

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def blocks_per_side(self) -> int:
        return self.grid // self.block_size

    @property
    def num_blocks(self) -> int:
        """K, the number of blocks in an image."""
        return self.blocks_per_side**2

    @property
    def num_patches(self) -> int:
        """N, the number of tokens."""
        return self.grid**2

    @property
    def block_pixels(self) -> int:
        """Values per block target: C * (k*p)^2."""
        return self.in_chans * (self.block_size * self.patch_size) ** 2

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size={self.image_size} is not divisible by "
                f"model.patch_size={self.patch_size}"
            )
        if self.grid % self.block_size:
            raise ConfigError(
                f"the patch grid ({self.grid}x{self.grid} = model.image_size {self.image_size} / "
                f"model.patch_size {self.patch_size}) is not divisible by "
                f"model.block_size={self.block_size}"
            )
        if self.blocks_ahead < 1 or self.blocks_ahead >= self.num_blocks:
            raise ConfigError(
                f"model.blocks_ahead={self.blocks_ahead} must be in 1..{self.num_blocks - 1}: "
                f"the image has only {self.num_blocks} blocks "
                f"({self.blocks_per_side}x{self.blocks_per_side} of model.block_size="
                f"{self.block_size} patches)"
            )
        for w, h, name in (
            (self.encoder_width, self.encoder_heads, "encoder"),
            (self.decoder_width, self.decoder_heads, "decoder"),
        ):
            if w % h:
                raise ConfigError(
                    f"model.{name}_width={w} is not divisible by model.{name}_heads={h}"
                )
        _choice("model.loss", self.loss, ("l2", "l1"))
        _choice("model.block_order", self.block_order, ("raster", "random", "pseudo_random"))
        _choice("model.attention", self.attention, ("sdpa", "flex"))
        _check_ranges("model", self, "drop_path")


@dataclass
class DataConfig:
    """Where images come from and how they are augmented (Table 1)."""

    uri: str = ""  # s3://bucket/prefix or a local directory (or a manifest .csv/.parquet)
    train_split: str = "train"
    test_split: str = "test"
    s3_endpoint: str | None = None  # else AWS_ENDPOINT_URL, else AWS
    s3_region: str | None = None
    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip_prob: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_image_pixels: int = 89_478_485  # decompression-bomb limit (PIL's default)
    max_image_bytes: int = 64 * 2**20  # larger files are bad files, skipped before any download
    min_image_side: int = 2  # narrower images (1x1 tracking pixels, 1-px strips) are bad files
    max_bad_fraction: float = 0.05  # stop when bad files pass this fraction of the images seen
    skip_unreadable_files: bool = False  # a file still unreadable after the retries: skip it
    s3_max_attempts: int = 10  # per S3 read (AWS standard retry, jittered exponential backoff)
    s3_connect_timeout_s: float = 3.0
    s3_request_timeout_s: float = 30.0
    seed: int = 0

    def validate(self) -> None:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"data.crop_scale={list(self.crop_scale)} must be 0 < lo <= hi <= 1")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ConfigError(f"data.crop_ratio={list(self.crop_ratio)} must be 0 < lo <= hi")
        _check_ranges("data", self, "hflip_prob", "std", "min_image_side", "max_image_bytes",
                      "max_bad_fraction", "s3_max_attempts", "s3_connect_timeout_s",
                      "s3_request_timeout_s")


@dataclass
class TrainConfig:
    """Pretraining: optimisation (Table 1), scaling and checkpointing."""

    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs)
    stop_at_step: int | None = None  # end this invocation early (schedule unchanged); resume later
    steps_per_epoch: int | None = None  # needed for streaming sources of unknown size
    global_batch_size: int = 128
    micro_batch_size: int | None = None  # per worker; default global / num_workers
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: sized from the cluster, leaving CPUs to decode
    zero_stage: int = 2
    zero_bucket_size: int = 50_000_000  # elements per ZeRO reduce/allgather bucket
    # "auto": bf16 where the hardware runs it natively (CUDA bf16, CPU avx512_bf16/amx_bf16),
    # else fp32 (xtra_core.precision); true / false force it
    bf16: str | bool = "auto"
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    warmup_steps: int | None = None  # overrides warmup_epochs
    # LR of step 0: linear warmup from it to `lr` at the last warmup step (the reference's
    # LinearWarmupCosineAnnealingLR, 1e-4); 0 = warmup from 0, the first step at lr / warmup steps
    warmup_start_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    checkpoint_every: int = 200  # optimiser steps
    log_every: int = 10  # optimiser steps
    num_to_keep: int | None = 2  # checkpoints kept in storage
    max_failures: int = 0  # Ray restarts the worker group this many times
    resource_wait_s: float = 1800.0  # how long to wait for an autoscaler to add the nodes a run needs
    seed: int = 0
    run_name: str | None = None  # same name + storage_path resumes
    storage_path: str | None = None  # local dir or s3://; default ~/xtra_runs
    # every this many steps (at the first checkpoint at or after it, and at the end) the Figure-4
    # picture of a fixed set of train images is drawn from the checkpoint and logged; 0 = off
    visualize_every: int = 0
    visualize_images: int = 8
    resume_mismatch_ok: bool = False  # resume even if the model/batch config differs from the checkpoint's
    # check every checkpoint file's SHA-256 (recorded on the MLflow run at save) before loading it
    verify_checkpoints: bool = True

    def validate(self) -> None:
        _check_ranges("train", self, "zero_stage", "num_workers")
        micro = self.micro_batch_size or self.global_batch_size // self.num_workers
        if micro < 1 or self.global_batch_size % (micro * self.num_workers):
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.num_workers={self.num_workers} x micro batch {micro}"
            )
        _check_ranges("train", self, "max_steps", "checkpoint_every", "log_every",
                      "visualize_every", "visualize_images")
        if not isinstance(self.bf16, bool) and self.bf16 != "auto":
            raise ConfigError(f"train.bf16={self.bf16!r} must be true, false or auto")
        if self.warmup_start_lr < 0 or (self.lr > 0 and self.warmup_start_lr > self.lr):
            raise ConfigError(
                f"train.warmup_start_lr={self.warmup_start_lr} must be in [0, train.lr={self.lr}]"
            )

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.global_batch_size // self.num_workers

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch * self.num_workers)


@dataclass
class MLflowConfig:
    tracking_uri: str | None = None  # else MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db
    experiment: str = "xtra"
    registered_model: str = "xtra-encoder"
    # alias set on the version a pretraining run registers (models:/xtra-encoder@challenger);
    # null = none. `@latest` needs no alias: MLflow resolves it to the newest version
    alias: str | None = "challenger"

    def validate(self) -> None:
        if self.alias is not None and (
            self.alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", self.alias) or not self.alias
        ):
            raise ConfigError(
                f"mlflow.alias={self.alias!r} is reserved by MLflow (latest, v1, v2, ...) or empty; "
                "choose another name (e.g. challenger) or null"
            )


@dataclass
class ProbeConfig:
    """Frozen-trunk probing (Table 2, scaled by config).

    Linear probe: on cached features of the eval view; `linear_solver="lbfgs"` solves the
    L2-regularised logistic regression to convergence for each `linear_weight_decays` value and
    keeps the best on val; `"adamw"` is the paper's recipe (AdamW over `lrs` x `epochs`).
    Attentive probe: AdamW over `lrs` (all learning rates trained side by side on the same
    batches), `warmup_epochs` then cosine to `min_lr`, on augmented views (RandomResizedCrop
    `crop_scale`/`crop_ratio` bicubic + flip + `rand_augment` + `random_erasing`), or with
    `attentive_features="cached"` on the eval views' features computed once (short budgets).
    Eval view (both probes): resize the shorter side to `eval_resize`, centre-crop the encoder's
    image size (`eval_resize` None: no margin).
    """

    kinds: tuple[str, ...] = ("linear", "attentive")
    epochs: int = 10
    lrs: tuple[float, ...] = (1e-4, 3e-4, 5e-4, 1e-3, 1.5e-3, 2e-3, 4e-3, 8e-3)
    min_lr: float = 1e-5
    warmup_epochs: float = 0.0  # Table 2: 10 for ImageNet-1k, 0 for the others
    warmup_start_lr: float = 1e-4  # the reference's LinearWarmupCosineAnnealingLR start
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 3.0
    batch_size: int = 128
    max_train_images: int | None = None  # a seeded subsample of train
    max_test_images: int | None = None  # a seeded subsample of test (None: the whole split)
    # seeded draws of the train subsample and its val split, each probed; the scores are their
    # mean (std and every draw's score beside): a few-shot probe of hundreds of images moves by
    # points from one draw to the next
    draws: int = 1
    val_fraction: float = 0.1  # carved out of train, never the test split
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip_prob: float = 0.5
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm's spec; "" = none
    random_erasing: float = 0.25  # probability of one erased box (pixel noise)
    eval_resize: int | None = None  # shorter side before the centre crop (B: 300, H: 256)
    linear_solver: str = "lbfgs"  # "lbfgs" (converged, wd grid) or "adamw" (the paper's LR grid)
    linear_weight_decays: tuple[float, ...] = (
        1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1,
    )  # L2 strength on the mean cross-entropy, (wd / 2) * ||W||^2
    linear_max_iter: int = 1000  # L-BFGS iterations per weight decay, at most
    linear_tolerance: float = 1e-3  # L-BFGS stops when every gradient entry is below this
    attentive_last_n: int = 6
    attentive_heads: int | None = None  # default: the encoder's heads
    # "augmented" (Table 2: fresh augmented views every epoch) or "cached" (the eval views'
    # features computed once, no augmentation: epochs cost only the head's steps)
    attentive_features: str = "augmented"
    seed: int = 0

    def validate(self) -> None:
        for k in self.kinds:
            _choice("probe.kinds", k, ("linear", "attentive"))
        _choice("probe.linear_solver", self.linear_solver, ("lbfgs", "adamw"))
        _choice("probe.attentive_features", self.attentive_features, ("augmented", "cached"))
        if not self.lrs:
            raise ConfigError("probe.lrs is empty: give at least one learning rate")
        if not self.linear_weight_decays or any(w < 0 for w in self.linear_weight_decays):
            raise ConfigError(f"probe.linear_weight_decays={list(self.linear_weight_decays)} must "
                              "be a non-empty list of values >= 0")
        if not self.linear_tolerance > 0:
            raise ConfigError(f"probe.linear_tolerance={self.linear_tolerance} must be > 0")
        _check_ranges("probe", self, "val_fraction", "random_erasing", "draws")
        # probe.rand_augment (timm's spec) is read by pipelines.data.probe_augment, and checked
        # with every CLI command's values (pipelines.config_validation)


@dataclass
class XTRAConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    preset: str = "tiny"

    def validate(self) -> XTRAConfig:
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.mlflow.validate()
        self.probe.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`{"model.image_size": 32, ...}`: the resolved config as flat params."""
        out: dict[str, Any] = {"preset": self.preset}
        for section in SECTIONS:
            for k, v in dataclasses.asdict(getattr(self, section)).items():
                out[f"{section}.{k}"] = v
        return out


SECTIONS = ("model", "data", "train", "mlflow", "probe")


def _choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")


def _check_ranges(section: str, obj: Any, *names: str) -> None:
    for name in names:
        check_range(f"{section}.{name}", getattr(obj, name))
