"""Checkpoint digests: every file's SHA-256, one digest per checkpoint, and the refusal of a
checkpoint whose files changed, went missing or were added (naming them); the digest tag survives
an MLflow outage in the backlog."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
import pytest

from pipelines.errors import UserError
from pipelines.pretrain import digests
from pipelines.tracking import backlog as backlog_mod
from pipelines.tracking import runs


def _checkpoint(root: Path) -> Path:
    d = root / "checkpoint_step000000004"
    (d / "ds").mkdir(parents=True)
    (d / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"model" * 1000)
    (d / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"optim" * 3000)
    (d / "xtra_state.json").write_text('{"step": 4}')
    return d


def _verify(d: Path, expected: str | None, recorded: str | None = None) -> None:
    digests.verify(pafs.LocalFileSystem(), str(d), d.name, expected, lambda: recorded, where="run r1")


def test_each_file_is_hashed_by_its_path_and_the_checkpoint_digest_is_its_manifests(tmp_path):
    d = _checkpoint(tmp_path)
    found = digests.local_digests(str(d))
    assert found["ds/mp_rank_00_model_states.pt"] == hashlib.sha256(b"model" * 1000).hexdigest()
    assert set(found) == {"ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                          "xtra_state.json"}
    text = digests.manifest(found)
    assert digests.parse_manifest(text) == found
    assert digests.manifest_digest(found) == hashlib.sha256(text.encode()).hexdigest()


def test_ranks_files_merge_and_a_conflicting_path_is_refused():
    assert digests.merge_rank_digests([{"a": "1", "b": "2"}, {"b": "2", "c": "3"}, None]) == {
        "a": "1", "b": "2", "c": "3"}
    with pytest.raises(ValueError, match="two ranks wrote b"):
        digests.merge_rank_digests([{"b": "2"}, {"b": "9"}])


def test_the_saved_checkpoint_passes_and_every_kind_of_change_is_refused_by_name(tmp_path):
    d = _checkpoint(tmp_path)
    files = digests.local_digests(str(d))
    expected, recorded = digests.manifest_digest(files), digests.manifest(files)
    _verify(d, expected, recorded)  # unchanged: passes

    model = d / "ds" / "mp_rank_00_model_states.pt"
    original = model.read_bytes()
    model.write_bytes(original[:-1] + b"X")  # one byte
    with pytest.raises(UserError, match=r"checkpoint_step000000004 .*not the one this run saved "
                                        r"\(changed: ds/mp_rank_00_model_states.pt;.*run r1"):
        _verify(d, expected, recorded)
    model.write_bytes(original)

    (d / "ds" / "extra.pt").write_bytes(b"payload")
    with pytest.raises(UserError, match=r"\(added: ds/extra.pt;"):
        _verify(d, expected, recorded)
    (d / "ds" / "extra.pt").unlink()

    (d / "xtra_state.json").unlink()
    with pytest.raises(UserError, match=r"\(missing: xtra_state.json;"):
        _verify(d, expected, recorded)
    # without the manifest artifact the digest alone still refuses it
    with pytest.raises(UserError, match="differ from the recorded manifest"):
        _verify(d, expected, None)


def test_a_checkpoint_with_no_recorded_digest_is_refused_with_the_key_that_skips_the_check(tmp_path):
    d = _checkpoint(tmp_path)
    with pytest.raises(UserError, match=r"no SHA-256 recorded on run r1.*train.verify_checkpoints=false"):
        _verify(d, None)


def _closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_digest_tag_mlflow_cannot_take_waits_in_the_backlog_and_is_sent_later(tmp_path, monkeypatch):
    monkeypatch.setenv(backlog_mod.BACKLOG_DIR_ENV, str(tmp_path / "backlog"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = mlflow.MlflowClient(uri).create_run(
        mlflow.MlflowClient(uri).create_experiment("e")).info.run_id
    key = digests.tag_key("checkpoint_step000000004")
    assert runs.record_tag(_closed_port_uri(), run_id, key, "abc") is False  # MLflow down
    assert backlog_mod.Backlog(run_id, runs.TAGS_BACKLOG).tags == {key: "abc"}  # kept on disk
    assert not backlog_mod.backlog_path(run_id).exists()  # not in the controller's metrics file
    assert runs.recorded_tag(uri, run_id, key) == "abc"  # read from the backlog meanwhile
    assert runs.record_tag(uri, run_id, digests.tag_key("checkpoint_step000000008"), "def")  # back
    tags = mlflow.MlflowClient(uri).get_run(run_id).data.tags
    assert tags[key] == "abc" and tags[digests.tag_key("checkpoint_step000000008")] == "def"
    assert not backlog_mod.backlog_path(run_id, runs.TAGS_BACKLOG).exists()
