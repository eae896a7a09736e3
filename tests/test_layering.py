"""The house's layering contract, read from the source (every import statement, including the
ones inside functions): arrows point down only and there is no import cycle.

- `xtra_core` imports the standard library, torch, numpy and safetensors, nothing else;
- `tune -> pipelines -> xtra_core`: no package imports one above it (nor benchmarks/tests);
- inside `pipelines`: `cli` -> jobs (`pretrain`, `probe`, `demo`, any new job folder) ->
  `data` / `tracking` / config reading (`config_io`, `config_validation`, which checks the probe's
  RandAugment spec with `data.probe_augment`) -> shared leaves (`errors`, `redaction`, `console`);
  only the `__main__`
  shims may import `cli`; `cli`, the one entry point, may import `tune` (for `xtra sweep`);
- no cycle between first-party modules;
- one home for MLflow: no module outside `pipelines/tracking/` imports mlflow (benchmarks/ may:
  they read a run's results back with their own client, as the tests do), and only
  `tracking.store` touches MLflow's process-wide tracking URI (`set_tracking_uri`).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("xtra_core", "pipelines", "tune", "benchmarks")
PACKAGE_LEVEL = {"xtra_core": 0, "pipelines": 1, "tune": 2, "benchmarks": 3, "tests": 4}
CORE_THIRD_PARTY = {"torch", "numpy", "safetensors"}
# inside pipelines: a unit (sub-package or top module) may import units of its level or below
PIPELINES_LEVEL = {"errors": 0, "console": 0, "redaction": 0, "data": 1, "tracking": 1, "config_io": 1,
                   "config_validation": 1, "cli": 3}
JOB_LEVEL = 2  # pretrain, probe, demo and any new job folder


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def first_party_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES if (ROOT / pkg).is_dir()
            for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module `path` imports (absolute names; `from a import b` is `a.b` when that is a
    module of ours, else `a`)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    return out


def graph() -> dict[str, set[str]]:
    mods = first_party_modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def pipelines_level(module: str) -> int:
    unit = module.split(".")[1] if module.count(".") >= 1 else ""
    return PIPELINES_LEVEL.get(unit, JOB_LEVEL)


def layering_violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, targets in g.items():
        top = m.split(".")[0]
        for t in targets:
            t_top = t.split(".")[0]
            if top == "xtra_core" and t_top != "xtra_core":
                if t_top not in CORE_THIRD_PARTY and t_top not in sys.stdlib_module_names:
                    bad.append(f"{m} imports {t} (xtra_core: stdlib, torch, numpy, safetensors only)")
            if m == "pipelines.cli" and t_top == "tune":
                continue  # the one entry point dispatches to every job, `xtra sweep` included
            if t_top in PACKAGE_LEVEL and PACKAGE_LEVEL[t_top] > PACKAGE_LEVEL.get(top, 99):
                bad.append(f"{m} imports {t}, a package above it")
            if top == "pipelines" == t_top and m != "pipelines" and t != "pipelines":
                if m.endswith(".__main__") and t == "pipelines.cli":
                    continue
                if pipelines_level(t) > pipelines_level(m):
                    bad.append(f"{m} (level {pipelines_level(m)}) imports {t} "
                               f"(level {pipelines_level(t)}): pipelines imports point down")
    return sorted(bad)


def mlflow_outside_tracking(g: dict[str, set[str]]) -> list[str]:
    """Modules outside `pipelines.tracking` (and benchmarks) that import mlflow."""
    return sorted(m for m, targets in g.items()
                  if any(t.split(".")[0] == "mlflow" for t in targets)
                  and m.split(".")[:2] != ["pipelines", "tracking"] and m.split(".")[0] != "benchmarks")


def set_tracking_uri_callers() -> list[str]:
    """First-party modules (benchmarks included) that call `set_tracking_uri`."""
    out = []
    for name, path in first_party_modules().items():
        tree = ast.parse(path.read_text(), str(path))
        if any(isinstance(n, ast.Attribute) and n.attr == "set_tracking_uri" for n in ast.walk(tree)):
            out.append(name)
    return sorted(out)


def import_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return cycles


def test_imports_point_down_the_house():
    assert layering_violations(graph()) == []


def test_no_import_cycle_between_first_party_modules():
    assert import_cycles(graph()) == []


def test_xtra_core_imports_no_ray_mlflow_deepspeed_or_pipelines():
    g = graph()
    core = {t.split(".")[0] for m, ts in g.items() if m.startswith("xtra_core") for t in ts}
    assert core & {"ray", "mlflow", "deepspeed", "pipelines", "tune", "boto3", "pyarrow"} == set()


def test_only_tracking_imports_mlflow():
    assert mlflow_outside_tracking(graph()) == []
    g = {"pipelines.probe.scores": {"mlflow.exceptions"}, "pipelines.tracking.store": {"mlflow"},
         "benchmarks.pretrain_quality": {"mlflow"}}
    assert mlflow_outside_tracking(g) == ["pipelines.probe.scores"]  # the checker catches a planted one


def test_no_process_wide_tracking_uri_outside_the_store():
    assert set_tracking_uri_callers() == ["pipelines.tracking.store"]


@pytest.mark.parametrize("edges, expected", [
    ({"xtra_core.model": {"ray"}}, "xtra_core.model imports ray"),
    ({"pipelines.data.stream": {"pipelines.pretrain.driver"}}, "pipelines.data.stream (level 1)"),
    ({"pipelines.pretrain.driver": {"pipelines.cli"}}, "pipelines.pretrain.driver (level 2)"),
    ({"pipelines.probe.driver": {"tune.sweep"}}, "pipelines.probe.driver imports tune.sweep"),
])
def test_the_contract_catches_an_upward_import(edges, expected):
    """The checker itself: each planted upward import is reported."""
    (violation,) = layering_violations(edges)
    assert violation.startswith(expected)


def test_the_contract_allows_main_shims_and_catches_a_planted_cycle():
    assert layering_violations({"pipelines.probe.__main__": {"pipelines.cli"}}) == []
    g = {"pipelines.a": {"pipelines.b"}, "pipelines.b": {"pipelines.c"}, "pipelines.c": {"pipelines.a"}}
    assert import_cycles(g) == [["pipelines.a", "pipelines.b", "pipelines.c"]]
