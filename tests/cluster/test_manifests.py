"""cluster/ YAML: every file parses; the launcher config passes Ray's own validation; the Kubernetes
objects pass kubernetes-validate (core) and the KubeRay v1 CRD schemas (vendored, strict); the
shapes agree with the configs they run and the pins with requirements.txt (seconds, offline)."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipelines.cli import build_parser
from pipelines.config_io import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
CRDS = Path(__file__).parent / "kuberay_crds"
K8S_VERSION = kubernetes_validate.latest_version()


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def requirement_pin(name: str) -> str:
    m = re.search(rf"^{re.escape(name)}(\[[^\]]*\])?==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)
    return m.group(2)


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_parses_to_mappings(path):
    assert docs(path) and all(isinstance(d, dict) for d in docs(path))


# --------------------------------------------------------------------------- cluster launcher

def launcher_config() -> dict:
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def ray_validate(cfg: dict) -> None:
    """What `ray up` checks before it calls AWS: defaults merged, then Ray's schema and rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_launcher_config_passes_rays_validation_and_a_typo_does_not():
    ray_validate(launcher_config())
    bad = launcher_config()
    bad["available_node_types"]["gpu_h14"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        ray_validate(bad)
    bad = launcher_config()
    bad["max_workers"] = 3  # below the sum of the groups' min_workers
    bad["available_node_types"]["cpu_decode"]["min_workers"] = 4
    with pytest.raises(ValueError, match="max_workers"):
        ray_validate(bad)


def test_launcher_shapes_fit_the_table1_configs():
    types = launcher_config()["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}  # the head runs no tasks or train workers
    assert "GPU" not in types["cpu_decode"]["resources"]
    for group, config in (("gpu_b16", "vit_b16_in1k"), ("gpu_h14", "vit_h14_in21k")):
        t = load_config(config, []).train
        res = types[group]["resources"]
        # the train workers take every logical CPU of a GPU node: decoding runs elsewhere
        assert res["CPU"] == res["GPU"] * t.cpus_per_worker
        assert types[group]["max_workers"] * res["GPU"] >= t.num_workers
    total = sum(t.get("max_workers", 0) for k, t in types.items() if k != "head")
    assert launcher_config()["max_workers"] == total


def test_launcher_exports_mlflow_and_uses_instance_profiles_not_keys():
    cfg = launcher_config()
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text
    for t in cfg["available_node_types"].values():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    assert any("mlflow server" in c for c in cfg["head_start_ray_commands"])
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        start = next(c for c in cmds if "ray start" in c)
        assert "export MLFLOW_TRACKING_URI=http://" in start


# --------------------------------------------------------------------------- image pins

def test_image_has_the_projects_pins():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+?)-py(\d)(\d+)-gpu$", dockerfile, re.M)
    assert base.group(1) == requirement_pin("ray")
    assert "pip install --no-cache-dir -r /tmp/run-requirements.txt" in dockerfile
    deepspeed = re.search(r"deepspeed==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation deepspeed=={deepspeed}" in dockerfile
    for path in KUBERAY.glob("ray*.yaml"):
        for d in docs(path):
            spec = d["spec"].get("rayClusterSpec", d["spec"])
            assert spec["rayVersion"] == requirement_pin("ray"), path.name


# --------------------------------------------------------------------------- Kubernetes

def strict(schema):
    """The CRD schema as the API server's strict field validation reads it: an object with
    `properties` (and no preserve-unknown-fields / additionalProperties) allows no other keys."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(x) for x in schema]
    return schema


# one validator per kind, built once (jsonschema.validate would re-check the 200 KB schema per call);
# CRD schemas are OpenAPI v3 structural schemas: JSON Schema draft 4 keywords
CRD_VALIDATORS = {
    kind: jsonschema.Draft4Validator(strict(json.loads((CRDS / f"ray.io_{plural}.v1.schema.json").read_text())))
    for kind, plural in (("RayCluster", "rayclusters"), ("RayJob", "rayjobs"))
}


def kuberay_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in docs(p)]


def crd_validate(doc: dict) -> None:
    error = jsonschema.exceptions.best_match(CRD_VALIDATORS[doc["kind"]].iter_errors(doc))
    if error is not None:
        raise error


def test_kuberay_custom_resources_match_the_v1_crd_schemas():
    crs = [(n, d) for n, d in kuberay_docs() if d["apiVersion"] == "ray.io/v1"]
    assert sorted(d["kind"] for _, d in crs) == ["RayCluster", "RayJob", "RayJob"]
    for name, d in crs:
        try:
            crd_validate(d)
        except jsonschema.ValidationError as e:
            raise AssertionError(f"{name}: {e.message} at {list(e.absolute_path)}") from None


def test_crd_validation_catches_a_misspelt_field_and_a_missing_required_one():
    job = next(d for _, d in kuberay_docs() if d["kind"] == "RayJob")
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        crd_validate(bad)
    bad = copy.deepcopy(job)
    del bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(jsonschema.ValidationError, match="'name' is a required property"):
        crd_validate(bad)


def test_core_objects_pass_kubernetes_validate():
    core = [(n, d) for n, d in kuberay_docs() if d["apiVersion"] != "ray.io/v1"]
    assert {d["kind"] for _, d in core} == {"ServiceAccount", "PersistentVolumeClaim", "Deployment",
                                            "Service"}
    for name, d in core:
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{name} {d['kind']}: {e}") from None
    bad = copy.deepcopy(next(d for _, d in core if d["kind"] == "Deployment"))
    bad["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def ray_pod_templates():
    """(file, group, pod template) of every head and worker group in the KubeRay resources."""
    for name, d in kuberay_docs():
        if d["apiVersion"] != "ray.io/v1":
            continue
        spec = d["spec"].get("rayClusterSpec", d["spec"])
        yield name, "head", spec["headGroupSpec"]["template"]
        for g in spec["workerGroupSpecs"]:
            yield name, g["groupName"], g["template"]


def test_ray_pod_templates_pass_kubernetes_validate_as_pod_templates():
    for name, group, template in ray_pod_templates():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": f"{name.removesuffix('.yaml')}-{group}"},
                        "template": template}
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


def test_ray_pods_have_shm_gpus_and_secret_credentials():
    for name, group, template in ray_pod_templates():
        pod = template["spec"]
        c = pod["containers"][0]
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm and {"name": shm[0]["name"], "mountPath": "/dev/shm"} in c["volumeMounts"], (name, group)
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        assert c["resources"]["requests"].get("nvidia.com/gpu") == gpus, (name, group)
        assert (gpus is not None) == group.startswith("gpu-"), (name, group)
        assert {"secretRef": {"name": "xtra-credentials", "optional": True}} in c["envFrom"]
        assert not any(re.search(r"KEY|SECRET|PASSWORD|TOKEN", e["name"]) for e in c.get("env", []))
        if gpus:  # logical CPUs = GPUs x train.cpus_per_worker (8): decoding stays off GPU pods
            assert int(c["resources"]["limits"]["cpu"]) == 8 * int(gpus)


@pytest.mark.parametrize("job_file,config", [("rayjob-vit-b16-in1k.yaml", "vit_b16_in1k"),
                                              ("rayjob-vit-h14-in21k.yaml", "vit_h14_in21k")])
def test_rayjob_runs_its_table1_config_on_exactly_its_gpus(job_file, config):
    job = docs(KUBERAY / job_file)[0]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.cli"]
    args = build_parser().parse_args(argv[3:])  # the product's own CLI accepts it
    assert args.command == "pretrain" and args.config == config
    cfg = load_config(args.config, args.sets).validate()
    assert cfg.train.global_batch_size == 2048 and cfg.train.use_gpu
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                   .get("nvidia.com/gpu", 0)) for g in groups)
    assert gpus == cfg.train.num_workers
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert env["env_vars"] == yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["env_vars"]
