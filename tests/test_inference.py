"""Decode mode (`prepare_for_decode`): same function as the reference forward, less memory, one compiled graph."""

from __future__ import annotations

import inspect

import pytest
import torch
from tiny_models import SMALL_CALIBRATION, load_tiny, token_batch
from transformers import CompileConfig

import rana_hf
from rana_hf import RaNAConfig, compress
from rana_hf.adapters import MEMBER, RaNALinear
from rana_hf.evaluation import compare_to_dense
from rana_hf.inference import _cache_argument, prepare_for_decode


def _adapted(path, method, allocation_mode):
    config = RaNAConfig(method=method, allocation=allocation_mode, flop_reduction=0.4, **SMALL_CALIBRATION)
    return compress(load_tiny(path), config, token_batch(16, 64, seed=1))


def _steps(model, ids, prompt):
    """Logits of a prefill of `prompt` tokens, then one decode step per remaining token."""
    out = model(input_ids=ids[:, :prompt], use_cache=True)
    cache, logits = out.past_key_values, [out.logits]
    for t in range(prompt, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{_cache_argument(model): cache})
        cache = out.past_key_values
        logits.append(out.logits)
    return logits


def _storage_bytes(model):
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("method,allocation_mode", [("teal", "global"), ("rana", "uniform")])
def test_decode_mode_computes_the_same_function_in_less_memory(tiny_base_dirs, arch, method, allocation_mode):
    model = _adapted(tiny_base_dirs[arch], method, allocation_mode)
    ids = token_batch(2, 12, seed=7)  # batch 2: decode steps of 2 tokens
    with torch.no_grad():
        expected = _steps(model, ids, prompt=8)
        before = _storage_bytes(model)
        info = prepare_for_decode(model)
        after = _storage_bytes(model)
        got = _steps(model, ids, prompt=8)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert info["layers"] > 0 and after <= before
    if method == "rana":  # rank adapters replace their dense weights, q/k/v stacked behind one router
        assert info["freed_bytes"] > 0 and after < before
        assert any(isinstance(m, RaNALinear) and m.role == MEMBER and m._decode for m in model.modules())
        # gate and up: one router launch (the second takes its codes), and one launch of their masked reads of `A`
        assert any(isinstance(m, RaNALinear) and m._decode and m._decode.router_takes for m in model.modules())
        assert any(isinstance(m, RaNALinear) and m._decode and m._decode.fused for m in model.modules())
        with pytest.raises(RuntimeError, match="freed by prepare_for_decode"):
            compare_to_dense(model, ids)
    assert prepare_for_decode(model)["layers"] == 0  # idempotent


