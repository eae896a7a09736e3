"""Frozen-trunk probes (the paper's LIN and ATT columns) and their training recipe (Table 2).

Shapes: B batch, N tokens, D encoder width, C classes.

- `LinearProbe`: the encoder's last block, mean over tokens, BatchNorm without affine, Linear.
  Input [B, N, D] tokens or [B, D] already pooled (cached features) -> logits [B, C].
- `AttentiveProbe`: the mean of the last `attentive_last_n` blocks' outputs [B, N, D], BatchNorm
  without affine over D, one learned query, multi-head attention pooling (keys and values are
  linear maps of the tokens without bias, as AIM's `AttentionPoolingClassifier` that the reference
  uses), Linear -> logits [B, C].
  An optional key padding mask [B, N] (True = padding) removes tokens from the pooling and from the
  BatchNorm statistics, so padded tokens change nothing.
- `ProbeTrainer`: AdamW(betas, wd on weight matrices only), linear warmup from `warmup_start_lr`
  over `warmup_steps` (Table 2: 10 epochs on ImageNet-1k, none for the others), then cosine to
  `min_lr` at `total_steps`, gradient clipping, cross-entropy.
- `fit_logistic_regression`: the linear probe on cached features as the convex problem it is:
  multinomial logistic regression with an L2 penalty, solved to convergence by full-batch L-BFGS
  (strong Wolfe line search) in float64; `linear_probe_from_solution` folds the standardisation
  and the solution into a `LinearProbe` (BatchNorm running stats = the train mean / variance).
- `topk_correct`: top-1 / top-5 hit counts for accuracy.

The encoder is never touched here: probes take its features as input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

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

    query: [1, 1, D]; k, v: Linear(D, D) without bias; `heads` heads of width D / heads; no output projection
    (AIM's design); the pooled vector [B, D] goes to Linear(D, C).
    """

    def __init__(self, dim: int, num_classes: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attentive probe: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=BN_EPS)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.query, std=0.02)
        for lin in (self.k, self.v):
            nn.init.trunc_normal_(lin.weight, std=0.02)
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
        # One query: softmax(q_h . (W_k x)_h / sqrt(dh)) weighs W_v x. Both products are folded
        # into D-vectors per head (q_h . W_k[h] x = (W_k[h]^T q_h) . x, and sum_n a_n W_v[h] x_n =
        # W_v[h] sum_n a_n x_n): O(B N D h) instead of the projections' O(B N D^2), the same
        # function and gradients (tests/probe/test_probe.py checks both against the textbook form).
        wk, wv = self.k.weight.reshape(h, dh, d), self.v.weight.reshape(h, dh, d)
        u = torch.einsum("he,hed->hd", self.query.reshape(h, dh), wk)  # [h, D]
        scores = torch.einsum("bnd,hd->bhn", x, u) * dh**-0.5  # [B, h, N]
        if padding is not None:
            scores = scores.masked_fill(padding[:, None, :], float("-inf"))
        pooled = torch.einsum("bhn,bnd->bhd", scores.softmax(-1), x)  # [B, h, D]
        return torch.einsum("bhd,hed->bhe", pooled, wv).reshape(b, d)

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


def probe_lr(
    step: int, total_steps: int, warmup_steps: int, warmup_start_lr: float, peak_lr: float,
    min_lr: float,
) -> float:
    """LR at optimiser step `step` (0-based): linear from min(warmup_start_lr, peak) to `peak_lr`
    over `warmup_steps`, then cosine to `min_lr` at `total_steps` (the reference's
    LinearWarmupCosineAnnealingLR)."""
    if warmup_steps > 0 and step < warmup_steps:
        start = min(warmup_start_lr, peak_lr)
        return start + (peak_lr - start) * step / warmup_steps
    return warmup_cosine_lr(step - warmup_steps, total_steps - warmup_steps, 0, peak_lr, min_lr)


class ProbeTrainer:
    """Table 2 scaled by `ProbeConfig`: AdamW, warmup + cosine to `min_lr`, clip, cross-entropy.

    `step(features, labels)` does one optimiser step; `total_steps` fixes the cosine's length,
    `warmup_steps` the linear warmup's.
    """

    def __init__(
        self, probe: nn.Module, cfg: ProbeConfig, lr: float, total_steps: int,
        warmup_steps: int = 0, weight_decay: float | None = None,
    ) -> None:
        self.probe = probe
        self.cfg = cfg
        self.peak_lr = lr
        self.total_steps = max(1, total_steps)
        self.warmup_steps = min(max(0, warmup_steps), self.total_steps - 1)
        wd = cfg.weight_decay if weight_decay is None else weight_decay
        self.optimizer = torch.optim.AdamW(param_groups(probe, wd), lr=lr, betas=tuple(cfg.betas))
        self.steps = 0

    def lr_at(self, step: int) -> float:
        return probe_lr(step, self.total_steps, self.warmup_steps, self.cfg.warmup_start_lr,
                        self.peak_lr, self.cfg.min_lr)

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


