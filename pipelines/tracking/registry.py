"""MLflow: tracking URI, reachability check, and the encoder in the Model Registry.

The encoder is logged as an MLflow pyfunc model whose artifact is the xtra_core export
(`encoder.safetensors` + `config.json`), so the registry holds real weights and users get either
    encoder = pipelines.tracking.registry.load_encoder("models:/xtra-encoder/1")        # torch module
or  mlflow.pyfunc.load_model("models:/xtra-encoder@champion").predict(images_nchw)  # [B, D]
The pyfunc is portable: logged as code (`encoder_pyfunc.py`) with `xtra_core` in its `code/`
folder, a signature, and exact requirements (torch, safetensors, numpy, mlflow), nothing pickled.

The pretraining run that registered a version also keeps the whole XTRA (`full_model/`:
`model.safetensors` + `config.json`), which next-block predictions (`xtra visualize`) need.
Aliases: pretraining sets `mlflow.alias` on the version it registers; `xtra promote` sets any.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import UserError
from pipelines.redaction import redact
from xtra_core.config import ModelConfig, XTRAConfig
from xtra_core.export import (
    CONFIG,
    MODEL_WEIGHTS,
    WEIGHTS,
    has_full_model,
    load_model_config,
    save_encoder,
)
from xtra_core.export import load_encoder as load_export
from xtra_core.model import Encoder

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
EXPORT_ARTIFACT = "export"  # the registered model's artifact: the encoder export
FULL_MODEL_ARTIFACT = "full_model"  # a pretraining run's artifact: the whole XTRA (model.safetensors)
PYFUNC_CODE = Path(__file__).with_name("encoder_pyfunc.py")  # the pyfunc model, logged as code


def tracking_uri(cfg: XTRAConfig) -> str:
    """Config, else MLFLOW_TRACKING_URI, else a local sqlite store in the working directory."""
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # make relative sqlite paths absolute so Ray workers (other cwd) share the same store
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any compute, if the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(_health_request(uri), timeout=timeout_s) as r:
                if r.status != 200:
                    raise UserError(f"MLflow tracking server {redact(uri)} answered HTTP {r.status}")
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"MLflow tracking server {redact(uri)} cannot be reached: {redact(str(e))}") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///") :]).parent
        if not parent.is_dir():
            raise UserError(f"MLflow tracking URI {redact(uri)}: directory {parent} does not exist")


def _health_request(uri: str) -> urllib.request.Request:
    """GET <uri>/health; `user:pass@` in the URI becomes a basic-auth header (as MLflow sends it)."""
    import base64
    import urllib.parse

    parts = urllib.parse.urlsplit(uri.rstrip("/") + "/health")
    netloc = parts.netloc.rpartition("@")[2]
    req = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
    if parts.username is not None:
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        req.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    return req


def model_requirements() -> list[str]:
    """What the registered model declares (MLflow adds its own pin, mlflow==<version>): exact pins
    of the running versions, so a fresh environment rebuilds this one."""
    import safetensors
    import torch

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"safetensors=={safetensors.__version__}",
        f"numpy=={np.__version__}",
    ]


def encoder_signature(cfg: ModelConfig):  # -> mlflow.models.ModelSignature
    """Input float32 images [-1, C, H, W]; output features [-1, D]; param `last_n` (default 1)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.in_chans, cfg.image_size, cfg.image_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.encoder_width))]),
        params=ParamSchema([ParamSpec("last_n", "long", 1)]),
    )