def test_decode_dispatch_by_tokens(tiny_base_dirs, monkeypatch):
    """Steps of at most `kernel_tokens` tokens take the masked-GEMV op; larger steps and prefill the torch forward."""
    import rana_hf.inference as inference

    model = _adapted(tiny_base_dirs["llama"], "teal", "global")
    with pytest.raises(ValueError, match="kernel_tokens must be in"):
        prepare_for_decode(model, kernel_tokens=5)
    prepare_for_decode(model, kernel_tokens=1)
    calls, original = [], inference.masked_gemv

    def counting(x, *args, **kwargs):
        calls.append(x.numel() // x.shape[-1])
        return original(x, *args, **kwargs)

    masks, original_masks = [], inference.masked_inputs

    def counting_masks(x, threshold):
        masks.append(threshold.shape[0])
        return original_masks(x, threshold)

    monkeypatch.setattr(inference, "masked_gemv", counting)
    monkeypatch.setattr(inference, "masked_inputs", counting_masks)
    prepared = [m for m in model.modules() if getattr(m, "_decode", None) is not None]
    shared = [m for m in prepared if m._decode.takes]  # k/v and up: computed in their sibling's launch
    assert shared
    with torch.no_grad():
        _steps(model, token_batch(1, 10, seed=3), prompt=8)  # prefill of 8 tokens, then 2 steps of 1 token
        assert set(calls) == {1} and len(calls) == 2 * (len(prepared) - len(shared))
        # the prompt: one masking launch per group of layers reading one input, for all of them
        assert len(masks) == len(prepared) - len(shared) and sum(masks) == len(prepared)
        calls.clear()
        masks.clear()
        _steps(model, token_batch(2, 10, seed=3), prompt=8)  # steps of 2 tokens: over kernel_tokens
        assert calls == [] and len(masks) == 3 * (len(prepared) - len(shared))


def test_prepared_layers_share_nothing_compile_would_guard_as_aliases(tiny_base_dirs):
    """`torch.compile` checks, on every call, that each object reached along two paths is still the same object. The
    decode path must not create such aliases: no shared active-adapter list (PEFT hands one to every layer), no
    references from a layer's decode state to other modules, no forward bound on an MLP instance."""
    import dataclasses

    from rana_hf.inference import DecodeState

    model = _adapted(tiny_base_dirs["llama"], "teal", "global")
    prepare_for_decode(model)
    layers = [m for m in model.modules() if getattr(m, "_decode", None) is not None]
    # one active adapter: its name as a string (immutable, nothing to alias); several: a list of each layer's own
    assert all(m._active_adapter == "default" for m in layers)
    model.base_model.set_adapter(["default"])  # PEFT gives every layer a list again: still the right path
    assert all(m._active_adapter == ["default"] for m in layers)
    assert all(m._decode.runs(m, torch.zeros(1, m.in_features, dtype=m._decode.wt.dtype)) for m in layers)
    for layer in layers:
        state: DecodeState = layer._decode
        for field in dataclasses.fields(state):
            value = getattr(state, field.name)
            values = value if isinstance(value, tuple | list) else (value,)
            assert not any(isinstance(v, torch.nn.Module) for v in values), field.name
    mlps = [m for m in model.modules() if hasattr(m, "down_proj") and hasattr(m, "gate_proj")]
    assert mlps and all("forward" not in vars(m) and type(m).__name__.startswith("RaNAFused") for m in mlps)
    assert all(isinstance(m, type(load_tiny(tiny_base_dirs["llama"]).model.layers[0].mlp)) for m in mlps)


def test_prepared_model_with_adapters_disabled_is_dense(tiny_base_dirs):
    """Decode steps take the kernel path only while the prepared adapter is active: disabled, input adapters (which
    keep their dense weight) compute the dense model."""
    model = _adapted(tiny_base_dirs["llama"], "teal", "global")
    dense = load_tiny(tiny_base_dirs["llama"])
    ids = token_batch(1, 10, seed=5)
    prepare_for_decode(model)
    with torch.no_grad():
        adapted = _steps(model, ids, prompt=8)
        with model.disable_adapter():
            off = _steps(model, ids, prompt=8)
        expected = _steps(dense, ids, prompt=8)
    for a, b in zip(off, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted[-1], expected[-1])


@pytest.mark.parametrize("method,allocation_mode", [("teal", "global"), ("rana", "uniform")])
def test_decode_path_under_another_adapter_name(tiny_base_dirs, method, allocation_mode, monkeypatch):
    """The prepared path follows the adapter's own name (not PEFT's "default")."""
    import rana_hf.inference as inference

    config = RaNAConfig(method=method, allocation=allocation_mode, flop_reduction=0.4, **SMALL_CALIBRATION)
    model = compress(load_tiny(tiny_base_dirs["llama"]), config, token_batch(16, 64, seed=1), adapter_name="fast")
    ids = token_batch(1, 10, seed=6)
    with torch.no_grad():
        expected = _steps(model, ids, prompt=8)
        prepare_for_decode(model)
        calls, original = [], inference.masked_gemv
        monkeypatch.setattr(inference, "masked_gemv", lambda *a, **k: calls.append(1) or original(*a, **k))
        got = _steps(model, ids, prompt=8)
    assert calls  # the decode steps took the kernel op
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,allocation_mode", [("teal", "global"), ("rana", "uniform")])
@pytest.mark.parametrize("tokens", [1, 6])  # a decode step and a prompt
def test_group_members_on_another_input_compute_alone_and_leave_nothing(
    tiny_base_dirs, tokens, method, allocation_mode
):
    """q/k/v (and gate/up) share one launch only for one input tensor: called on copies, each computes its own
    output, and the owner's output is dropped by the last member (no tensor outlives the call)."""
    import rana_hf.inference as inference

    model = _adapted(tiny_base_dirs["llama"], method, allocation_mode)
    block = model.base_model.model.model.layers[0]
    groups = [
        [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj],
        [block.mlp.gate_proj, block.mlp.up_proj],
    ]
    x = torch.randn(1, tokens, block.self_attn.q_proj.in_features)
    with torch.no_grad():
        expected = [[layer(x) for layer in group] for group in groups]
        prepare_for_decode(model)
        assert all(layer._decode is not None for group in groups for layer in group)
        shared = [[layer(x) for layer in group] for group in groups]
        assert inference._PENDING == {}
        alone = [[group[0](x)] + [layer(x.clone()) for layer in group[1:]] for group in groups]
        assert inference._PENDING == {}
    for got in (shared, alone):
        for a, b in zip(sum(got, []), sum(expected, []), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prepare_needs_rana_layers(tiny_base_dirs):
    with pytest.raises(ValueError, match="no RaNA layers"):
        prepare_for_decode(load_tiny(tiny_base_dirs["llama"]))


@pytest.mark.parametrize("method,allocation_mode", [("rana", "uniform"), ("teal", "global")])
def test_decode_step_compiles_to_one_graph(tiny_base_dirs, method, allocation_mode):
    # rana: owner/member routers, rank and neuron layers; teal: input adapters stacked by input (q/k/v, gate/up)
    model = _adapted(tiny_base_dirs["llama"], method, allocation_mode)
    prepare_for_decode(model)
    base = model.base_model.model
    ids = token_batch(1, 10, seed=8)
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True  # transformers compiles the decode step on CUDA only by default
    torch._dynamo.reset()
    with torch.no_grad():
        settings = dict(max_new_tokens=5, do_sample=False, cache_implementation="static")
        eager = base.generate(ids, **settings, disable_compile=True)
        compiled = base.generate(ids, **settings, compile_config=compile_config)
    assert torch.equal(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode step did compile


def test_compiled_steps_over_kernel_tokens_mask_with_torch_ops(tiny_base_dirs, monkeypatch):
    """A compiled step of more tokens than the kernel takes masks with plain torch ops (inductor fuses them into the
    kernel that makes the input: the norm, or act(gate) * up) and not with the opaque masking op; same tokens as
    eager."""
    import rana_hf.inference as inference

    model = _adapted(tiny_base_dirs["llama"], "teal", "global")
    prepare_for_decode(model, kernel_tokens=1)
    base = model.base_model.model
    traced, original = [], inference.masked_inputs

    def recording(x, threshold):
        traced.append(torch.compiler.is_compiling())
        return original(x, threshold)

    monkeypatch.setattr(inference, "masked_inputs", recording)
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    ids = token_batch(2, 10, seed=8)  # steps of 2 tokens: over kernel_tokens
    with torch.no_grad():
        settings = dict(max_new_tokens=4, do_sample=False, cache_implementation="static")
        eager = base.generate(ids, **settings, disable_compile=True)
        compiled = base.generate(ids, **settings, compile_config=compile_config)
    assert torch.equal(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert traced and not any(traced)  # the masking op ran for the eager prompts only


def test_compiled_mask_has_the_input_shape():
    """The compiled path's mask: one tensor in x's own shape per segment (inductor fuses it into the norm that makes x;
    a stacked [S, ..., n] tensor split the norm into two kernels on the H200), equal to the reference's segment."""
    from rana_hf.inference import _mask
    from rana_hf.kernels import masked_inputs_reference

    x = torch.randn(2, 3, 16, dtype=torch.float16)
    thresholds = torch.rand(3, 16)
    expected = masked_inputs_reference(x, thresholds)
    for s in range(3):
        masked = _mask(x, thresholds[s])
        assert masked.shape == x.shape and masked.dtype == x.dtype
        assert torch.equal(masked, expected[s])


@pytest.mark.parametrize("method,allocation_mode", [("rana", "uniform"), ("teal", "global")])
def test_compiled_prefill_of_a_prepared_model_matches_eager(tiny_base_dirs, method, allocation_mode):
    """A prompt through the whole forward compiled with `fullgraph=True` (as `bench_prefill(compiled=True)` and serving
    stacks run it) traces the prepared layers in one graph (masks by `_mask`, groups shared through `_PENDING`) and
    gives eager's logits."""
    model = _adapted(tiny_base_dirs["llama"], method, allocation_mode)
    prepare_for_decode(model)
    base = model.base_model.model
    ids = token_batch(1, 24, seed=3)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() leaves the counters of earlier tests
    with torch.no_grad():
        eager = base(input_ids=ids, use_cache=False).logits
        logits = lambda i: base(input_ids=i, use_cache=False).logits  # noqa: E731
        compiled = torch.compile(logits, backend="aot_eager", fullgraph=True)(ids)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_rank_prefill_multiplies_each_router_group_once(tiny_base_dirs, monkeypatch):
    """A prepared rank adapter's prompt: one product with the stacked `A^T` per router (q, k and v together), and the
    reference forward's code cache is not used; the logits are the reference's."""
    model = _adapted(tiny_base_dirs["llama"], "rana", "uniform")
    ids = token_batch(1, 12, seed=4)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        prepare_for_decode(model)
        products = []
        matmul = torch.matmul
        monkeypatch.setattr(torch, "matmul", lambda a, b: products.append(tuple(b.shape)) or matmul(a, b))
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    routers = [m for m in model.modules() if isinstance(m, RaNALinear) and m.role != MEMBER]
    stacked = {tuple(m._decode.wt.shape) for m in routers}
    assert sum(shape in stacked for shape in products) == len(routers)


def test_bench_shapes():
    """`rana-hf bench --shape`: the configs the speed goals name (built here on the meta device: no GPU needed)."""
    from transformers import AutoModelForCausalLM

    from rana_hf.benchmark import shape_config

    gemma = shape_config("gemma-3-4b", num_hidden_layers=2)
    assert (gemma.hidden_size, gemma.intermediate_size, gemma.head_dim) == (2560, 10240, 256)
    assert (gemma.num_attention_heads, gemma.num_key_value_heads) == (8, 4)
    assert gemma.hidden_activation == "gelu_pytorch_tanh" and gemma.layer_types == ["full_attention"] * 2
    assert shape_config("gemma-3-4b").num_hidden_layers == 34 and shape_config("llama-2-7b").num_hidden_layers == 32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gemma)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    with pytest.raises(ValueError, match="unknown shape"):
        shape_config("gpt-9")


def test_cache_argument_follows_the_forward_signature(tiny_base_dirs):
    from rana_hf.inference import _cache_argument

    model = load_tiny(tiny_base_dirs["llama"])
    parameters = inspect.signature(model.forward).parameters
    assert _cache_argument(model) == ("cache" if "cache" in parameters else "past_key_values")
    assert _cache_argument(model) in parameters


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,allocation_mode", [("rana", "uniform"), ("teal", "global")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_kernels_on_gpu(tiny_base_dirs, dtype, method, allocation_mode):
    pytest.importorskip("triton")
    config = RaNAConfig(method=method, allocation=allocation_mode, flop_reduction=0.4, **SMALL_CALIBRATION)
    model = compress(load_tiny(tiny_base_dirs["llama"], dtype=dtype).cuda(), config, token_batch(16, 64, seed=1))
    ids = token_batch(2, 12, seed=7).cuda()
    with torch.no_grad():
        expected = _steps(model, ids, prompt=8)  # reference path
        prepare_for_decode(model)
        got = _steps(model, ids, prompt=8)  # decode steps through the Triton kernel
        for a, b in zip(got[1:], expected[1:], strict=True):
            assert float((a.float() - b.float()).norm() / b.float().norm()) < 0.05
        base = model.base_model.model
        compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
        settings = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
        settings |= dict(return_dict_in_generate=True, output_logits=True)
        eager = base.generate(ids[:1], **settings, disable_compile=True)
        compiled = base.generate(ids[:1], **settings, compile_config=compile_config)
        assert compiled.sequences.shape == eager.sequences.shape
        # greedy tokens of a tiny random model part ways at near ties (compiled kernels round differently), so compare
        # the steps both runs take from the same tokens: the prompt's logits and the first compiled decode step's
        assert torch.equal(compiled.sequences[:, : ids.shape[1] + 1], eager.sequences[:, : ids.shape[1] + 1])
        for a, b in zip(compiled.logits[:2], eager.logits[:2], strict=True):
            assert float((a.float() - b.float()).norm() / b.float().norm()) < 0.05
        # the host-sync-free loop with CUDA graphs (its steps are the compiled forward compared above): the prompt's
        # token must match; later ones may part ways at near ties, as above
        from rana_hf.inference import greedy_generate

        base.generation_config.eos_token_id = None
        looped = greedy_generate(base, ids, 6)
        reference = base.generate(ids, **(settings | dict(return_dict_in_generate=False)), disable_compile=True)
        assert looped.shape == reference.shape
        assert torch.equal(looped[:, : ids.shape[1] + 1], reference[:, : ids.shape[1] + 1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rank_decode_kernel_against_the_same_mask(tiny_base_dirs, dtype, tokens, monkeypatch):
    """Each prepared rank adapter's decode step (router codes `B x` by the kernel with every input kept, gate and up
    in one launch; then the kernel's masked read of `A`, gate and up again in one launch) against a float32 product
    with the mask taken from the same codes: no component can flip, so the outputs agree to the output dtype's
    rounding. Members on their owner's input take their columns of the owner's one launch; up takes its columns of
    gate's."""
    pytest.importorskip("triton")
    from rana_hf.inference import ROUTER_KERNEL
    from rana_hf.kernels import triton_gemv
    from rana_hf.kernels.ops import masked_gemv

    config = RaNAConfig(method="rana", allocation="uniform", flop_reduction=0.4, **SMALL_CALIBRATION)
    model = compress(load_tiny(tiny_base_dirs["llama"], dtype=dtype).cuda(), config, token_batch(16, 64, seed=1))
    prepare_for_decode(model)
    owners = [m for m in model.modules() if isinstance(m, RaNALinear) and m.role != MEMBER and m._decode is not None]
    assert owners
    generator = torch.Generator(device="cuda").manual_seed(0)
    inputs, firsts = {}, {}  # router group -> the input its layers are called on, its first layer's state
    cases = []
    for owner in owners:
        state = owner._decode
        key = state.router_group if state.router_group is not None else id(owner)
        if key not in inputs:
            inputs[key] = torch.randn(tokens, owner.in_features, device="cuda", generator=generator).to(dtype)
            firsts[key] = state
        x = inputs[key]
        if firsts[key].routers is not None:  # the step's own router launch, the same arithmetic
            stacked, zeros = firsts[key].routers
            codes = masked_gemv(x, stacked, zeros)[:, state.router_columns[0] : state.router_columns[1]]
        else:
            codes = torch.nn.functional.linear(x, state.router)
        keep = codes.float().abs() >= state.threshold.float()
        expected = (codes.float() * keep) @ state.wt.float()  # [tokens, sum of the group's widths]
        group = [owner] + [m for m in model.modules() if isinstance(m, RaNALinear) and m._owner[:1] == [owner]]
        cases.append((group, x, expected, keep.float().mean()))
    assert ROUTER_KERNEL and all(s.router_group is not None for s in firsts.values())
    launches = []
    kernel = triton_gemv.masked_gemv_triton
    monkeypatch.setattr(triton_gemv, "masked_gemv_triton", lambda *a, **k: launches.append(1) or kernel(*a, **k))
    with torch.no_grad():
        for group, x, expected, _ in cases:
            for layer in group:  # expected: the owner's `A^T`, its members' columns side by side
                start, end = layer._decode.columns if layer is not group[0] else (0, layer.out_features)
                got = layer(x)
                assert got.dtype == dtype
                scale = float(expected.abs().max())  # rounding of the output to the dtype, nothing more
                torch.testing.assert_close(got.float(), expected[:, start:end], rtol=1e-2, atol=1e-3 * scale)
    # one launch per router group (gate and up together) and one of `A` per owner (members took their columns),
    # gate and up again together
    fused = [owner for owner in owners if owner._decode.fused is not None]
    assert fused and len(launches) == len(owners) + len(firsts) - len(fused)
    assert len(firsts) < len(owners)  # gate and up shared a launch
    assert 0 < float(torch.stack([case[3] for case in cases]).mean()) < 1  # components were masked and kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compensated_decode_kernel_against_the_same_mask(tiny_base_dirs, dtype, tokens):
    """A prepared compensated layer (its masked product by the kernel, stacked with its siblings', plus its low-rank
    term; 8 tokens: the longer-input path) against a float32 product with the same mask."""
    pytest.importorskip("triton")
    from rana_hf.adapters import RaNACompensatedLinear, compensated

    config = RaNAConfig(method="compensated", allocation="uniform", flop_reduction=0.4, **SMALL_CALIBRATION)
    with compensated.offered_ranks((2,)):
        model = compress(load_tiny(tiny_base_dirs["llama"], dtype=dtype).cuda(), config, token_batch(16, 64, seed=1))
    layers = [m for m in model.modules() if isinstance(m, RaNACompensatedLinear)]
    assert len(layers) == len(model.peft_config["default"].plan)
    references = {}
    for layer in layers:  # before preparing: the float32 weights of the reference
        down, up = (c["default"].detach().float() for c in (layer.rana_hf_B, layer.rana_hf_A))
        references[layer] = (layer.base_layer.weight.detach().float(), down, up)
    prepare_for_decode(model)
    assert all(layer._decode.compensation is not None for layer in layers)
    assert any(layer._decode.stacked is not None for layer in layers)
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for layer in layers:  # each alone on its input: a stacked member computes its own columns
            x = torch.randn(tokens, layer.in_features, device="cuda", generator=generator).to(dtype)
            weight, down, up = references[layer]
            keep = x.float().abs() >= layer._decode.threshold.float()
            kept = x.float() * keep
            expected = kept @ weight.T + ((x.float() - kept) @ down.T) @ up.T
            got = layer(x)
            assert got.dtype == dtype
            scale = float(expected.abs().max())
            torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-3 * scale)


def test_dense_prefill_runs_the_prompt_densely(tiny_base_dirs):
    """`dense_prefill=True`: the prompt through the dense weights of input adapters, decode steps masked."""
    model = _adapted(tiny_base_dirs["llama"], "teal", "global")
    ids = token_batch(1, 10, seed=4)
    with torch.no_grad():
        adapted = _steps(model, ids, prompt=8)
        dense = load_tiny(tiny_base_dirs["llama"])(input_ids=ids[:, :8]).logits
        prepare_for_decode(model, dense_prefill=True)
        got = _steps(model, ids, prompt=8)
        flops = rana_hf.measure_flops(model, ids)  # counting FLOPs still runs the adapted path
    torch.testing.assert_close(got[0], dense, rtol=1e-5, atol=1e-5)  # the prompt: the dense model
    assert not torch.allclose(got[0], adapted[0])
    assert flops["reduction"] > 0.2


def _hf_greedy(model, ids, new_tokens, **kwargs):
    settings = dict(max_new_tokens=new_tokens, do_sample=False, cache_implementation="static", disable_compile=True)
    return model.generate(ids, attention_mask=torch.ones_like(ids), **settings, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_greedy_generate_matches_generate(tiny_base_dirs, arch):
    """The host-sync-free greedy loop gives `generate`'s greedy tokens: dense, and adapted and prepared."""
    from rana_hf.inference import greedy_generate

    dense = load_tiny(tiny_base_dirs[arch])
    dense.generation_config.eos_token_id = None  # no end token: every row runs to max_new_tokens
    ids = token_batch(2, 10, seed=11)
    with torch.no_grad():
        assert torch.equal(greedy_generate(dense, ids, 6), _hf_greedy(dense, ids, 6))
    model = _adapted(tiny_base_dirs[arch], "teal", "global")
    prepare_for_decode(model)
    base = model.base_model.model
    base.generation_config.eos_token_id = None
    expected = _hf_greedy(base, ids, 6)
    assert torch.equal(greedy_generate(base, ids, 6), expected)
    assert torch.equal(greedy_generate(base, ids, 6), expected)  # the cached cache and step, reset, same tokens
    cache = base._rana_greedy[2]
    assert torch.equal(greedy_generate(base, ids, 3), expected[:, :13]) and base._rana_greedy[2] is cache  # shorter
    assert torch.equal(greedy_generate(base, ids[:1], 4), expected[:1, :14])  # another shape: a new cache


def test_greedy_generate_stops_like_generate_at_end_tokens(tiny_base_dirs):
    """Rows that end continue with the pad token; decoding stops at the step where the last row ended, even when the
    host only checks every few steps."""
    from rana_hf.inference import greedy_generate

    model = load_tiny(tiny_base_dirs["llama"])
    model.generation_config.eos_token_id = None
    ids = token_batch(2, 10, seed=11)
    free = greedy_generate(model, ids, 12)
    end = int(free[0, 12])  # row 0's third new token: row 0 ends there, row 1 when (if) it produces it
    expected = _hf_greedy(model, ids, 12, eos_token_id=end, pad_token_id=0)
    for check_every in (1, 5, 16):
        out = greedy_generate(model, ids, 12, eos_token_id=end, pad_token_id=0, check_every=check_every)
        assert torch.equal(out, expected), check_every
    assert out[0, 12] == end and bool((out[0, 13:] == 0).all())  # row 0 ended: pad tokens after its end token
    one = greedy_generate(model, ids[:1], 12, eos_token_id=end, pad_token_id=0, check_every=5)
    assert one.shape == (1, 13) and torch.equal(one, _hf_greedy(model, ids[:1], 12, eos_token_id=end, pad_token_id=0))


def test_greedy_generate_compiles_one_step_graph(tiny_base_dirs):
    from rana_hf.inference import greedy_generate

    model = _adapted(tiny_base_dirs["llama"], "teal", "global")
    prepare_for_decode(model)
    base = model.base_model.model
    base.generation_config.eos_token_id = None
    ids = token_batch(1, 10, seed=12)
    torch._dynamo.reset()
    out = greedy_generate(base, ids, 5, compile=True, compile_options={"backend": "aot_eager", "fullgraph": True})
    assert torch.equal(out, _hf_greedy(base, ids, 5))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def test_greedy_generate_rejects_bad_input(tiny_base_dirs):
    from rana_hf.inference import greedy_generate

    model = load_tiny(tiny_base_dirs["llama"])
    with pytest.raises(ValueError, match="batch, prompt"):
        greedy_generate(model, torch.zeros(5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="must be positive"):
        greedy_generate(model, token_batch(1, 4, seed=0), 0)


def test_greedy_generate_lets_the_model_go(tiny_base_dirs):
    """The reused cache and step live on the model: nothing outside it keeps the model alive."""
    import gc
    import weakref

    from rana_hf.inference import greedy_generate

    model = load_tiny(tiny_base_dirs["llama"])
    greedy_generate(model, token_batch(1, 6, seed=0), 2)
    assert model._rana_greedy is not None
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


class _Greedy:
    """Greedy decode steps of `model` over one static cache, the step compiled with `compile_kwargs` (`torch.compile`
    arguments) or eager when there are none; `tokens(ids)` empties the cache and decodes `steps` tokens after `ids`."""

    def __init__(self, model, length=16, **compile_kwargs):
        from transformers import StaticCache

        from rana_hf.inference import greedy_step

        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.forward = greedy_step(model, self.cache)
        self.step = torch.compile(self.forward, fullgraph=True, **compile_kwargs) if compile_kwargs else self.forward
        self.positions = torch.arange(length)

    def tokens(self, ids, steps=3):
        self.cache.reset()
        prompt = ids.shape[1]
        tokens = [self.forward(ids, self.positions[:prompt])]  # the prompt, eagerly
        for i in range(prompt, prompt + steps):
            tokens.append(self.step(tokens[-1], self.positions[i : i + 1]))  # each call writes its cache position
        return torch.cat(tokens[1:], dim=1)


@pytest.mark.parametrize("method,allocation_mode", [("rana", "uniform"), ("teal", "global")])
def test_decode_guard_filter_leaves_out_only_what_prepared_states_hold(tiny_base_dirs, method, allocation_mode):
    from rana_hf.inference import decode_guard_filter

    model = _adapted(tiny_base_dirs["llama"], method, allocation_mode)
    prepare_for_decode(model)
    base = model.base_model.model
    seen = []

    def recording(entries):
        keep = decode_guard_filter(entries)
        seen.extend(zip([entry.name for entry in entries], keep, strict=True))
        return keep

    ids = token_batch(1, 6, seed=3)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = _Greedy(base).tokens(ids)
        got = _Greedy(base, backend="eager", options={"guard_filter_fn": recording}).tokens(ids)
    assert torch.equal(got, expected)
    dropped = [name for name, keep in seen if not keep]
    kept = [name for name, keep in seen if keep]
    assert dropped and all("._decode." in name and "._decode.plan" not in name for name in dropped)
    prepared = sum(1 for m in base.modules() if getattr(m, "_decode", None) is not None)
    assert len({name for name in kept if name.endswith("._decode.plan")}) == prepared  # every state read: its plan
    assert not any("._decode." in name and "._decode.plan" not in name for name in kept)


def test_a_changed_state_recompiles_the_filtered_step(tiny_base_dirs):
    from rana_hf.inference import decode_compile_options

    model = _adapted(tiny_base_dirs["llama"], "rana", "uniform")
    prepare_for_decode(model)
    base = model.base_model.model
    compiles = []

    def counting(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    ids = token_batch(1, 6, seed=3)
    options = decode_compile_options(cuda_graphs=False)["options"]
    torch._dynamo.reset()
    with torch.no_grad():
        greedy = _Greedy(base, backend=counting, options=options)
        greedy.tokens(ids)
        assert len(compiles) == 1 and torch.equal(greedy.tokens(ids), _Greedy(base).tokens(ids))  # guards pass
        state = base.model.layers[0].mlp.gate_proj._decode
        plan = state.plan
        state.threshold = state.threshold + 1.0  # a tensor the filter does not guard, through its owner's plan
        assert state.plan != plan  # any field assigned: a plan no state had before
        got = greedy.tokens(ids)
        expected = _Greedy(base).tokens(ids)
    assert len(compiles) == 2  # the plan's guard failed: compiled again, for the new tensor
    assert torch.equal(got, expected)


def test_compile_config_is_what_generate_takes():
    from rana_hf.inference import compile_config, decode_guard_filter

    config = compile_config()
    assert config.fullgraph and config.mode is None
    assert config.options == {"guard_filter_fn": decode_guard_filter, "triton.cudagraphs": True}
    assert config.to_dict()["options"]["guard_filter_fn"] is decode_guard_filter  # transformers deep-copies it
