"""The encoder in the MLflow Model Registry: package, register, resolve, load.

The encoder is logged as an MLflow pyfunc model whose artifact is the xtra_core export
(`encoder.safetensors` + `config.json`), so the registry holds real weights and users get either
    encoder = pipelines.tracking.registry.load_encoder("models:/xtra-encoder/1", uri)   # torch module
or  mlflow.pyfunc.load_model("models:/xtra-encoder@champion").predict(images_nchw)  # [B, D]
The pyfunc is portable: logged as code (`encoder_pyfunc.py`) with `xtra_core` in its `code/`
folder, a signature, and exact requirements (torch, safetensors, numpy, mlflow), nothing pickled.

The pretraining run that registered a version also keeps the whole XTRA (`full_model/`:
`model.safetensors` + `config.json`), which next-block predictions (`xtra visualize`) need.
Aliases: pretraining sets `mlflow.alias` on the version it registers; `xtra promote` sets any.

Every function takes the store's URI (`store.tracking_uri(cfg)`); None means MLflow's own default
(a library caller that pointed MLflow somewhere itself).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import console
from pipelines.errors import UserError
from pipelines.redaction import redact
from pipelines.tracking.backlog import Backlog, flush_patiently
from pipelines.tracking.runs import FULL_MODEL_ARTIFACT
from pipelines.tracking.store import client, fluent_at, no_url_printing
from xtra_core.config import ModelConfig
from xtra_core.export import CONFIG, MODEL_WEIGHTS, WEIGHTS, has_full_model, load_model_config
from xtra_core.export import load_encoder as load_export
from xtra_core.model import Encoder

EXPORT_ARTIFACT = "export"  # the registered model's artifact: the encoder export
PYFUNC_CODE = Path(__file__).with_name("encoder_pyfunc.py")  # the pyfunc model, logged as code


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


MLFLOW_REGISTRATION_LINES = ("Successfully registered model", "Created version ")


def log_and_register_encoder(
    export_dir: str | Path, registered_model: str, alias: str | None = None, uri: str | None = None
) -> dict[str, Any]:
    """Inside an active MLflow run (of MLflow's fluent API, at `uri`): log the export as a pyfunc
    model and register it.

    The model is logged as code (`encoder_pyfunc.py`) with `xtra_core` in its `code/` folder and
    a signature, so it loads wherever its requirements are installed. `alias` (e.g. champion) is
    set on the new version. Returns {"name", "version", "model_uri"}."""
    import tempfile
    import warnings

    import mlflow.pyfunc

    # MLflow prints "Successfully registered model ..." / "Created version ..." on stderr itself:
    # the product says it in its own line ("encoder registered as models:/..."); its warnings stay
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(), \
            console.dropping_lines(*MLFLOW_REGISTRATION_LINES):
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
        set_alias(registered_model, version, alias, uri)
    return {
        "name": registered_model,
        "version": version,
        "model_uri": f"models:/{registered_model}/{version}",
    }


def register_encoder(uri: str, run_id: str | None, export_dir: str | os.PathLike, name: str) -> dict[str, Any]:
    """Log the encoder export to the run and register it; returns name / version / model_uri."""
    import mlflow

    # MLflow's own retries: the run's end may wait for it
    with fluent_at(uri), no_url_printing(uri), mlflow.start_run(run_id=run_id):
        info = log_and_register_encoder(export_dir, name, uri=uri)
    client(uri).set_model_version_tag(name, info["version"], "xtra.run_id", str(run_id))
    if run_id:  # MLflow answers again: send the steps an outage held back
        flush_patiently(uri, run_id, Backlog(run_id), attempts=3)
    return info


def set_alias(name: str, version: str, alias: str, uri: str | None = None) -> None:
    """Point `models:/name@alias` at `version` (moving it from any other version)."""
    from mlflow.exceptions import MlflowException

    try:
        client(uri).set_registered_model_alias(name, alias, str(version))
    except MlflowException as e:
        raise UserError(f"alias {alias!r} for models:/{name}/{version}: {e.message}") from None


def _find_export(root: Path, weights: str = WEIGHTS) -> Path:
    hits = sorted(p.parent for p in root.rglob(weights) if (p.parent / CONFIG).exists())
    if not hits:
        raise UserError(f"{root}: no XTRA export ({weights} + {CONFIG}) inside this model")
    return hits[0]


def model_version(ref: str, uri: str | None = None):  # -> mlflow ModelVersion
    """The registry's version behind `models:/name/version`, `models:/name@alias` or
    `models:/name/latest`; UserError naming the reference if there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    body = ref[len("models:/") :]
    c = client(uri)
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return c.get_model_version_by_alias(name, alias)
        name, _, version = body.partition("/")
        if not version:
            raise UserError(f"model {ref!r}: give a version (models:/name/1) or alias (@champion)")
        if version == "latest":  # MLflow resolves the reserved alias to the newest version
            return c.get_model_version_by_alias(name, "latest")
        return c.get_model_version(name, version)
    except MlflowException as e:
        raise UserError(f"model {ref!r} not found in the registry at {redact(uri or mlflow.get_tracking_uri())}: {redact(e.message)}") from None


def _inside(location: str, root: str) -> bool:
    """`location` lies in `root` (URIs or local paths; `file:` URIs and plain paths compare as
    resolved paths, so `..` and symbolic links cannot climb out)."""
    import urllib.parse

    def local(u: str) -> str | None:
        parts = urllib.parse.urlsplit(u)
        if parts.scheme in ("", "file") or len(parts.scheme) == 1:  # a path (or C:\ on Windows)
            return os.path.realpath(urllib.parse.unquote(parts.path) if parts.scheme == "file" else u)
        return None

    loc, base = local(location), local(root)
    if loc is not None and base is not None:
        return loc == base or loc.startswith(base.rstrip("/") + "/")
    if loc is None and base is None:
        return location.rstrip("/") == root.rstrip("/") or location.startswith(root.rstrip("/") + "/")
    return False


def check_source_inside(mv: Any, ref: str, uri: str | None, allow_outside_source: bool = False) -> str:
    """A registered version is only followed where its files lie in the tracking store's own
    artifact store (the artifact location of the experiment of the run that registered it): a
    version whose source points elsewhere (a local path on this machine, another bucket) is
    refused unless `allow_outside_source` (`xtra export --allow-outside-source`). Returns where
    the files are: what the caller downloads, exactly what was checked."""
    c = client(uri)
    where = c.get_model_version_download_uri(mv.name, str(mv.version))
    if allow_outside_source:
        return where
    root = None
    if mv.run_id:
        from mlflow.exceptions import MlflowException

        try:
            root = c.get_experiment(c.get_run(mv.run_id).info.experiment_id).artifact_location
        except MlflowException:
            root = None
    if root is None or not _inside(where, root):
        raise UserError(
            f"model {ref!r} (version {mv.version} of {mv.name}): its files are at {redact(where)}, outside "
            f"the tracking store's artifacts ({redact(root) if root else 'it has no run'}); not followed. "
            "If you trust that location: `xtra export --allow-outside-source`, then use the exported folder"
        )
    return where


def _version_info(mv: Any, ref: str) -> dict[str, Any]:
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "source": ref}


