"""Frozen-trunk probes (the paper's LIN and ATT columns) and their training recipe (Table 2).

Shapes: B batch, N tokens, D encoder width, C classes.

- `LinearProbe`: the encoder's last block, mean over tokens, BatchNorm without affine, Linear.
  Input [B, N, D] tokens or [B, D] already pooled (cached features) -> logits [B, C].
- `AttentiveProbe`: the mean of the last `attentive_last_n` blocks' outputs [B, N, D], BatchNorm
  without affine over D, one learned query, multi-head attention pooling (keys and values are
  linear maps of the tokens, as in AIM's `AttentionPoolingClassifier`), Linear -> logits [B, C].
  An optional key padding mask [B, N] (True = padding) removes tokens from the pooling and from the
  BatchNorm statistics, so padded tokens change nothing.
- `ProbeTrainer`: AdamW(betas, wd on weight matrices only), cosine from the peak LR to `min_lr`
  over `total_steps` (no warmup, Table 2's "Others" column), gradient clipping, cross-entropy.
- `topk_correct`: top-1 / top-5 hit counts for accuracy.

The encoder is never touched here: probes take its features as input.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from xtra_core.config import ProbeConfig
from xtra_core.optim import param_groups, warmup_cosine_lr

PROBE_KINDS = ("linear", "attentive")
BN_EPS = 1e-6


class LinearProbe(nn.Module):
    """BatchNorm1d(D, affine=False) + Linear(D, C) on token-mean features."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=BN_EPS)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, D] -> their mean [B, D]; [B, D] passes through."""
        return features.mean(1) if features.dim() == 3 else features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, N, D] (last block's tokens) or [B, D] (pooled) -> logits [B, C]."""
        return self.linear(self.bn(self.pool(features)))


class AttentiveProbe(nn.Module):
    """Attention pooling with one learned query over BatchNorm'd tokens, then Linear.

    query: [1, 1, D]; k, v: Linear(D, D); `heads` heads of width D / heads; no output projection
    (AIM's design); the pooled vector [B, D] goes to Linear(D, C).
    """

    def __init__(self, dim: int, num_classes: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attentive probe: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=BN_EPS)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.query, std=0.02)
        for lin in (self.k, self.v):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def normalize(self, tokens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """BatchNorm over D of the real tokens only: [B, N, D] -> [B, N, D] (padding rows -> 0)."""
        b, n, d = tokens.shape
        if padding is None:
            return self.bn(tokens.reshape(b * n, d)).reshape(b, n, d)
        keep = ~padding.reshape(b * n)  # [B*N]
        out = tokens.new_zeros(b * n, d)
        out[keep] = self.bn(tokens.reshape(b * n, d)[keep])
        return out.reshape(b, n, d)

    def pool(self, tokens: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, N, D], padding bool [B, N] (True = ignore) -> pooled [B, D]."""
        b, n, d = tokens.shape
        if padding is not None:
            if padding.shape != (b, n) or padding.dtype != torch.bool:
                raise ValueError(f"padding must be bool [{b}, {n}], got {padding.dtype} {tuple(padding.shape)}")
            if padding.all(1).any():
                raise ValueError("padding masks every token of a sample")
        x = self.normalize(tokens, padding)
        h, dh = self.heads, d // self.heads
        q = self.query.expand(b, 1, d).reshape(b, 1, h, dh).transpose(1, 2)  # [B, h, 1, dh]
        k = self.k(x).reshape(b, n, h, dh).transpose(1, 2)  # [B, h, N, dh]
        v = self.v(x).reshape(b, n, h, dh).transpose(1, 2)  # [B, h, N, dh]
        mask = None if padding is None else ~padding[:, None, None, :]  # [B, 1, 1, N], True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, h, 1, dh]
        return out.transpose(1, 2).reshape(b, d)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, N, D] (mean of the last blocks' outputs), padding [B, N] -> logits [B, C]."""
        return self.linear(self.pool(tokens, padding))


def build_probe(kind: str, dim: int, num_classes: int, heads: int | None = None) -> nn.Module:
    """`linear` or `attentive` probe for features of width `dim`; `heads` for attentive."""
    if kind == "linear":
        return LinearProbe(dim, num_classes)
    if kind == "attentive":
        if heads is None:
            raise ValueError("attentive probe needs `heads`")
        return AttentiveProbe(dim, num_classes, heads)
    raise ValueError(f"unknown probe kind {kind!r}; valid kinds: {list(PROBE_KINDS)}")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """logits [B, C], labels [B] -> {k: number of samples whose label is in the top k} (k <= C)."""
    ks = [k for k in ks if k <= logits.shape[1]]
    if not ks:
        return {}
    top = logits.topk(max(ks), dim=1).indices  # [B, kmax]
    hit = top == labels[:, None]  # [B, kmax]
    return {k: int(hit[:, :k].any(1).sum()) for k in ks}


class ProbeTrainer:
    """Table 2 scaled by `ProbeConfig`: AdamW, cosine to `min_lr`, clip, cross-entropy.

    `step(features, labels)` does one optimiser step; `total_steps` fixes the cosine's length.
    """

    def __init__(self, probe: nn.Module, cfg: ProbeConfig, lr: float, total_steps: int) -> None:
        self.probe = probe
        self.cfg = cfg
        self.peak_lr = lr
        self.total_steps = max(1, total_steps)
        self.optimizer = torch.optim.AdamW(
            param_groups(probe, cfg.weight_decay), lr=lr, betas=tuple(cfg.betas)
        )
        self.steps = 0

    def lr_at(self, step: int) -> float:
        return warmup_cosine_lr(step, self.total_steps, 0, self.peak_lr, self.cfg.min_lr)

    def step(self, features: torch.Tensor, labels: torch.Tensor, **kw: torch.Tensor) -> float:
        """One AdamW step on a batch: features as the probe takes them, labels [B] -> loss."""
        self.probe.train()
        lr = self.lr_at(self.steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss = F.cross_entropy(self.probe(features, **kw), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.probe.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.steps += 1
        return float(loss.detach())


@torch.no_grad()
def evaluate(
    probe: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int
) -> dict[str, float]:
    """Accuracy over (features, labels [B]) batches: {"top1", "top5" (if C > 5), "loss", "n"}."""
    probe.eval()
    n, loss_sum = 0, 0.0
    hits = {1: 0, 5: 0}
    for features, labels in batches:
        logits = probe(features)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        for k, c in topk_correct(logits, labels).items():
            hits[k] += c
        n += labels.shape[0]
    if n == 0:
        raise ValueError("evaluate: no samples")
    out = {"top1": hits[1] / n, "loss": loss_sum / n, "n": float(n)}
    if num_classes > 5:
        out["top5"] = hits[5] / n
    return out