def _xtra_core_copy(dest: Path) -> Path:
    """A clean copy of the `xtra_core` package (no bytecode caches), to ship with the model."""
    import shutil

    import xtra_core

    target = dest / "xtra_core"
    shutil.copytree(Path(xtra_core.__file__).parent, target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def log_and_register_encoder(
    export_dir: str | Path, registered_model: str, alias: str | None = None
) -> dict[str, Any]:
    """Inside an active MLflow run: log the export as a pyfunc model and register it.

    The model is logged as code (`encoder_pyfunc.py`) with `xtra_core` in its `code/` folder and
    a signature, so it loads wherever its requirements are installed. `alias` (e.g. champion) is
    set on the new version. Returns {"name", "version", "model_uri"}."""
    import tempfile
    import warnings

    import mlflow.pyfunc

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        # the signature is explicit and an input example of a real size would be megabytes of JSON
        warnings.filterwarnings("ignore", message=".*input_example", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name="encoder",
            python_model=str(PYFUNC_CODE),
            artifacts={EXPORT_ARTIFACT: str(export_dir)},
            code_paths=[str(_xtra_core_copy(Path(d)))],
            signature=encoder_signature(load_model_config(export_dir)),
            registered_model_name=registered_model,
            pip_requirements=model_requirements(),
        )
    version = str(info.registered_model_version)
    if alias:
        set_alias(registered_model, version, alias)
    return {
        "name": registered_model,
        "version": version,
        "model_uri": f"models:/{registered_model}/{version}",
    }


def set_alias(name: str, version: str, alias: str, uri: str | None = None) -> None:
    """Point `models:/name@alias` at `version` (moving it from any other version)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient(tracking_uri=uri).set_registered_model_alias(name, alias, str(version))
    except MlflowException as e:
        raise UserError(f"alias {alias!r} for models:/{name}/{version}: {e.message}") from None


def _find_export(root: Path, weights: str = WEIGHTS) -> Path:
    hits = sorted(p.parent for p in root.rglob(weights) if (p.parent / CONFIG).exists())
    if not hits:
        raise UserError(f"{root}: no XTRA export ({weights} + {CONFIG}) inside this model")
    return hits[0]


def model_version(ref: str):  # -> mlflow.entities.model_registry.ModelVersion
    """The registry's version behind `models:/name/version`, `models:/name@alias` or
    `models:/name/latest`; UserError naming the reference if there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    body = ref[len("models:/") :]
    client = mlflow.MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = body.partition("/")
        if not version:
            raise UserError(f"model {ref!r}: give a version (models:/name/1) or alias (@champion)")
        if version == "latest":  # MLflow resolves the reserved alias to the newest version
            return client.get_model_version_by_alias(name, "latest")
        return client.get_model_version(name, version)
    except MlflowException as e:
        raise UserError(f"model {ref!r} not found in the registry at {redact(mlflow.get_tracking_uri())}: {redact(e.message)}") from None


def _version_info(mv: Any, ref: str) -> dict[str, Any]:
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "source": ref}


def resolve_model(ref: str) -> tuple[Path, dict[str, Any]]:
    """A `models:/name/version`, `models:/name@alias` or local export dir -> (export dir, info).

    info has the registry's name/version/run_id where the reference is a registry URI."""
    path = Path(ref)
    if not ref.startswith("models:/"):
        if not path.exists():
            raise UserError(f"model {ref!r}: not a models:/ URI and no such directory")
        if (path / CONFIG).exists() and has_full_model(path):  # a full-model export holds it too
            return path, {"source": str(path)}
        return _find_export(path), {"source": str(path)}
    import mlflow

    mv = model_version(ref)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}")
    return _find_export(Path(local)), _version_info(mv, ref)


def resolve_full_model(ref: str) -> tuple[Path, dict[str, Any]]:
    """The whole XTRA (encoder, decoder, heads) behind `ref` -> (full-model export dir, info).

    A registered version holds only the encoder; the pretraining run that registered it keeps
    the full model as its `full_model/` artifact, found through the version's run. A local
    directory must hold `model.safetensors` (a pretraining run's `model_export/`, or
    `xtra export --full`)."""
    if not ref.startswith("models:/"):
        path = Path(ref)
        if not path.exists():
            raise UserError(f"model {ref!r}: not a models:/ URI and no such directory")
        try:
            return _find_export(path, MODEL_WEIGHTS), {"source": str(path)}
        except UserError:
            raise UserError(
                f"{ref}: no {MODEL_WEIGHTS} (the full model); predictions need the decoder and "
                "heads too: give a registered version (models:/...), a pretraining run's "
                "model_export/ directory, or a directory written by `xtra export --full`"
            ) from None
    import mlflow
    from mlflow.exceptions import MlflowException

    mv = model_version(ref)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=FULL_MODEL_ARTIFACT)
    except (MlflowException, OSError) as e:
        raise UserError(
            f"model {ref!r} (version {mv.version} of {mv.name}): its run {mv.run_id} has no "
            f"{FULL_MODEL_ARTIFACT}/ artifact (the full model), so next-block predictions cannot "
            f"be made; runs registered before pretraining kept it do not have one ({e})"
        ) from None
    return _find_export(Path(local), MODEL_WEIGHTS), _version_info(mv, ref)


