"""The reference path on CUDA: calibration, forward in half precision, FLOP counting and loading follow the device."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tiny_models import load_tiny, token_batch

from rana_hf import RaNAConfig, compress, measure_flops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compress_and_reload_on_cuda(tiny_base_dirs, arch, dtype, tmp_path):
    config = RaNAConfig(calibration_tokens=1024, calibration_seq_len=64, method="rana")
    calibration = token_batch(16, 64, seed=1)
    heldout = token_batch(4, 64, seed=2).cuda()
    model = load_tiny(tiny_base_dirs[arch], dtype=dtype).to("cuda")
    rana = compress(model, config, calibration=calibration)
    params = {p.device.type for p in rana.parameters()} | {b.device.type for b in rana.buffers()}
    assert params == {"cuda"}
    with torch.no_grad():
        out = rana(input_ids=heldout).logits
    assert out.device.type == "cuda" and out.dtype == dtype and torch.isfinite(out).all()
    assert abs(measure_flops(rana, heldout)["reduction"] - 0.44) < 0.08

    rana.save_pretrained(tmp_path)
    base = load_tiny(tiny_base_dirs[arch], dtype=dtype).to("cuda")
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=heldout).logits, out)

    # The same adapter on the CPU in float32 computes the same function, up to rounding and the components whose code
    # lies within rounding of its threshold: the mask is discontinuous, so on these tiny random models even float32 vs
    # float64 on the CPU differs by 0.5% (Llama) to 1.8% (Gemma) in the logits. Kept rates must agree closely.
    cpu_reference = PeftModel.from_pretrained(load_tiny(tiny_base_dirs[arch]), tmp_path).eval()
    with torch.no_grad():
        expected = cpu_reference(input_ids=heldout.cpu()).logits
    error = float((out.float().cpu() - expected).norm() / expected.norm())
    assert error < (0.05 if dtype == torch.float32 else 0.15), error
    cpu_flops = measure_flops(cpu_reference, heldout.cpu())["reduction"]
    assert abs(measure_flops(reloaded, heldout)["reduction"] - cpu_flops) < (0.005 if dtype == torch.float32 else 0.02)


def test_bench_prefill_times_gpu_and_host(tiny_base_dirs):
    from rana_hf.benchmark import bench_prefill, profile_prefill

    model = load_tiny(tiny_base_dirs["llama"], dtype=torch.float16).to("cuda")
    timed = bench_prefill(model, tokens=32, repeats=3)
    assert set(timed) == {"ms", "host_ms"} and timed["ms"] > 0 and timed["host_ms"] > 0
    profiled = profile_prefill(model, tokens=32)
    assert profiled["kernel_ms"] > 0 and profiled["top"] and all(op["ms"] > 0 for op in profiled["top"])
    assert profiled["host_ms"] > 0 and len(profiled["top_host"]) > 0
    compiled = bench_prefill(model, tokens=32, repeats=3, compiled=True)  # one CUDA graph: the host issues little
    assert compiled["ms"] > 0 and compiled["host_ms"] < timed["host_ms"]


def test_profile_step_finds_the_kernels_of_a_step(tiny_base_dirs):
    from rana_hf.benchmark import profile_step

    model = load_tiny(tiny_base_dirs["llama"], dtype=torch.float16).to("cuda")
    (row,) = profile_step(model, batch_sizes=(1,), prompt_len=8, steps=2)
    assert row["kernel_us"] > 0 and row["kernels"] > 0 and row["top"] and row["top"][0]["us"] > 0