def resolve_model(ref: str, uri: str | None = None,
                  allow_outside_source: bool = False) -> tuple[Path, dict[str, Any]]:
    """A `models:/name/version`, `models:/name@alias` or local export dir -> (export dir, info).

    info has the registry's name/version/run_id where the reference is a registry URI. A version
    whose files lie outside the store is refused (`check_source_inside`)."""
    path = Path(ref)
    if not ref.startswith("models:/"):
        if not path.exists():
            raise UserError(f"model {ref!r}: not a models:/ URI and no such directory")
        if (path / CONFIG).exists() and has_full_model(path):  # a full-model export holds it too
            return path, {"source": str(path)}
        return _find_export(path), {"source": str(path)}
    import mlflow

    mv = model_version(ref, uri)
    where = check_source_inside(mv, ref, uri, allow_outside_source)
    local = mlflow.artifacts.download_artifacts(artifact_uri=where, tracking_uri=uri, registry_uri=uri)
    return _find_export(Path(local)), _version_info(mv, ref)


def resolve_full_model(ref: str, uri: str | None = None) -> tuple[Path, dict[str, Any]]:
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

    mv = model_version(ref, uri)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=FULL_MODEL_ARTIFACT,
                                                    tracking_uri=uri, registry_uri=uri)
    except (MlflowException, OSError) as e:
        raise UserError(
            f"model {ref!r} (version {mv.version} of {mv.name}): its run {mv.run_id} has no "
            f"{FULL_MODEL_ARTIFACT}/ artifact (the full model), so next-block predictions cannot "
            f"be made; runs registered before pretraining kept it do not have one ({e})"
        ) from None
    return _find_export(Path(local), MODEL_WEIGHTS), _version_info(mv, ref)


def load_encoder(ref: str, uri: str | None = None) -> Encoder:
    """One call: the frozen encoder (eval mode) from a registry URI or a local export dir."""
    export_dir, _ = resolve_model(ref, uri)
    return _load_weights(export_dir)


def load_encoder_with_info(ref: str, uri: str | None = None) -> tuple[Encoder, ModelConfig, dict[str, Any]]:
    export_dir, info = resolve_model(ref, uri)
    return _load_weights(export_dir), load_model_config(export_dir), info


def promote(uri: str, ref: str, alias: str) -> dict[str, Any]:
    """Set `alias` on the version `ref` names (models:/name/v or @other-alias)."""
    mv = model_version(ref, uri)
    set_alias(mv.name, str(mv.version), alias, uri)
    return {"name": mv.name, "version": str(mv.version), "alias": alias,
            "model_uri": f"models:/{mv.name}@{alias}"}


def _load_weights(export_dir: Path) -> Encoder:
    """The export's safetensors weights (never a pickle): a file that is not one is refused."""
    from safetensors import SafetensorError

    try:
        return load_export(export_dir)
    except SafetensorError as e:
        raise UserError(f"{export_dir}: the encoder weights are not a safetensors file ({e}); not loaded") from None
