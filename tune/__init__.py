"""Ablation sweeps (the paper's Table 6) with Ray Tune: `xtra sweep`.

- `space`: the axes (`block_size`, `blocks_ahead`, `loss`, `order`, `decoder_depth`,
  `decoder_width`, or any `section.key`), the grid, and its validation before Ray starts.
- `trial`: one trial = the product's pretraining + a probe of its frozen encoder.
- `progress`: one console line per trial event.
- `results`: axis value -> probe top-1 mean +- std over seeds (Markdown, JSON, PNG).
- `sweep`: the Tuner wiring (concurrency, ASHA, resume, MLflow parent run).

Layering: tune -> pipelines -> xtra_core; nothing in pipelines imports tune (the CLI's `sweep`
handler imports it lazily, the one allowed upward edge).
"""
