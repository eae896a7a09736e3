"""`train.bf16: auto`: the rule (hardware facts stubbed), the config key, the DeepSpeed config and
the resume check."""

from __future__ import annotations

import pytest

from pipelines.errors import UserError
from pipelines.pretrain.checkpoints import check_resume_config, checkpoint_state
from pipelines.pretrain.trainer import deepspeed_config
from xtra_core.config import ConfigError, build_config
from xtra_core.precision import Hardware, cpu_flags, local_precision, resolve_bf16

ZEN3 = frozenset("sse4_2 avx avx2 fma f16c".split())  # no native bf16
SAPPHIRE = frozenset("avx2 avx512f avx512_bf16 amx_tile amx_bf16".split())
ZEN4 = frozenset("avx2 avx512f avx512_bf16".split())


@pytest.mark.parametrize("hardware, bf16, reason", [
    (Hardware("cpu", cpu_flags=ZEN3), False, "auto: CPU without avx512_bf16/amx_bf16"),
    (Hardware("cpu", cpu_flags=ZEN4), True, "auto: avx512_bf16"),
    (Hardware("cpu", cpu_flags=SAPPHIRE), True, "auto: amx_bf16"),
    (Hardware("cpu"), False, "auto: CPU without avx512_bf16/amx_bf16"),  # no /proc/cpuinfo
    (Hardware("cuda", cuda_bf16=True, gpu_name="NVIDIA H100"), True, "auto: NVIDIA H100 bf16"),
    (Hardware("cuda", cuda_bf16=False, gpu_name="Tesla V100", cpu_flags=SAPPHIRE), False,
     "auto: Tesla V100 without bf16"),  # the GPU decides, not the host CPU
])
def test_auto_is_bf16_exactly_where_the_hardware_runs_it_natively(hardware, bf16, reason):
    p = resolve_bf16("auto", hardware)
    assert (p.bf16, p.reason) == (bf16, reason)
    assert p.describe() == f"{'bf16' if bf16 else 'fp32'} ({reason})"


def test_true_and_false_force_the_precision_on_any_hardware():
    for hw in (Hardware("cpu", cpu_flags=ZEN3), Hardware("cuda", cuda_bf16=True)):
        assert resolve_bf16(True, hw).describe() == "bf16 (train.bf16=true)"
        assert resolve_bf16(False, hw).describe() == "fp32 (train.bf16=false)"
    with pytest.raises(ValueError, match="train.bf16='yes'"):
        resolve_bf16("yes", Hardware())


def test_cpu_flags_are_read_from_the_cpuinfo_flags_line():
    text = "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t: none\n"
    assert cpu_flags(text) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags("processor: 0\n") == frozenset()


def test_train_bf16_defaults_to_auto_and_takes_true_false_or_auto_only():
    assert build_config("tiny").train.bf16 == "auto"
    assert build_config("tiny", None, {"train.bf16": True}).train.bf16 is True
    assert build_config("tiny", None, {"train.bf16": "auto"}).train.bf16 == "auto"
    for bad in ("yes", 1):
        with pytest.raises(ConfigError, match="train.bf16"):
            build_config("tiny", None, {"train.bf16": bad})


def test_deepspeed_config_resolves_auto_on_this_machine_and_keeps_forced_values():
    cfg = build_config("tiny")
    assert deepspeed_config(cfg)["bf16"]["enabled"] is local_precision("auto", False).bf16
    for forced in (True, False):
        cfg.train.bf16 = forced
        assert deepspeed_config(cfg)["bf16"]["enabled"] is forced


def test_resume_compares_the_resolved_precision():
    bf16_run = build_config("tiny", None, {"train.bf16": True, "train.run_name": "r"})
    state = checkpoint_state(bf16_run, 10, {})
    assert state["config"]["train.bf16"] is True
    fp32_now = build_config("tiny", None, {"train.bf16": False, "train.run_name": "r"})
    with pytest.raises(UserError, match=r"train.bf16=True -> False"):
        check_resume_config(fp32_now, state)
    assert check_resume_config(bf16_run, state) == []
    # a checkpoint written before train.bf16 was recorded resumes unchecked on that key
    old = {**state, "config": {k: v for k, v in state["config"].items() if k != "train.bf16"}}
    assert check_resume_config(fp32_now, old) == []
