"""No credential leaves the product: params, the config artifact and error lines are redacted."""

from __future__ import annotations

import yaml

from pipelines.cli import main as cli_main
from pipelines.redaction import redact, redact_config
from pipelines.tracking.runs import public_config, public_params
from xtra_core.config import build_config


def test_url_user_info_and_secret_query_values_are_blanked():
    assert redact("http://alice:hunter2@mlflow.example.com:5000/") == "http://***@mlflow.example.com:5000/"
    assert redact("see https://tok3n@host/x and s3://b/k") == "see https://***@host/x and s3://b/k"
    signed = "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA1&X-Amz-Signature=abc123&versionId=7"
    assert redact(signed) == "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&versionId=7"
    assert redact("http://h/?token=t0k&sig=s1g;api_key=k3y#f") == "http://h/?token=***&sig=***;api_key=***#f"
    # nothing to hide: unchanged
    for text in ("s3://bucket/prefix", "/data/imgs", "sqlite:////tmp/m.db", "http://h:80/p?page=2&x=1"):
        assert redact(text) == text


def test_nested_config_values_and_secret_named_keys():
    d = {"a": {"uri": "http://u:p@h", "list": ["x", "http://t@h"], "aws_secret_access_key": "k"}, "n": 3}
    assert redact_config(d) == {"a": {"uri": "http://***@h", "list": ["x", "http://***@h"],
                                      "aws_secret_access_key": "***"}, "n": 3}


def test_params_and_config_artifact_carry_no_credentials():
    cfg = build_config("tiny", None, {
        "mlflow.tracking_uri": "https://bob:PlantedPass1@mlflow.corp:443",
        "data.s3_endpoint": "http://AKIAPLANTED:PlantedSecret2@minio:9000",
        "data.uri": "https://host/data?X-Amz-Security-Token=PlantedToken3",
    })
    texts = [yaml.safe_dump(public_config(cfg)), *public_params(cfg).values()]
    blob = "\n".join(texts)
    for secret in ("PlantedPass1", "PlantedSecret2", "AKIAPLANTED", "PlantedToken3"):
        assert secret not in blob
    assert public_params(cfg)["mlflow.tracking_uri"] == "https://***@mlflow.corp:443"
    assert public_config(cfg)["data"]["s3_endpoint"] == "http://***@minio:9000"


def test_cli_error_lines_print_redacted_uris(tmp_path, capsys):
    code = cli_main(["pretrain", "--data", str(tmp_path), "--set",
                     "mlflow.tracking_uri=http://eve:PlantedPass4@127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2 and "PlantedPass4" not in err and "http://***@127.0.0.1:9" in err, err
