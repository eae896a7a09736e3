"""Configuration: dataclasses with defaults are the single source of truth.

A YAML file (parsed in `pipelines.config_io`) overrides them, and CLI `--set section.key=value`
overrides the YAML. This module is pure Python: it knows nothing about YAML or Ray.

Sections: `model` (the XTRA architecture and the Table 6 ablation switches), `data`, `train`,
`mlflow`, `probe`. Presets `tiny`, `vit_b16`, `vit_h14` fill `model` (and Table 1 training
settings); `XTRAConfig.validate()` names the values that clash.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration: an unknown key, a wrongly typed value or values that clash."""


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
    block_order: str = "raster"  # "raster" or "random" (a fixed permutation drawn from order_seed)
    order_seed: int = 0
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
        _choice("model.block_order", self.block_order, ("raster", "random"))
        _choice("model.attention", self.attention, ("sdpa", "flex"))
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"model.drop_path={self.drop_path} must be in [0, 1)")


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
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ConfigError(f"data.hflip_prob={self.hflip_prob} must be in [0, 1]")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"data.std={list(self.std)} must be positive")
        if self.min_image_side < 1:
            raise ConfigError(f"data.min_image_side={self.min_image_side} must be >= 1")
        if self.max_image_bytes < 1:
            raise ConfigError(f"data.max_image_bytes={self.max_image_bytes} must be >= 1")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        if self.s3_max_attempts < 1:
            raise ConfigError(f"data.s3_max_attempts={self.s3_max_attempts} must be >= 1")
        for key in ("s3_connect_timeout_s", "s3_request_timeout_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be > 0")


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
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    checkpoint_every: int = 200  # optimiser steps
    log_every: int = 10  # optimiser steps
    num_to_keep: int | None = 2  # checkpoints kept in storage
    max_failures: int = 0  # Ray restarts the worker group this many times
    seed: int = 0
    run_name: str | None = None  # same name + storage_path resumes
    storage_path: str | None = None  # local dir or s3://; default ~/xtra_runs
    # every this many steps (at the first checkpoint at or after it, and at the end) the Figure-4
    # picture of a fixed set of train images is drawn from the checkpoint and logged; 0 = off
    visualize_every: int = 0
    visualize_images: int = 8
    resume_mismatch_ok: bool = False  # resume even if the model/batch config differs from the checkpoint's

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.num_workers < 1:
            raise ConfigError(f"train.num_workers={self.num_workers} must be >= 1")
        micro = self.micro_batch_size or self.global_batch_size // self.num_workers
        if micro < 1 or self.global_batch_size % (micro * self.num_workers):
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.num_workers={self.num_workers} x micro batch {micro}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps={self.max_steps} must be >= 1")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("train.checkpoint_every and train.log_every must be >= 1")
        if not isinstance(self.bf16, bool) and self.bf16 != "auto":
            raise ConfigError(f"train.bf16={self.bf16!r} must be true, false or auto")
        if self.visualize_every < 0 or self.visualize_images < 1:
            raise ConfigError(
                f"train.visualize_every={self.visualize_every} must be >= 0 (0 = off) and "
                f"train.visualize_images={self.visualize_images} >= 1"
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
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"probe.val_fraction={self.val_fraction} must be in (0, 1)")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ConfigError(f"probe.random_erasing={self.random_erasing} must be in [0, 1]")
        if self.rand_augment:
            try:
                parse_rand_augment(self.rand_augment)
            except ValueError as e:
                raise ConfigError(f"probe.rand_augment: {e}") from None


