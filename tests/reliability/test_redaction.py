"""No credential leaves the product: params, the config artifact and error lines are redacted."""

from __future__ import annotations

from collections.abc import MutableMapping

import yaml

from pipelines.cli import main as cli_main
from pipelines.redaction import env_secrets, redact, redact_config
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


PASSWORDS = ("FAKE@SECRET", "pa/ss", "p:a:ss", "p%ss", "p%40ss", "a@b/c:d%e")


def test_passwords_holding_at_slash_colon_percent_are_blanked_whole():
    for pw in PASSWORDS:
        for text in (f"http://u:{pw}@mlflow.corp:5000/api", f"see s3://AKIA:{pw}@minio:9/bucket/k.png ok",
                     f"got a URI: 'user:{pw}@host:9/bucket'", f"(uri=u:{pw}@h)"):
            out = redact(text)
            assert pw not in out and "***@" in out, (text, out)
    # registry references, paths with '@' and e-mail addresses stay as they are
    for text in ("models:/enc@champion", "s3://bucket/dir/a@2x.png", "mail me@x.org", "/tmp/a@b"):
        assert redact(text) == text


def test_credential_environment_values_are_blanked(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "EnvPlanted123")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-planted-456")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a credential
    assert redact("key EnvPlanted123 token tok-planted-456 false") == "key *** token *** false"


def test_every_printed_logged_and_raised_line_passes_the_filter(capsys):
    import logging
    import sys

    from pipelines.errors import UserError
    from pipelines.redaction import redacted_error, redacting

    secret = "http://u:Leak@y@host:1/"
    with redacting():
        print(f"line {secret}")
        sys.stderr.write(f"part {secret[:12]}")  # a credential split over two writes
        sys.stderr.write(f"{secret[12:]}\n")
        logging.getLogger("ray.tune").warning("trial failed: %s", secret)
    out, err = capsys.readouterr()
    assert "Leak" not in out + err and out.count("***@host:1/") == 1 and err.count("***@host:1/") >= 1, (out, err)
    assert "Leak" not in str(UserError(f"cannot reach {secret}"))
    clean = redacted_error(ConnectionError(f"API request to {secret} failed"))
    assert isinstance(clean, ConnectionError) and "Leak" not in str(clean)
    bug = redacted_error(KeyError(secret))
    assert "Leak" not in str(bug)


def test_unexpected_error_traceback_is_redacted(capsys, monkeypatch):
    import pipelines.cli as cli

    def boom(args):
        raise RuntimeError("failed talking to http://u:PlantedBoom9@h:1/x")

    monkeypatch.setattr(cli, "_run_export", boom)
    code = cli_main(["export", "--model", "models:/x/1", "--out", "/tmp/nowhere-xtra"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "PlantedBoom9" not in err and "***@h:1" in err, err


class RacingEnviron(MutableMapping):
    """`os.environ` as one thread sees it while another unsets a variable (MLflow's telemetry
    thread unsets `_MLFLOW_TELEMETRY_SESSION_ID`): its keys are listed, then one is gone when read."""

    def __init__(self, data: dict[str, str], vanishing: str) -> None:
        self.data, self.vanishing = dict(data), vanishing

    def __iter__(self):
        keys = list(self.data)
        self.data.pop(self.vanishing, None)  # unset by the other thread after the keys were listed
        return iter(keys)

    def __getitem__(self, key: str) -> str:
        return self.data[key]

    def __setitem__(self, key: str, value: str) -> None:
        self.data[key] = value

    def __delitem__(self, key: str) -> None:
        del self.data[key]

    def __len__(self) -> int:
        return len(self.data)


def test_a_variable_unset_by_another_thread_while_secrets_are_read_is_skipped():
    # found by a demo run: redact() raised KeyError from os.environ's items() mid-iteration
    env = RacingEnviron({"_MLFLOW_TELEMETRY_SESSION_ID": "x" * 32,
                         "AWS_SECRET_ACCESS_KEY": "PlantedSecretValue9"}, "_MLFLOW_TELEMETRY_SESSION_ID")
    assert env_secrets(env) == ["PlantedSecretValue9"]
