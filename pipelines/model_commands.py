"""`xtra promote` and `xtra export`: the registered encoder's commands (the registry itself is
`pipelines.tracking.registry`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipelines.errors import UserError
from pipelines.tracking import registry, store
from xtra_core.config import XTRAConfig
from xtra_core.export import CONFIG, MODEL_WEIGHTS, WEIGHTS, load_model_config, save_encoder
from xtra_core.export import load_encoder as load_export


def promote(cfg: XTRAConfig, ref: str, alias: str) -> dict[str, Any]:
    """`xtra promote`: set `alias` on the version `ref` names (models:/name/v or @other-alias)."""
    if not ref.startswith("models:/"):
        raise UserError(f"--model {ref!r}: promote takes a registered version, models:/name/version")
    return registry.promote(store.connect(cfg), ref, alias)


def export_model(cfg: XTRAConfig, ref: str, out: str | Path, full: bool = False,
                 allow_outside_source: bool = False) -> dict[str, Any]:
    """`xtra export`: the encoder (and with `full`, the whole XTRA) as safetensors + config.json
    in `out`, loadable with `xtra_core.load_encoder(out)` / `xtra_core.load_model(out)`. A
    registered version whose files lie outside the tracking store's artifacts is refused unless
    `allow_outside_source` (`registry.check_source_inside`)."""
    uri = store.connect(cfg) if ref.startswith("models:/") else store.tracking_uri(cfg)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty; give a new directory")
    export_dir, info = registry.resolve_model(ref, uri, allow_outside_source)
    out.mkdir(parents=True, exist_ok=True)
    files = [CONFIG]
    if (export_dir / WEIGHTS).exists():
        shutil.copyfile(export_dir / WEIGHTS, out / WEIGHTS)
    else:  # a full-model export: write the encoder's tensors on their own
        save_encoder(load_export(export_dir).state_dict(), load_model_config(export_dir), out)
    shutil.copyfile(export_dir / CONFIG, out / CONFIG)
    files.append(WEIGHTS)
    if full:
        model_dir, _ = registry.resolve_full_model(ref, uri)
        shutil.copyfile(model_dir / MODEL_WEIGHTS, out / MODEL_WEIGHTS)
        files.append(MODEL_WEIGHTS)
    return {"out": str(out), "files": sorted(files), **{k: v for k, v in info.items() if k != "source"},
            "source": ref}
