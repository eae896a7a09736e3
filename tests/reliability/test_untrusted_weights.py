"""A malicious pickle placed where the product loads weights is refused, never unpickled."""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import mlflow
import pytest
import torch

from pipelines.cli import main as cli_main
from pipelines.tracking.registry import load_encoder, log_and_register_encoder
from tests.reliability.conftest import SMALL_MODEL, record_figure
from xtra_core.config import build_config
from xtra_core.export import WEIGHTS, save_encoder
from xtra_core.model import build_model


class _Payload:
    """Unpickling this creates `marker`: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def _malicious_pickle(marker: Path) -> bytes:
    blob = pickle.dumps(_Payload(marker))
    pickle.loads(blob).close()  # the payload is live: loading it runs code
    assert marker.exists()
    marker.unlink()
    return blob


def _export(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    cfg = build_config("tiny", None, SMALL_MODEL)
    state = build_model(cfg.model).encoder.state_dict()
    out = tmp_path / "export"
    save_encoder(state, cfg.model, out)
    return out, state


def test_pickle_in_place_of_the_export_weights_is_refused_by_probe(tmp_path, capsys):
    marker = tmp_path / "pwned"
    export, _ = _export(tmp_path)
    (export / WEIGHTS).write_bytes(_malicious_pickle(marker))
    code = cli_main(["probe", "--model", str(export), "--data", str(tmp_path),
                     "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a safetensors file" in err and str(export) in err, err
    assert not marker.exists()
    record_figure("malicious_pickle_export", refused=True, code_ran=marker.exists())


@pytest.mark.slow
def test_registry_load_never_runs_the_pyfunc_wrapper(tmp_path):
    marker = tmp_path / "pwned"
    export, state = _export(tmp_path)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        client = mlflow.MlflowClient()
        exp = client.create_experiment("untrusted", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp):
            info = log_and_register_encoder(export, "enc-untrusted")
        _swap_pickles_and_load(tmp_path, marker, info, state)
    finally:
        mlflow.set_tracking_uri(previous)


def _swap_pickles_and_load(tmp_path: Path, marker: Path, info: dict, state: dict) -> None:
    """An attacker with write access to the artifact store replaces the pyfunc wrapper (a pickle,
    or the code file of a models-from-code model) with code that runs on load; `load_encoder`
    must read only the safetensors export and never run it."""
    import yaml

    wrappers = list(tmp_path.rglob("python_model.pkl"))
    for mlmodel in tmp_path.rglob("MLmodel"):
        flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
        # models-from-code: the wrapper is the .py file the flavor names (no pickle at all)
        # (only the copy inside the logged model: the flavor may also name the source file's path)
        wrappers += [mlmodel.parent / Path(v).name for v in flavor.values()
                     if isinstance(v, str) and v.endswith(".py") and (mlmodel.parent / Path(v).name).is_file()]
    assert all(tmp_path in p.resolve().parents for p in wrappers), wrappers
    assert wrappers and all(p.exists() for p in wrappers), "the pyfunc wrapper was not stored where expected"
    for p in wrappers:
        if p.suffix == ".pkl":
            p.write_bytes(_malicious_pickle(marker))
        else:
            p.write_text(f"open({str(marker)!r}, 'w').close()\n")
    encoder = load_encoder(info["model_uri"])
    assert not marker.exists()  # the product read the safetensors export, not the wrapper
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, state[k]), k
    record_figure("malicious_pickle_registry", refused=True, code_ran=marker.exists())


@pytest.mark.slow
def test_a_checkpoint_file_changed_in_storage_is_refused_before_it_is_unpickled(
        ray_cluster, fmnist, tmp_path, capsys):
    """Every checkpoint file's SHA-256 is recorded on the MLflow run at save; a resume whose
    checkpoint was changed in the run's storage (a pickle payload in place of DeepSpeed's model
    states) ends in one line naming the file, and the payload never runs."""
    from pipelines.pretrain import digests
    from pipelines.pretrain import driver as pretrain
    from tests.reliability.conftest import make_cfg, small_sets

    sets = {"train.max_steps": 4, "train.checkpoint_every": 2}
    first = pretrain.run_pretraining(make_cfg(tmp_path, fmnist, "tamper", **sets, **{"train.stop_at_step": 2}))
    ckpt = Path(first["checkpoint"])
    assert ckpt.name == "checkpoint_step000000002"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    files = digests.local_digests(str(ckpt))
    assert {"xtra_state.json", "ds/mp_rank_00_model_states.pt"} <= set(files)
    assert any("zero_pp_rank_1" in p for p in files)  # rank 1's own files are recorded too
    tags = client.get_run(first["run_id"]).data.tags
    assert tags[digests.tag_key(ckpt.name)] == digests.manifest_digest(files)
    recorded = Path(client.download_artifacts(first["run_id"], f"checkpoint_sha256/{ckpt.name}.sha256",
                                              str(tmp_path / "dl"))).read_text()
    assert digests.parse_manifest(recorded) == files

    marker = tmp_path / "pwned"
    (ckpt / "ds" / "mp_rank_00_model_states.pt").write_bytes(_malicious_pickle(marker))
    capsys.readouterr()
    code = cli_main(["pretrain", *[a for k, v in small_sets(tmp_path, fmnist, "tamper", **sets).items()
                                   for a in ("--set", f"{k}={v}")]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "checkpoint_step000000002" in err[0] and "changed: ds/mp_rank_00_model_states.pt" in err[0], err
    assert "Traceback" not in "\n".join(err)
    assert not marker.exists()  # nothing was unpickled
    record_figure("tampered_checkpoint", refused=True, code_ran=marker.exists())
