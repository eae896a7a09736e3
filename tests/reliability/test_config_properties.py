"""Property-based config tests (hypothesis): for every config key, values of the wrong type, out of
range, empty, huge and malformed either give a valid config or one ConfigError line naming the key;
every command (pretrain, probe, sweep, visualize) then ends in exit 2 with one line, never a
traceback, never starting Ray."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.cli import main as cli_main
from pipelines.config_io import load_config
from tests.reliability.conftest import record_figure
from tune.space import check_grid, parse_axes
from xtra_core.config import SECTIONS, ConfigError, preset

KEYS = sorted(f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(preset("tiny"), s)))
# keys that name places the CLI would create or contact: tried by the validation entry only
PLACES = {"train.storage_path", "mlflow.tracking_uri", "data.uri", "data.s3_endpoint"}

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**18]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, -1e-9]),
    st.text(max_size=20),
    st.sampled_from(["", " ", "..", "a/../b", "'", '"', "\\", "%", "@", "{", "[", "---", "null",
                     "x" * 5000, "1e-3", "0x10", "nan", "-inf", "s3://", "http://u:p@h:x"]),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=4),
    st.dictionaries(st.text(max_size=5), scalars, max_size=3),
)


def _as_set(key: str, value: object) -> str:
    """`key=<value as YAML flow text>` (what a user types after --set)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return f"{key}={text}"


def _check_outcome(key: str, set_item: str) -> str:
    """'ok' for a valid config, 'refused' for one ConfigError line that names the key."""
    try:
        load_config("tiny", [set_item])
    except ConfigError as e:
        msg = str(e)
        section, name = key.split(".", 1)
        assert "\n" not in msg, msg
        assert key in msg or f"{section}.{name!r}" in msg or f"{section}." in msg or "--set" in msg, (key, msg)
        return "refused"
    return "ok"


TRIED: dict[str, int] = {"tried": 0, "refused": 0, "ok": 0, "cli": 0}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=values)
def test_every_key_any_value_is_a_config_or_one_line_naming_the_key(key, value):
    outcome = _check_outcome(key, _as_set(key, value))
    TRIED["tried"] += 1
    TRIED[outcome] += 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), a=scalars, b=scalars)
def test_sweep_axes_of_any_values_are_checked_like_pretrain(key, a, b):
    texts = [yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
             for v in (a, b)]
    if any("," in t or ":" in t for t in texts):  # an axis's own separators
        return
    base = load_config("tiny")
    try:
        check_grid(base, parse_axes([f"{key}={texts[0]},{texts[1]}"]))
    except ConfigError as e:
        assert "\n" not in str(e) and key in str(e) or key.split(".")[0] + "." in str(e), str(e)


@pytest.mark.parametrize("command", ["pretrain", "probe", "sweep", "visualize"])
def test_each_command_ends_in_one_line_and_never_starts_ray(command, capsys, ray_must_not_start):
    seen = {"exit2": 0}

    @settings(max_examples=15, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(key=st.sampled_from([k for k in KEYS if k not in PLACES]), value=values)
    def run(key, value):
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)  # a relative path a value names lands in the tmp folder
            try:
                extra = {"sweep": ["--axis", "train.lr=1e-3"], "visualize": ["--out", "p.png"]}.get(command, [])
                code = cli_main([command, "--data", os.path.join(tmp, "none"), *extra,
                                 "--set", f"mlflow.tracking_uri=sqlite:///{tmp}/m.db",
                                 "--set", f"train.storage_path={tmp}/runs", "--set", _as_set(key, value)])
            finally:
                os.chdir(cwd)
        err = capsys.readouterr().err.strip()
        assert code == 2, (key, value, err[-2000:])
        assert "\n" not in err and err.startswith("xtra: error: ") and "Traceback" not in err, err[-2000:]
        seen["exit2"] += 1
        TRIED["tried"] += 1
        TRIED["cli"] += 1

    run()
    assert seen["exit2"] >= 15


def test_figures():
    """The property tests' count (run after them in the file); any mishandled input failed above."""
    if TRIED["tried"]:
        assert TRIED["refused"] > 0 and TRIED["ok"] > 0
        record_figure("config_properties", inputs_tried=TRIED["tried"], refused=TRIED["refused"],
                      accepted=TRIED["ok"], cli_runs=TRIED["cli"], mishandled=0)
