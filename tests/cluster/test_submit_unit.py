"""cluster/runtime_env.yaml and `xtra submit`'s own logic, without a cluster (seconds)."""

from __future__ import annotations

import re
import shlex
import zipfile
from pathlib import Path

import pytest
import yaml

from pipelines.cli import build_parser, main, split_job_args
from pipelines.errors import UserError
from pipelines.submit import Submission, job_entrypoint, load_runtime_env

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_ENV = ROOT / "cluster" / "runtime_env.yaml"
# pins of requirements.txt that the runtime env leaves to the node image (see its header)
IMAGE_PINS = {"torch", "ray"}
TEST_TOOLS = {"pytest", "hypothesis", "ruff", "moto", "kubernetes-validate", "scikit-learn", "flask-wtf",
              "wtforms"}  # test-only: never on a cluster


def pins(lines: list[str]) -> dict[str, str]:
    """{package name (extras dropped, lower case): version} of `name[extras]==version` lines."""
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;]+)", line)
        assert m, f"not an exact pin: {line!r}"
        out[m.group(1).lower()] = m.group(3)
    return out


def requirement_pins() -> dict[str, str]:
    return pins((ROOT / "requirements.txt").read_text().splitlines())


def test_runtime_env_pip_pins_are_the_projects_runtime_pins():
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    listed = pins(env["pip"]["packages"])
    expected = {k: v for k, v in requirement_pins().items() if k not in IMAGE_PINS | TEST_TOOLS}
    assert listed == expected


def test_runtime_env_holds_no_credentials():
    text = RUNTIME_ENV.read_text()
    env = yaml.safe_load(text)
    for key in env.get("env_vars", {}):
        assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", key, re.I), key
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # an AWS access key id


def make_project(root: Path) -> None:
    files = [
        "pipelines/cli.py", "pipelines/data/stream.py", "xtra_core/model.py", "configs/tiny.yaml",
        "cluster/runtime_env.yaml",
        ".git/HEAD", ".venv/bin/python", "pipelines/__pycache__/cli.cpython-311.pyc",
        "data/train/a/0.png", "checkpoints/step1/model.pt", "mlruns.db", "mlartifacts/1/x.bin",
        "mlruns/0/meta.yaml", "xtra_runs/r1/checkpoint_step2/a.pt", "demo_out/encoder.safetensors",
    ]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("x")
    (root / "cluster/runtime_env.yaml").write_text(RUNTIME_ENV.read_text())


def test_working_dir_package_keeps_the_code_and_leaves_out_data_runs_venvs_and_git(tmp_path):
    """Zip the project the way Ray uploads a working_dir, with the runtime env's excludes."""
    from ray._private.runtime_env.packaging import create_package

    proj = tmp_path / "proj"
    make_project(proj)
    env = load_runtime_env(None, proj)
    zpath = tmp_path / "pkg.zip"
    create_package(str(proj), zpath, include_gitignore=True, excludes=env["excludes"])
    names = {n for n in zipfile.ZipFile(zpath).namelist() if not n.endswith("/")}
    assert names == {"pipelines/cli.py", "pipelines/data/stream.py", "xtra_core/model.py",
                     "configs/tiny.yaml", "cluster/runtime_env.yaml"}


def test_working_dir_package_of_this_project_holds_all_its_code(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    excludes = yaml.safe_load(RUNTIME_ENV.read_text())["excludes"]
    zpath = tmp_path / "pkg.zip"
    create_package(str(ROOT), zpath, include_gitignore=True, excludes=excludes)
    names = set(zipfile.ZipFile(zpath).namelist())
    code = {str(f.relative_to(ROOT)) for pkg in ("xtra_core", "pipelines", "tune", "configs")
            for f in (ROOT / pkg).rglob("*") if f.suffix in (".py", ".yaml")
            and "__pycache__" not in f.parts}
    assert "pipelines/data/stream.py" in code
    assert code <= names, sorted(code - names)


def test_docker_build_leaves_out_what_the_runtime_env_does():
    ignore = (ROOT / "cluster" / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [x for x in ignore if x and not x.startswith("#")]
    assert ignore == yaml.safe_load(RUNTIME_ENV.read_text())["excludes"]


def test_load_runtime_env_sets_working_dir_and_no_pip_drops_packages(tmp_path):
    make_project(tmp_path)
    env = load_runtime_env(None, tmp_path)
    assert env["working_dir"] == str(tmp_path.resolve())
    assert env["pip"]["packages"]
    no_pip = load_runtime_env(None, tmp_path, pip=False)
    assert "pip" not in no_pip
    assert no_pip["env_vars"] == env["env_vars"] and no_pip["excludes"] == env["excludes"]


def test_load_runtime_env_names_a_missing_file_and_a_dir_that_is_not_the_project(tmp_path):
    with pytest.raises(UserError, match="nope.yaml not found"):
        load_runtime_env(tmp_path / "nope.yaml", ROOT)
    with pytest.raises(UserError, match="no pipelines/cli.py"):
        load_runtime_env(RUNTIME_ENV, tmp_path)


def test_load_runtime_env_rejects_a_field_ray_does_not_know(tmp_path):
    bad = tmp_path / "env.yaml"
    bad.write_text("pip: {packages: [numpy==2.4.6], pip_chek: true}\n")
    with pytest.raises(UserError, match="pip_chek"):
        load_runtime_env(bad, ROOT)


def test_entrypoint_runs_the_cli_subcommand_with_args_intact():
    args = ["--config", "configs/vit_b16_in1k.yaml", "--set", "train.run_name=a b", "--data", "s3://b/p"]
    ep = job_entrypoint("pretrain", args)
    assert shlex.split(ep) == ["python", "-m", "pipelines.cli", "pretrain", *args]
    with pytest.raises(UserError, match="pretrain, probe, sweep"):
        job_entrypoint("data", [])


def test_cli_passes_everything_after_double_dash_to_the_job():
    argv = ["submit", "sweep", "--address", "http://h:8265", "--no-pip", "--", "--config", "tiny",
            "--", "x"]
    head, job_args = split_job_args(argv)
    assert job_args == ["--config", "tiny", "--", "x"]
    args = build_parser().parse_args(head)
    assert (args.job_command, args.address, args.pip) == ("sweep", "http://h:8265", False)
    assert split_job_args(["pretrain", "--", "x"]) == (["pretrain", "--", "x"], [])


def test_submit_to_an_unreachable_address_is_one_clear_error(capsys):
    rc = main(["submit", "pretrain", "--address", "http://127.0.0.1:9", "--working-dir", str(ROOT),
               "--", "--config", "tiny"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot reach the Ray job server at http://127.0.0.1:9" in err


def test_follow_and_stop_commands_name_the_job():
    cmds = Submission("xtra-pretrain-1", "http://h:8265", "python -m pipelines.cli pretrain").commands()
    assert cmds["logs"] == "ray job logs --address http://h:8265 --follow xtra-pretrain-1"
    assert cmds["stop"] == "ray job stop --address http://h:8265 xtra-pretrain-1"


def test_image_and_runtime_env_leave_out_the_same_test_tools():
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    left_out = re.search(r"grep -v -E '\^\(([^)]*)\)' requirements.txt", dockerfile).group(1)
    assert set(left_out.split("|")) == TEST_TOOLS
