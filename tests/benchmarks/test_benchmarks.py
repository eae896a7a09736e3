"""The benchmark scripts keep working: each runs at its smallest size and writes the JSON it
promises (machine, config, every figure). No timed assertions: only structure, equality checks
the scripts make, and the FLOP formula of the GPU script against torch's own FLOP counter."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import attention, gpu_h200, mfu, run_all, train_step, zero_memory
from xtra_core.config import preset
from xtra_core.model import XTRA

MACHINE_KEYS = {"date_utc", "cpu", "logical_cores", "torch", "deepspeed", "load_avg_1_5_15_at_start"}


def read(path) -> dict:
    data = json.loads(path.read_text())
    assert MACHINE_KEYS <= set(data["machine"]), data["machine"].keys()
    assert data["table_markdown"].startswith("| ")
    return data


@pytest.mark.slow  # builds the product's DeepSpeed engines (fp32, bf16) in this process
def test_train_step_smoke_writes_every_variant_and_ratio(tmp_path):
    out = train_step.main(["--smoke", "--repeats", "1", "--results-dir", str(tmp_path)])
    data = read(tmp_path / "train_step_smoke.json")
    assert data["results"] == json.loads(json.dumps(out["results"], default=str))
    (r,) = data["results"]
    assert {"reference fp32", "product fp32", "reference bf16", "product bf16",
            "rung: model, for-loop AdamW fp32", "rung: model + fused AdamW bf16"} <= set(r["variants"])
    for name, v in r["variants"].items():
        assert v["images_per_cpu_s"] > 0 and v["images_per_s_wall_best"] > 0
        if name.startswith("product"):  # the trainer's DeepSpeed engine, with its MFU
            assert v["engine"]["bf16"] == ("bf16" in name) and v["engine"]["zero_stage"] == 2
            assert len(v["cpu_s_all"]) == 1 and 0 < v["mfu_cpu_time"] < 1 and 0 < v["mfu_wall"]
            assert v["achieved_flops_per_s"] == pytest.approx(
                r["train_flops_per_image"] * v["images_per_s"])
            continue
        assert len(v["all_runs"]["cpu"]) == 1
        assert v["fwd_bwd_cpu_s_median"] + v["optimizer_cpu_s_median"] == pytest.approx(
            v["cpu_s_per_step_median"])
    assert set(r["ratios_cpu_time"]) == set(r["ratios_wall_best"]) == {"fp32", "bf16"}
    assert set(data["goals"]) == {"smoke fp32", "smoke bf16"}


def test_attention_smoke_paths_agree_and_are_timed(tmp_path):
    attention.main(["--smoke", "--repeats", "1", "--no-flex", "--results-dir", str(tmp_path)])
    (r,) = read(tmp_path / "attention_smoke.json")["results"]
    paths = {"sdpa raster, mask per call", "sdpa block-major, cached mask",
             "sdpa block-major, 2 query chunks"}
    assert set(r["fwd_bwd_ms_median"]) == paths == set(r["fwd_ms_median"])
    for diffs in r["max_abs_diff_vs_cached_sdpa"].values():
        assert set(diffs) == {"output", "grad_q"} and max(diffs.values()) < 1e-5


def test_chunked_sdpa_equals_masked_sdpa_for_uneven_chunks():
    n, k2 = 5 * 4, 4  # 5 blocks cut into 3 chunks
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    slot = torch.arange(n) // k2
    mask = slot[None, :] <= slot[:, None]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(attention.chunked_sdpa(q, k, v, mask, 3, k2), dense, atol=1e-6)


@pytest.mark.slow  # builds the product's DeepSpeed engine twice in this process
def test_gpu_script_runs_tiny_on_cpu(tmp_path):
    gpu_h200.main(["--tiny", "--no-compile", "--steps", "1", "--warmup", "1", "--batch", "2",
                   "--results-dir", str(tmp_path)])
    data = read(tmp_path / "gpu_h200_cpu_tiny.json")
    assert set(data["variants"]) == {"checkpointing off, compile off", "checkpointing on, compile off"}
    assert data["attention"]["chosen"] == "sdpa"  # no FlexAttention backward on CPU
    assert data["bf16_matmul"]["flops_per_s"] > 0
    for v in data["variants"].values():
        assert 0 < v["mfu"] and v["achieved_flops_per_s"] == pytest.approx(
            data["train_flops_per_image"]["total"] * v["images_per_s"])
        assert v["engine"] == {"zero_stage": 2, "bf16": True, "compile": False,
                               "optimizer": v["engine"]["optimizer"]}  # the product's engine


@pytest.mark.parametrize("name", ["tiny", "vit_b16"])
def test_flop_formula_matches_torch_flop_counter_and_the_mask(name):
    """Matmul terms = torch's FLOP counter on the real forward (the conv runs on all N patches,
    the formula counts the n kept ones); attention terms = 4 * width * visible (q, k) pairs."""
    cfg = preset(name).model
    flops = mfu.train_flops_per_image(cfg)
    with torch.device("meta"):
        model = XTRA(cfg).to("meta")
        with FlopCounterMode(display=False) as fc:
            model.loss(torch.empty(1, 3, cfg.image_size, cfg.image_size))
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    linear = sum(flops[k] for k in ("encoder_matmuls", "projection", "decoder_matmuls", "heads"))
    # Linear layers without a bias (the projection's last, as the reference's) count as mm
    assert counts["aten.addmm"] + counts.get("aten.mm", 0) == pytest.approx(linear / 3)
    k2 = cfg.block_size**2
    n = cfg.num_patches - k2
    assert counts["aten.convolution"] == pytest.approx(flops["patch_embed"] / 3 * cfg.num_patches / n)
    slot = torch.arange(n) // k2
    pairs = int((slot[None, :] <= slot[:, None]).sum())
    assert flops["encoder_attention"] == pytest.approx(3 * cfg.encoder_depth * 4 * cfg.encoder_width * pairs)
    assert flops["decoder_attention"] == pytest.approx(3 * cfg.decoder_depth * 4 * cfg.decoder_width * pairs)
    assert flops["total"] == pytest.approx(sum(v for k, v in flops.items() if k != "total"))


def test_zero_memory_model_is_the_zero_paper_table():
    psi, n = 1000, 4
    assert zero_memory.memory_model(psi, n, 0, bf16=True)["state"] == 16 * psi
    assert zero_memory.memory_model(psi, n, 1, bf16=True)["state"] == (4 + 12 / n) * psi
    assert zero_memory.memory_model(psi, n, 2, bf16=True)["state"] == (2 + 14 / n) * psi
    assert zero_memory.memory_model(psi, n, 3, bf16=True)["state"] == 16 * psi / n
    assert zero_memory.memory_model(psi, n, 3, bf16=False)["state"] == 20 * psi / n


@pytest.mark.slow  # spawns 2 DeepSpeed ranks twice (~1 min)
def test_zero_memory_smoke_stage3_shards_the_state(tmp_path):
    zero_memory.main(["--smoke", "--precision", "bf16", "--stages", "0", "3",
                      "--results-dir", str(tmp_path)])
    data = read(tmp_path / "zero_memory_smoke.json")
    psi = data["config"]["parameters"]
    cases = {c["stage"]: c for c in data["cases"]}
    for stage, c in cases.items():
        assert len(c["ranks"]) == 2
        for r in c["ranks"]:
            m = r["after_backward"]
            assert m["state"] == m["parameters"] + m["gradients"] + m["optimizer"]
            assert r["peak_rss"] > r["rss_after_init"] > 0
            expected = 2 * psi / (2 if stage == 3 else 1)  # bf16 parameters, partitioned at 3
            assert m["parameters"] == pytest.approx(expected, rel=0.05)
    # the same two training steps whatever the stage: ZeRO changes where state lives, not maths
    assert cases[0]["ranks"][0]["losses"] == pytest.approx(cases[3]["ranks"][0]["losses"], rel=1e-2)
    assert data["goals"]["bf16"]["met"]
    assert data["goals"]["bf16"]["stage3_over_stage0_div_N"] == pytest.approx(1.0, abs=0.1)


@pytest.mark.slow  # as above
def test_run_all_smoke_of_the_gpu_script_writes_to_the_given_dir(tmp_path):
    assert run_all.main(["--only", "gpu_h200", "--smoke", "--results-dir", str(tmp_path)]) == 0
    assert (tmp_path / "gpu_h200_cpu_tiny.json").exists() or (tmp_path / "gpu_h200.json").exists()