def log_full_model(uri: str, run_id: str | None, model_dir: str | Path) -> None:
    """The full-model export (model.safetensors + config.json) as the run's `full_model/`."""
    import mlflow

    if run_id:
        mlflow.MlflowClient(tracking_uri=uri).log_artifacts(run_id, str(model_dir), FULL_MODEL_ARTIFACT)


def load_encoder(ref: str) -> Encoder:
    """One call: the frozen encoder (eval mode) from a registry URI or a local export dir."""
    export_dir, _ = resolve_model(ref)
    return _load_weights(export_dir)


def load_encoder_with_info(ref: str) -> tuple[Encoder, ModelConfig, dict[str, Any]]:
    export_dir, info = resolve_model(ref)
    return _load_weights(export_dir), load_model_config(export_dir), info


# --------------------------------------------------------------------------- commands


def promote(cfg: XTRAConfig, ref: str, alias: str) -> dict[str, Any]:
    """`xtra promote`: set `alias` on the version `ref` names (models:/name/v or @other-alias)."""
    import mlflow

    if not ref.startswith("models:/"):
        raise UserError(f"--model {ref!r}: promote takes a registered version, models:/name/version")
    uri = tracking_uri(cfg)
    check_tracking(uri)
    mlflow.set_tracking_uri(uri)
    mv = model_version(ref)
    set_alias(mv.name, str(mv.version), alias)
    return {"name": mv.name, "version": str(mv.version), "alias": alias,
            "model_uri": f"models:/{mv.name}@{alias}"}


def export_model(cfg: XTRAConfig, ref: str, out: str | Path, full: bool = False) -> dict[str, Any]:
    """`xtra export`: the encoder (and with `full`, the whole XTRA) as safetensors + config.json
    in `out`, loadable with `xtra_core.load_encoder(out)` / `xtra_core.load_model(out)`."""
    import shutil

    import mlflow

    uri = tracking_uri(cfg)
    if ref.startswith("models:/"):
        check_tracking(uri)
        mlflow.set_tracking_uri(uri)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty; give a new directory")
    export_dir, info = resolve_model(ref)
    out.mkdir(parents=True, exist_ok=True)
    files = [CONFIG]
    if (export_dir / WEIGHTS).exists():
        shutil.copyfile(export_dir / WEIGHTS, out / WEIGHTS)
    else:  # a full-model export: write the encoder's tensors on their own
        save_encoder(load_export(export_dir).state_dict(), load_model_config(export_dir), out)
    shutil.copyfile(export_dir / CONFIG, out / CONFIG)
    files.append(WEIGHTS)
    if full:
        model_dir, _ = resolve_full_model(ref)
        shutil.copyfile(model_dir / MODEL_WEIGHTS, out / MODEL_WEIGHTS)
        files.append(MODEL_WEIGHTS)
    return {"out": str(out), "files": sorted(files), **{k: v for k, v in info.items() if k != "source"},
            "source": ref}


def _load_weights(export_dir: Path) -> Encoder:
    """The export's safetensors weights (never a pickle): a file that is not one is refused."""
    from safetensors import SafetensorError

    try:
        return load_export(export_dir)
    except SafetensorError as e:
        raise UserError(f"{export_dir}: the encoder weights are not a safetensors file ({e}); not loaded") from None
