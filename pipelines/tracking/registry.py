"""MLflow: tracking URI, reachability check, and the encoder in the Model Registry.

The encoder is logged as an MLflow pyfunc model whose artifact is the xtra_core export
(`encoder.safetensors` + `config.json`), so the registry holds real weights and users get either
    encoder = pipelines.tracking.registry.load_encoder("models:/xtra-encoder/1")        # torch module
or  mlflow.pyfunc.load_model("models:/xtra-encoder/1").predict(images_nchw)   # features [B, D]
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
from xtra_core.export import CONFIG, load_model_config
from xtra_core.export import load_encoder as load_export
from xtra_core.model import Encoder

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
EXPORT_ARTIFACT = "export"


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


def _pyfunc_class() -> type:
    import mlflow.pyfunc

    class XTRAEncoderModel(mlflow.pyfunc.PythonModel):
        """pyfunc wrapper: float32 images [B, C, H, W] (normalised) -> mean token feature [B, D]."""

        def load_context(self, context) -> None:  # noqa: ANN001
            self.encoder = load_export(context.artifacts[EXPORT_ARTIFACT])

        def predict(self, context, model_input, params=None):  # noqa: ANN001 (mlflow reads hints)
            import torch

            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            with torch.no_grad():
                return self.encoder(x).mean(1).numpy()

    return XTRAEncoderModel


def log_and_register_encoder(export_dir: str | Path, registered_model: str) -> dict[str, Any]:
    """Inside an active MLflow run: log the export as a pyfunc model and register it.

    Returns {"name", "version", "model_uri"}."""
    import mlflow.pyfunc

    info = mlflow.pyfunc.log_model(
        name="encoder",
        python_model=_pyfunc_class()(),
        artifacts={EXPORT_ARTIFACT: str(export_dir)},
        registered_model_name=registered_model,
        pip_requirements=["torch==2.13.0", "safetensors", "numpy"],
    )
    version = str(info.registered_model_version)
    return {
        "name": registered_model,
        "version": version,
        "model_uri": f"models:/{registered_model}/{version}",
    }


def _find_export(root: Path) -> Path:
    hits = sorted(p.parent for p in root.rglob(CONFIG))
    if not hits:
        raise UserError(f"{root}: no XTRA encoder export ({CONFIG}) inside this model")
    return hits[0]


def resolve_model(ref: str) -> tuple[Path, dict[str, Any]]:
    """A `models:/name/version`, `models:/name@alias` or local export dir -> (export dir, info).

    info has the registry's name/version/run_id where the reference is a registry URI."""
    path = Path(ref)
    if not ref.startswith("models:/"):
        if not path.exists():
            raise UserError(f"model {ref!r}: not a models:/ URI and no such directory")
        return _find_export(path), {"source": str(path)}
    import mlflow
    from mlflow.exceptions import MlflowException

    body = ref[len("models:/") :]
    client = mlflow.MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = body.partition("/")
            if not version:
                raise UserError(f"model {ref!r}: give a version (models:/name/1) or alias (@champion)")
            mv = client.get_model_version(name, version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}")
    except MlflowException as e:
        raise UserError(f"model {ref!r} not found in the registry at {redact(mlflow.get_tracking_uri())}: {redact(e.message)}") from None
    info = {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "source": ref}
    return _find_export(Path(local)), info


def load_encoder(ref: str) -> Encoder:
    """One call: the frozen encoder (eval mode) from a registry URI or a local export dir."""
    export_dir, _ = resolve_model(ref)
    return _load_weights(export_dir)


def load_encoder_with_info(ref: str) -> tuple[Encoder, ModelConfig, dict[str, Any]]:
    export_dir, info = resolve_model(ref)
    return _load_weights(export_dir), load_model_config(export_dir), info


def _load_weights(export_dir: Path) -> Encoder:
    """The export's safetensors weights (never a pickle): a file that is not one is refused."""
    from safetensors import SafetensorError

    try:
        return load_export(export_dir)
    except SafetensorError as e:
        raise UserError(f"{export_dir}: the encoder weights are not a safetensors file ({e}); not loaded") from None
