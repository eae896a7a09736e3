"""A real `mlflow server --app-name basic-auth`: its admin password, given in the tracking URI
(with `@`, `/` and `%` in it), is printed, logged or stored nowhere on the good paths of pretrain,
probe, export, promote, visualize and sweep, nor on a refused login."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pipelines.cli import main as cli_main
from tests.reliability.conftest import SMALL_MODEL, MlflowServer, record_figure, small_sets

pytestmark = pytest.mark.slow

PASSWORD = "Planted@Auth/Pass%7x"  # what the server's admin logs in with
USER = "xtraadmin"


@pytest.fixture
def auth_server(tmp_path):
    root = tmp_path / "mlflow"
    root.mkdir()
    ini = root / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                   f"database_uri = sqlite:///{root}/auth.db\nadmin_username = {USER}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    server = MlflowServer(root, ("--app-name", "basic-auth"), {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-flask-key"})
    server.start()
    try:
        yield server
    finally:
        server.close()


def _cli(args: list[str], sets: dict, capsys) -> tuple[int, str]:
    code = cli_main([*args, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_basic_auth_password_is_never_printed_logged_or_stored(ray_cluster, fmnist, auth_server,
                                                               tmp_path, capsys, caplog):
    import ray

    host = auth_server.url.removeprefix("http://")
    # the server is really guarded: no credentials, no answer
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{auth_server.url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.value.code == 401
    uri = f"http://{USER}:{urllib.parse.quote(PASSWORD, safe='')}@{host}"
    sets = small_sets(tmp_path, fmnist, "authrun", **{
        "train.max_steps": 2, "train.checkpoint_every": 2, "mlflow.tracking_uri": uri,
        "mlflow.registered_model": "enc-auth"})
    probe_sets = {"mlflow.tracking_uri": uri, "probe.epochs": 1, "probe.lrs": "[0.01]",
                  "probe.linear_weight_decays": "[0.001]", "probe.max_train_images": 32,
                  "probe.max_test_images": 16, **{k: v for k, v in sets.items() if k.startswith("model.")}}
    printed: dict[str, str] = {}
    code, printed["pretrain"] = _cli(["pretrain"], sets, capsys)
    assert code == 0 and "encoder registered as models:/enc-auth/1" in printed["pretrain"], printed["pretrain"][-2000:]
    code, printed["probe"] = _cli(["probe", "--model", "models:/enc-auth/1", "--data", fmnist,
                                   "--kind", "linear"], probe_sets, capsys)
    assert code == 0 and json.loads(printed["probe"].strip().splitlines()[-1])["kind"] == "linear", printed["probe"][-2000:]
    code, printed["export"] = _cli(["export", "--model", "models:/enc-auth/1", "--out", str(tmp_path / "exp")],
                                  {"mlflow.tracking_uri": uri}, capsys)
    assert code == 0 and (tmp_path / "exp" / "encoder.safetensors").exists(), printed["export"][-2000:]
    code, printed["promote"] = _cli(["promote", "--model", "models:/enc-auth/1", "--alias", "champion"],
                                   {"mlflow.tracking_uri": uri}, capsys)
    assert code == 0, printed["promote"][-2000:]
    code, printed["visualize"] = _cli(["visualize", "--model", "models:/enc-auth@champion", "--data", fmnist,
                                       "--n", "2", "--out", str(tmp_path / "fig.png")],
                                      {"mlflow.tracking_uri": uri, **probe_sets}, capsys)
    assert code == 0 and (tmp_path / "fig.png").exists(), printed["visualize"][-2000:]
    sweep_sets = {**SMALL_MODEL, "train.global_batch_size": 16, "train.num_workers": 2,
                  "train.cpus_per_worker": 0.5, "train.max_steps": 2, "train.warmup_steps": 1,
                  "train.log_every": 1, "train.checkpoint_every": 2,
                  "train.storage_path": str(tmp_path / "sweep-runs"), "mlflow.tracking_uri": uri,
                  "mlflow.experiment": "sweeps", "probe.lrs": [0.01], "probe.epochs": 2}
    code, printed["sweep"] = _cli(["sweep", "--data", fmnist, "--axis", "block_size=2", "--name", "authsweep",
                                   "--max-concurrent", "1"],
                                  {k: json.dumps(v) for k, v in sweep_sets.items()}, capsys)
    assert code == 0 and "(block_size=2 seed=0): probed" in printed["sweep"], printed["sweep"][-3000:]
    wrong = uri.replace(urllib.parse.quote(PASSWORD, safe=""), urllib.parse.quote(PASSWORD + "no", safe=""))
    code, printed["wrong password"] = _cli(["promote", "--model", "models:/enc-auth/1", "--alias", "x"],
                                          {"mlflow.tracking_uri": wrong}, capsys)
    assert code != 0 and len(printed["wrong password"].strip().splitlines()) == 1, printed["wrong password"]

    forms = {PASSWORD, urllib.parse.quote(PASSWORD, safe=""), urllib.parse.quote(PASSWORD)}
    hits = [f"{cmd} output" for cmd, text in printed.items() if any(f in text for f in forms)]
    hits += ["log records" for f in forms if f in caplog.text]
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    scanned = 0
    for root in (tmp_path, session / "logs"):
        for path in root.rglob("*"):
            if not path.is_file() or path.is_symlink() or path.name.endswith(".sock") or path.name == "auth.ini":
                continue
            data, scanned = path.read_bytes(), scanned + 1
            hits += [str(path) for f in forms if f.encode() in data]
    assert scanned > 20 and not hits, hits
    record_figure("secrets_basic_auth", commands=len(printed), files_scanned=scanned, secrets_found=len(hits))
