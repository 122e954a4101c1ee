"""Residual-stream rotation (LaRoSA's construction): the masks of q/k/v and gate/up act in principal axes, with no
rotation computed at their inputs.

A Llama-style block reads the residual stream `h` through RMSNorms, `x = g * h / rms(h)`, and writes into it with o and
down. Carry the stream rotated, `r = Q^T h` (`Q` orthogonal, [n, n]): `rms(r) = rms(h)`, so with the norm's weight `g`
folded into the readers (`W <- W diag(g) Q`, the norm's weight set to ones) every reader sees `Q^T h / rms(h)`, its
input in the principal axes of the stream, and computes what it computed before; the writers write rotated
(`W_o <- Q^T W_o`, `W_down <- Q^T W_down`, their biases alike). The model is the same function, and an input mask on
q/k/v or gate/up (`teal`'s magnitude adapter, or any other kind) now drops principal components: an input-masked GEMV
with the existing kernels, no rotation at run time.

Where the basis changes, the stream is turned once: `r <- (Q_prev^T Q) r` before the first block of a basis (`Q` alone
before the first block, from the embedding's axes), and `h = Q_last r` before the final norm. Each turn costs `n^2`
MACs per token, counted in every budget and in the measured FLOPs:
- `residual_rotation="layer"`: a basis per decoder layer from the second moment of its normalised inputs (attention
  and MLP summed), `L + 1` turns;
- `residual_rotation="model"`: one basis for the whole stream from the same moments summed over layers, 2 turns.

The turns are `ResidualRotation` modules, children of the first decoder layer of their basis (`residual_rotation`),
applied by forward pre-hooks on that layer (and on the final norm). Their `Q` ([n, n], float32) travels with the
adapter; the base weights are rotated when the adapter is injected (and put back exactly on `unload`, from a copy kept
on the CPU). A standalone checkpoint stores the rotated weights instead.

Gemma 2/3 cannot be carried rotated for free: they normalise each sublayer's output with its own elementwise weight
before adding it to the stream, and an elementwise weight does not commute with a rotation, so both outputs would have
to be turned at run time, two more `n^2` per layer. Gemma 1 scales by `1 + weight`. Both are refused; the run-time
rotation (`method="rotated"`) serves them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import RESIDUAL_ROTATIONS
from .layers import active_counter

logger = logging.getLogger(__name__)

# Architectures whose blocks read the stream through `weight * x / rms(x)` norms and write it with o and down alone.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTRIBUTE = "residual_rotation"  # no `rana_hf_` in it: loaders rename the tuner prefix's first match
PLACEHOLDER = float("nan")  # a basis not set or loaded yet: never used silently
_READERS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
_SANDWICH = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def _linear(block: nn.Module, path: str) -> nn.Linear:
    module = block.get_submodule(path)
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return module


def decoder_parts(model: nn.Module, allow_meta: bool = False) -> tuple[list[nn.Module], nn.Module]:
    """(decoder layers, final norm) of a model whose residual stream can be rotated; a clear error for any other.

    Args:
        model: a transformers causal LM (a `PeftModel`'s base model is looked through).
        allow_meta: accept weights on the meta device (a skeleton about to be loaded).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        why = (
            "Gemma 2/3 normalise each sublayer's output with an elementwise weight before it joins the residual "
            "stream, which does not commute with a rotation (the outputs would have to be turned at run time, 2 n^2 "
            "MACs more per layer), and Gemma 1 scales by 1 + weight"
            if model_type and model_type.startswith("gemma")
            else "its block layout is not one rana_hf knows how to rotate"
        )
        raise ValueError(
            f"residual_rotation supports model types {SUPPORTED_MODEL_TYPES}, not {model_type!r}: {why}. Use "
            "residual_rotation=None (method='rotated' rotates at the inputs at run time instead)."
        )
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers) or not isinstance(norm, nn.Module):
        raise ValueError(
            f"residual_rotation: could not find the decoder layers and final norm of {type(inner).__name__}"
        )
    for index, block in enumerate(layers):
        if any(hasattr(block, name) for name in _SANDWICH):
            raise ValueError(
                f"residual_rotation: decoder layer {index} has sandwich norms ({_SANDWICH}); not supported"
            )
        for norm_name, readers in _READERS:
            weight = getattr(getattr(block, norm_name, None), "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
                raise ValueError(f"residual_rotation: decoder layer {index} has no {norm_name} with a weight")
            for path in readers:
                if not isinstance(_linear(block, path), nn.Linear):
                    raise ValueError(f"residual_rotation: decoder layer {index} has no nn.Linear {path}")
        for path in _WRITERS:
            if not isinstance(_linear(block, path), nn.Linear):
                raise ValueError(f"residual_rotation: decoder layer {index} has no nn.Linear {path}")
        if allow_meta:
            continue
        for parameter in block.parameters():
            if parameter.device.type == "meta":
                raise ValueError(
                    "residual_rotation rewrites the base weights, and this model has weights on the meta device "
                    "(offloaded by accelerate); load it fully on one device"
                )
    return list(layers), norm


def _epsilon(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    raise ValueError(f"residual_rotation: cannot find the epsilon of {type(norm).__name__}")


@torch.no_grad()
def stream_moments(model: nn.Module, chunks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Second moment `sum u u^T` (float64, [n, n], on the layer's device) of the normalised residual stream
    `u = h / rms(h)` read by each decoder layer, its attention and MLP inputs summed, on `chunks` ([B, T] token ids).
    """
    layers, _ = decoder_parts(model)
    moments: list[torch.Tensor | None] = [None] * len(layers)
    handles = []

    def hook(norm, args, index):
        hidden = args[0].detach().float()  # [B, T, n]
        normalised = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + _epsilon(norm))
        flat = normalised.reshape(-1, normalised.shape[-1]).double()
        moment = flat.T @ flat
        moments[index] = moment if moments[index] is None else moments[index] + moment

    for index, block in enumerate(layers):
        for norm_name, _ in _READERS:
            norm = getattr(block, norm_name)
            handles.append(norm.register_forward_pre_hook(lambda m, a, i=index: hook(m, a, i)))
    device = next(model.parameters()).device
    try:
        for start in range(0, chunks.shape[0], batch_size):
            model(input_ids=chunks[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    if any(moment is None for moment in moments):
        raise RuntimeError("internal: a decoder layer's norms were not called during the residual-rotation pass")
    return moments


def bases(moments: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
    """The bases (float32 [n, n] on the CPU, principal axes by decreasing variance as columns) of a rotated stream:
    one per decoder layer (`"layer"`) or one for the whole stream (`"model"`), each decomposed where its moments are
    (the GPU's eigensolver at 7B widths)."""
    if mode not in RESIDUAL_ROTATIONS:
        raise ValueError(f"residual_rotation must be one of {RESIDUAL_ROTATIONS} or None, got {mode!r}")
    groups = [[moment] for moment in moments] if mode == "layer" else [moments]
    out = []
    for group in groups:
        total = group[0].clone()
        for moment in group[1:]:
            total += moment.to(total.device)
        _, vectors = torch.linalg.eigh(total)  # ascending
        out.append(vectors.flip(1).float().cpu().contiguous())
    return out


def first_layers(mode: str, num_layers: int) -> list[int]:
    """Index of the first decoder layer of each basis."""
    return list(range(num_layers)) if mode == "layer" else [0]


def overhead_macs(mode: str, num_layers: int, width: int) -> int:
    """MACs per token of the stream's turns: one per basis and one back before the final norm."""
    return (len(first_layers(mode, num_layers)) + 1) * width * width


class ResidualRotation(nn.Module):
    """Turns the residual stream into its basis `Q` before the first decoder layer of the basis (and, for the last
    basis, back before the final norm), and owns the rotation of its layers' base weights.

    Attributes:
        rana_hf_rotation: `{adapter name: Q}`, [n, n] float32, principal axes as columns (NaN until set or loaded).
        folded: the base weights of its layers are in its basis.
        fold_on_load: rotate the base weights once `Q` arrives (an adapter being loaded onto its base model): right
            after `load_state_dict` (PEFT's loaders), else before the first forward pass or `settle` (transformers'
            loader sets the tensor directly).
        owned_by_adapter: `unload` of the RaNA adapter removes it (else whoever installed it does).
    """

    def __init__(
        self, width: int, blocks: list[nn.Module], previous: ResidualRotation | None, index: int, adapter_name: str
    ) -> None:
        super().__init__()
        device = blocks[0].input_layernorm.weight.device
        placeholder = torch.full((width, width), PLACEHOLDER, device=device)
        self.rana_hf_rotation = nn.ParameterDict({adapter_name: nn.Parameter(placeholder, requires_grad=False)})
        self.adapter_name = adapter_name
        self.index = index
        self.__dict__["_blocks"] = blocks  # the model's own modules: not registered here
        self.__dict__["_previous"] = previous
        self.__dict__["_backup"] = []  # (module, attribute, original tensor on the CPU)
        self.folded = False
        self.fold_on_load = False
        self.owned_by_adapter = False
        self._incoming = False
        self._cache: dict = {}
        self._decode: tuple[torch.Tensor, torch.Tensor] | None = None  # (enter, leave) laid out by `prepare`
        self.register_load_state_dict_post_hook(_after_load)

    def extra_repr(self) -> str:
        return f"width={self.basis.shape[0]}, first_layer={self.index}, folded={self.folded}"

    @property
    def basis(self) -> torch.Tensor:
        return self.rana_hf_rotation[self.adapter_name]

    # -- weights ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> None:
        """Rotate the base weights of its layers into its basis (γ folded into the readers); keeps the originals."""
        if self.folded:
            raise RuntimeError("internal: the layers of this residual rotation are already rotated")
        if not bool(torch.isfinite(self.basis).all()):
            raise RuntimeError(
                f"the residual rotation of decoder layer {self.index} was not loaded: the adapter's weights lack its "
                f"`{ATTRIBUTE}.rana_hf_rotation`, so the model would be silently wrong. The checkpoint is incomplete: "
                "save it again from the compressed model."
            )
        basis = self.basis.detach().double()
        backup = self.__dict__["_backup"]
        for block in self.__dict__["_blocks"]:
            for norm_name, readers in _READERS:
                norm = getattr(block, norm_name)
                gamma = norm.weight.detach().double()
                for path in readers:
                    weight = _linear(block, path).weight
                    backup.append((_linear(block, path), "weight", weight.detach().to("cpu", copy=True)))
                    rotated = (weight.double() * gamma.to(weight.device)) @ basis.to(weight.device)
                    weight.copy_(rotated.to(weight.dtype))
                backup.append((norm, "weight", norm.weight.detach().to("cpu", copy=True)))
                norm.weight.fill_(1.0)
            for path in _WRITERS:
                linear = _linear(block, path)
                for attribute in ("weight", "bias"):
                    tensor = getattr(linear, attribute)
                    if tensor is None:
                        continue
                    backup.append((linear, attribute, tensor.detach().to("cpu", copy=True)))
                    rotated = basis.T.to(tensor.device) @ tensor.double()
                    tensor.copy_(rotated.to(tensor.dtype))
        self.folded = True
        self.fold_on_load = False
        self._cache.clear()

    @torch.no_grad()
    def unfold(self) -> None:
        """Put its layers' original weights back, exactly."""
        for module, attribute, original in reversed(self.__dict__["_backup"]):
            target = getattr(module, attribute)
            if target.shape != original.shape:
                raise RuntimeError(
                    f"cannot restore the original {attribute} of a {type(module).__name__}: its shape changed to "
                    f"{tuple(target.shape)} (prepare_for_decode?); reload the base model instead"
                )
            target.copy_(original.to(device=target.device, dtype=target.dtype))
        self.__dict__["_backup"] = []
        self.folded = False
        self._cache.clear()
        self._decode = None

    def settle(self) -> None:
        """Rotate the base weights now if the basis has arrived and they are not rotated yet (see `fold_on_load`)."""
        if not self.folded:
            if not self.fold_on_load:
                raise RuntimeError(f"internal: the residual rotation of decoder layer {self.index} has no basis")
            self.fold()

    def mark_loaded(self) -> None:
        """Its layers' weights were loaded already rotated (a standalone checkpoint)."""
        self.folded = True
        self.fold_on_load = False
        self._cache.clear()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._incoming = f"{prefix}rana_hf_rotation.{self.adapter_name}" in state_dict
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- run time -----------------------------------------------------------------------------------------------
    def _matrix(self, kind: str, like: torch.Tensor) -> torch.Tensor:
        """The row-form matrix of a turn in `like`'s dtype and device: `enter` (`Q_prev^T Q`) or `leave` (`Q^T`)."""
        key = (kind, like.dtype, like.device, torch.is_inference_mode_enabled())
        matrix = self._cache.get(key)
        if matrix is None:
            with torch.no_grad():
                basis = self.basis.detach().double()
                if kind == "leave":
                    matrix = basis.T
                else:
                    previous = self.__dict__["_previous"]
                    matrix = basis if previous is None else previous.basis.detach().double().T @ basis
                matrix = matrix.to(device=like.device, dtype=like.dtype).contiguous()
            self._cache[key] = matrix
        return matrix

    def prepare(self) -> None:
        """Lay the turns out for decoding: both matrices in the model's dtype on its device, read as they are by the
        hooks (a compiled decode step then has no cache to look up)."""
        self.settle()
        weight = _linear(self.__dict__["_blocks"][0], _WRITERS[0]).weight
        like = torch.empty(0, dtype=weight.dtype, device=weight.device)
        self._decode = (self._matrix("enter", like), self._matrix("leave", like))

    def _turn(self, kind: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, n]
        if self._decode is not None:
            turned = hidden @ self._decode[0 if kind == "enter" else 1]
        else:
            for turn in (self, self.__dict__["_previous"]):
                if turn is not None and not turn.folded:
                    turn.settle()
            turned = hidden @ self._matrix(kind, hidden)
        counter = active_counter()
        if counter is not None:
            mask = counter.token_mask
            tokens = int(mask.sum()) if mask is not None else hidden.shape[:-1].numel()
            width = hidden.shape[-1]
            counter.add(f"{ATTRIBUTE}.{self.index}.{kind}", tokens, 0, tokens * width * width)
        if args:
            return (turned, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": turned}

    def enter(self, module, args, kwargs):
        return self._turn("enter", args, kwargs)

    def leave(self, module, args, kwargs):
        return self._turn("leave", args, kwargs)


def _after_load(module: ResidualRotation, incompatible_keys) -> None:
    if module._incoming:
        module._incoming = False
        module._cache.clear()
        module._decode = None
        if module.fold_on_load:
            module.fold()


def is_basis_key(key: str) -> bool:
    """A state-dict key of a turn's basis (which PEFT does not know as an adapter tensor)."""
    return f".{ATTRIBUTE}." in key


def modules_of(model: nn.Module) -> list[ResidualRotation]:
    return [module for module in model.modules() if isinstance(module, ResidualRotation)]


def install(
    model: nn.Module, mode: str, adapter_name: str = "default", allow_meta: bool = False
) -> list[ResidualRotation]:
    """Add the turns of a rotated stream to `model`, their bases not set (NaN until `set_bases` or a load).

    Returns:
        The `ResidualRotation` modules, by basis.
    """
    if modules_of(model):
        raise ValueError("this model's residual stream is already rotated; unload the RaNA adapter first")
    layers, norm = decoder_parts(model, allow_meta)
    width = layers[0].input_layernorm.weight.shape[0]
    starts = first_layers(mode, len(layers))
    modules: list[ResidualRotation] = []
    for position, start in enumerate(starts):
        end = starts[position + 1] if position + 1 < len(starts) else len(layers)
        module = ResidualRotation(width, layers[start:end], modules[-1] if modules else None, start, adapter_name)
        setattr(layers[start], ATTRIBUTE, module)
        layers[start].register_forward_pre_hook(module.enter, with_kwargs=True)
        modules.append(module)
    norm.register_forward_pre_hook(modules[-1].leave, with_kwargs=True)
    return modules


def remove(model: nn.Module) -> None:
    """Take the rotated stream out of `model`: original weights back (where it rotated them), turns removed."""
    for module in modules_of(model):
        if module.__dict__["_backup"]:
            module.unfold()
    for module in model.modules():  # the hooks, found by their owner (handles would not survive a deepcopy)
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(getattr(hook, "__self__", None), ResidualRotation):
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
    for parent in list(model.modules()):
        if isinstance(parent._modules.get(ATTRIBUTE), ResidualRotation):
            del parent._modules[ATTRIBUTE]


def set_bases(modules: list[ResidualRotation], basis_list: list[torch.Tensor]) -> None:
    """Write the bases into the turns and rotate the base weights."""
    if len(modules) != len(basis_list):
        raise RuntimeError(f"internal: {len(modules)} residual rotations for {len(basis_list)} bases")
    with torch.no_grad():
        for module, basis in zip(modules, basis_list, strict=True):
            module.basis.copy_(basis.to(module.basis.device))
            module.fold()


def prepare(model: nn.Module) -> None:
    """`ResidualRotation.prepare` of every turn (`inference.prepare_for_decode` calls it)."""
    for module in modules_of(model):
        module.prepare()


def settle(model: nn.Module) -> None:
    """Rotate the base weights of an adapter loaded by transformers' loader, if not done yet (its first forward pass
    would); before anything reads the weights other than the forward pass (saving, decode preparation)."""
    for module in modules_of(model):
        module.settle()


@contextlib.contextmanager
def rotated(model: nn.Module, mode: str, basis_list: list[torch.Tensor]) -> Iterator[list[ResidualRotation]]:
    """The model with its stream rotated for the block; the original weights and modules are back afterwards."""
    modules = install(model, mode)
    try:
        set_bases(modules, basis_list)
        yield modules
    finally:
        remove(model)