class LRGrid:
    """One probe head per peak learning rate, trained side by side on the same batches: the
    features of a batch (the expensive frozen-encoder pass) are computed once for the whole grid.

    Heads start from the same seeded init; each has its own `ProbeTrainer` (own AdamW state)."""

    def __init__(
        self, make_head: Callable[[], nn.Module], lrs: Sequence[float], cfg: ProbeConfig,
        total_steps: int, warmup_steps: int = 0, seed: int = 0,
        weight_decay: float | None = None,
    ) -> None:
        self.lrs = list(lrs)
        self.heads: list[nn.Module] = []
        for _ in self.lrs:
            torch.manual_seed(seed)
            self.heads.append(make_head())
        self.trainers = [
            ProbeTrainer(h, cfg, lr, total_steps, warmup_steps, weight_decay)
            for h, lr in zip(self.heads, self.lrs)
        ]

    def to(self, device: torch.device) -> LRGrid:
        for h in self.heads:
            h.to(device)
        return self

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """One optimiser step of every head on the batch -> their losses."""
        return [t.step(features, labels) for t in self.trainers]

    @torch.no_grad()
    def evaluate(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int
    ) -> list[dict[str, float]]:
        """Every head over the same batches (iterated once) -> one `evaluate` record per LR."""
        for h in self.heads:
            h.eval()
        n, loss_sum = 0, [0.0] * len(self.heads)
        hits = [{1: 0, 5: 0} for _ in self.heads]
        for features, labels in batches:
            for i, h in enumerate(self.heads):
                logits = h(features)
                loss_sum[i] += float(F.cross_entropy(logits, labels, reduction="sum"))
                for k, c in topk_correct(logits, labels).items():
                    hits[i][k] += c
            n += labels.shape[0]
        if n == 0:
            raise ValueError("evaluate: no samples")
        out = []
        for i in range(len(self.heads)):
            r = {"top1": hits[i][1] / n, "loss": loss_sum[i] / n, "n": float(n)}
            if num_classes > 5:
                r["top5"] = hits[i][5] / n
            out.append(r)
        return out


def best_index(records: Sequence[dict[str, float]], lrs: Sequence[float]) -> int:
    """The best val record: highest top-1, then lowest loss, then the smallest LR."""
    def key(i: int) -> tuple[float, float, float]:
        r = records[i]
        top1 = r["top1"] if math.isfinite(r["top1"]) else -math.inf
        loss = r["loss"] if math.isfinite(r["loss"]) else math.inf
        return (top1, -loss, -lrs[i])

    return max(range(len(records)), key=key)


# --------------------------------------------------------------------------- the convex linear probe


@dataclass
class LogisticSolution:
    """argmin_W,b mean CE(z W^T + b, y) + (weight_decay / 2) ||W||^2 on standardised z."""

    weight: torch.Tensor  # [C, D] float64
    bias: torch.Tensor  # [C] float64
    weight_decay: float
    iterations: int
    grad_norm: float  # max-abs gradient at the solution (0 at the exact optimum)
    loss: float


def standardize_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Train features [n, D] -> (mean [D], biased variance [D]) in float64, as BatchNorm keeps."""
    x = x.to(torch.float64)
    return x.mean(0), x.var(0, unbiased=False)


def standardize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """[n, D] -> (x - mean) / sqrt(var + eps) in float64: what `LinearProbe.bn` computes in eval."""
    return (x.to(torch.float64) - mean) / torch.sqrt(var + BN_EPS)


def fit_logistic_regression(
    z: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: LogisticSolution | None = None,
) -> LogisticSolution:
    """Full-batch L-BFGS on standardised features z [n, D], labels y [n] (float64).

    Stops when the largest gradient entry is below `tol` (or after `max_iter` iterations); `init`
    warm-starts from a neighbouring weight decay's solution (a regularisation path)."""
    z = z.to(torch.float64)
    n, d = z.shape
    w = torch.zeros(num_classes, d + 1, dtype=torch.float64)  # [C, D + 1], last column = bias
    if init is not None:
        w[:, :d], w[:, d] = init.weight, init.bias
    w.requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=tol, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        logits = z @ w[:, :d].T + w[:, d]  # [n, C]
        loss = F.cross_entropy(logits, y) + 0.5 * weight_decay * w[:, :d].pow(2).sum()
        loss.backward()
        return loss

    opt.step(objective)
    loss = objective()
    state = opt.state[opt._params[0]]
    return LogisticSolution(
        weight=w.detach()[:, :d].clone(), bias=w.detach()[:, d].clone(),
        weight_decay=weight_decay, iterations=int(state.get("n_iter", 0)),
        grad_norm=float(w.grad.abs().max()), loss=float(loss.detach()),
    )


def linear_probe_from_solution(
    solution: LogisticSolution, mean: torch.Tensor, var: torch.Tensor
) -> LinearProbe:
    """A `LinearProbe` (eval mode) whose BatchNorm standardises with (mean, var) and whose Linear
    is the solution: its logits equal the solver's on the same features."""
    c, d = solution.weight.shape
    probe = LinearProbe(d, c)
    with torch.no_grad():
        probe.bn.running_mean.copy_(mean.float())
        probe.bn.running_var.copy_(var.float())
        probe.linear.weight.copy_(solution.weight.float())
        probe.linear.bias.copy_(solution.bias.float())
    return probe.eval()


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