def parse_rand_augment(spec: str) -> dict[str, Any]:
    """timm's RandAugment spec `rand-m9-mstd0.5-inc1` -> keyword arguments (magnitude, num_ops,
    magnitude_std, increasing; m defaults to 10); ValueError naming a bad section."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec {spec!r} must start with 'rand'")
    kw: dict[str, Any] = {"magnitude": 10.0, "increasing": False}
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if not m:
            raise ValueError(f"RandAugment spec {spec!r}: cannot read section {part!r}")
        key, val = m.groups()
        try:
            if key == "m":
                kw["magnitude"] = float(val)
            elif key == "n":
                kw["num_ops"] = int(val)
            elif key == "mstd":
                kw["magnitude_std"] = float(val)
            elif key == "inc":
                kw["increasing"] = bool(int(val))
            else:
                raise ValueError(f"RandAugment spec {spec!r}: unknown section {key!r} "
                                 "(valid: m, n, mstd, inc)")
        except ValueError as e:
            if "unknown section" in str(e):
                raise
            raise ValueError(f"RandAugment spec {spec!r}: bad number in section {part!r}") from None
    kw.setdefault("magnitude_std", 0.0)
    return kw


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


# --------------------------------------------------------------------------- presets


def tiny() -> XTRAConfig:
    """CPU-sized: 32 px, patch 4, block 2 (4x4 blocks of 8 px), ~6.3M parameters."""
    return XTRAConfig(
        model=ModelConfig(),
        train=TrainConfig(global_batch_size=128, epochs=5, warmup_epochs=0.5, zero_stage=2,
                          checkpoint_every=100),
        probe=small_data_probe(),
        preset="tiny",
    )


def small_data_probe() -> ProbeConfig:
    """The `tiny` preset's probes, for thousands of images on a CPU: the attentive probe trains on
    the eval views' features cached once (one feature pass with the linear probe), 40 epochs with
    4 of warmup at LRs 1e-2 and 3e-2. Table 2's 10 epochs of augmented views (right for ImageNet at
    100 epochs) left it ~10 points under the linear probe at this size."""
    return ProbeConfig(attentive_last_n=2, attentive_features="cached", epochs=40,
                       warmup_epochs=4.0, lrs=(1e-2, 3e-2))


def table2_probe(eval_resize: int) -> ProbeConfig:
    """Table 2's ImageNet-1k column and the reference's in1k eval configs (B and H): 100 epochs,
    batch 4096 (1024 x 4 accumulated), 10 warmup epochs, the mean of the last 6 blocks, 16 heads."""
    return ProbeConfig(
        epochs=100, batch_size=4096, warmup_epochs=10.0, attentive_last_n=6, attentive_heads=16,
        eval_resize=eval_resize,
    )


def vit_b16() -> XTRAConfig:
    """Table 1, ViT-B/16 on ImageNet-1K: 256 px, patch 16, 64 px blocks."""
    return XTRAConfig(
        model=ModelConfig(
            image_size=256,
            patch_size=16,
            block_size=4,
            encoder_width=768,
            encoder_depth=12,
            encoder_heads=12,
            projection_hidden=4096,
            decoder_width=768,
            decoder_depth=8,
            decoder_heads=6,
            head_hidden=6144,
            drop_path=0.2,
        ),
        train=TrainConfig(
            global_batch_size=2048, epochs=800, warmup_epochs=15, lr=1e-3, min_lr=1e-6
        ),
        probe=table2_probe(eval_resize=300),  # the reference's eval: resize 300, centre crop 256
        preset="vit_b16",
    )


def vit_h14() -> XTRAConfig:
    """Table 1, ViT-H/14 on ImageNet-21K: 224 px, patch 14, 56 px blocks."""
    return XTRAConfig(
        model=ModelConfig(
            image_size=224,
            patch_size=14,
            block_size=4,
            encoder_width=1280,
            encoder_depth=32,
            encoder_heads=16,
            projection_hidden=5120,
            decoder_width=640,
            decoder_depth=8,
            decoder_heads=8,
            head_hidden=9408,  # the reference's config and checkpoint name ("proj_9408")
            drop_path=0.2,
            activation_checkpointing=True,
        ),
        train=TrainConfig(
            global_batch_size=2048, epochs=100, warmup_epochs=3, lr=1e-3, min_lr=1e-6
        ),
        probe=table2_probe(eval_resize=256),  # the reference's eval: resize 256, centre crop 224
        preset="vit_h14",
    )


PRESETS = {"tiny": tiny, "vit_b16": vit_b16, "vit_h14": vit_h14}


def preset(name: str) -> XTRAConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------- overrides


def parse_dotted(pairs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{"train.max_steps": 5}` -> `{"train": {"max_steps": 5}}`; a key without a dot is an error."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in pairs.items():
        if "." not in key:
            raise ConfigError(
                f"override key {key!r} must be section.key with section one of {list(SECTIONS)}"
            )
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return nested


def apply_overrides(cfg: XTRAConfig, overrides: dict[str, Any]) -> XTRAConfig:
    """A copy of `cfg` with nested overrides `{section: {key: value}}` applied and type-checked.

    Unknown sections or keys raise ConfigError naming the valid ones.
    """
    cfg = copy.deepcopy(cfg)
    for section, values in overrides.items():
        if section == "preset":
            continue
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}; valid sections: {list(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        valid = [f.name for f in dataclasses.fields(obj)]
        for key, value in values.items():
            if key not in valid:
                raise ConfigError(
                    f"unknown config key {section}.{key!r}; valid keys of {section!r}: {valid}"
                )
            setattr(obj, key, _coerce(f"{section}.{key}", value, hints[key]))
    return cfg


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field type `tp`; accept ints for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for member in inner[:-1]:  # the first member that takes the value
            try:
                return _coerce(key, value, member)
            except ConfigError:
                pass
        return _coerce(key, value, inner[-1])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                out = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(out):
                    return out
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def build_config(
    base: str | XTRAConfig = "tiny",
    overrides: dict[str, Any] | None = None,
    dotted: dict[str, Any] | None = None,
) -> XTRAConfig:
    """Preset (or config) <- nested overrides (YAML) <- dotted overrides (`--set`), validated."""
    cfg = preset(base) if isinstance(base, str) else base
    overrides = dict(overrides or {})
    name = overrides.pop("preset", None)
    if name is not None:
        if not isinstance(name, str):
            raise ConfigError(f"preset must be a name, got {name!r}")
        cfg = preset(name)
    cfg = apply_overrides(cfg, overrides)
    if dotted:
        cfg = apply_overrides(cfg, parse_dotted(dotted))
    return cfg.validate()


def config_from_dict(d: dict[str, Any]) -> XTRAConfig:
    """Inverse of `XTRAConfig.to_dict()` (used to load exported configs)."""
    d = dict(d)
    base = preset(d.pop("preset", "tiny"))
    return apply_overrides(base, d).validate()
