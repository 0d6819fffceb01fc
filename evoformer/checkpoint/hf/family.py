"""What a family is (:class:`Family`, :class:`WeightRule`) and the small pieces the family
modules share: config guards, the HF activation names, the tensor names every LLaMA-descended
HF class uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from evoformer.config.schema import ModelConfig
from evoformer.errors import UserError


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """One HF tensor <-> evoformer tensor(s); ``{i}`` in the names is the layer index."""

    hf: str
    ours: tuple[str, ...]
    transpose: bool = False  # HF stores [in, out] (GPT-2 Conv1D) instead of nn.Linear's [out, in]
    index: int | None = None  # the HF tensor is slice [index] of ours (stacked MoE experts)
    # Stacked expert tensors stored whole (gpt-oss): ``swap_last``: HF's is [E, in, out], ours
    # [E, out, in]; ``interleave``: the ours alternate along HF's last dim (gate at even, up at
    # odd columns) instead of being concatenated along the first.
    swap_last: bool = False
    interleave: bool = False

    def to_ours(self, t: torch.Tensor, sizes: list[int] | None = None) -> list[torch.Tensor]:
        """The HF tensor ``t`` as the parts of ours (``sizes``: dim-0 split of several)."""
        t = t.t() if self.transpose else t
        if self.interleave:
            parts = [t[..., k :: len(self.ours)] for k in range(len(self.ours))]
        elif sizes is not None:
            parts = list(t.split(sizes, dim=0))
        else:
            parts = [t]
        return [p.transpose(-1, -2) if self.swap_last else p for p in parts]

    def to_hf(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Our tensors (or slices) ``parts`` as the HF tensor: :meth:`to_ours` inverted."""
        parts = [p.transpose(-1, -2) if self.swap_last else p for p in parts]
        if self.interleave:
            t = torch.stack(parts, dim=-1).flatten(-2)
        else:
            t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        return t.t() if self.transpose else t


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HuggingFace architecture maps onto evoformer."""

    name: str
    model_type: str  # HF config.json "model_type"
    architectures: tuple[str, ...]  # accepted HF classes; the first is written on export
    to_model_config: Callable[[dict[str, Any]], ModelConfig]
    to_hf_config: Callable[[ModelConfig], dict[str, Any]]
    rules: tuple[WeightRule, ...]
    base_prefix: str  # the decoder's prefix in *ForCausalLM files; bare-model files omit it
    ignore: tuple[str, ...] = ()  # regexes of HF tensors with no counterpart (stale buffers)
    # Rules that depend on the model config (one per expert; MTP modules stored as extra layers).
    extra_rules: Callable[[ModelConfig], Sequence[WeightRule]] | None = None
    # transform(hf_name, tensor, hf_config, to_ours): a per-tensor change of layout in HF's
    # naming (DeepSeek's interleaved RoPE rows); applied on import, inverted on export.
    transform: Callable[[str, torch.Tensor, dict[str, Any], bool], torch.Tensor] | None = None
    # refine(model_config, hf_tensor_names): settings config.json cannot tell (DeepSeek's MTP
    # modules, counted by the config but present only in some files).
    refine: Callable[[ModelConfig, set[str]], ModelConfig] | None = None
    # notes(hf_config, model_config): one line each for what the import drops or chooses that
    # config.json does not say (router jitter, DeepSeek's bias update rate), printed by the CLI.
    notes: Callable[[dict[str, Any], ModelConfig], tuple[str, ...]] | None = None
    # Multimodal wrappers whose text_config is this family's model (gemma3 -> gemma3_text):
    # HF model_type -> the wrapper's architectures.
    wrappers: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def rule(hf: str, *ours: str, transpose: bool = False) -> WeightRule:
    """A :class:`WeightRule` written in one line: ``rule(hf_name, our_name, ...)``."""
    return WeightRule(hf, tuple(ours), transpose)


# -- config guards ----------------------------------------------------------------------------


def hf_defaults(hf: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``hf`` over the HF class ``defaults``, which fill only the keys the file omits (as the
    class's ``__init__`` defaults do). A null in the file stays null and means what the HF class
    makes of it: no sliding window, as many KV heads as heads, ``head_dim = hidden / heads``,
    a full-rank query; each converter reads it so (the policy: docs/decisions.md)."""
    return {**defaults, **hf}


def invert(mapping: dict[str, str]) -> dict[str, str]:
    """ours -> HF name, from an HF name -> ours mapping (the first HF name listed wins)."""
    out: dict[str, str] = {}
    for hf_name, ours in mapping.items():
        out.setdefault(ours, hf_name)  # the first HF name listed is the canonical one
    return out


def unsupported(family: str, what: str) -> UserError:
    """The error for a setting ``family`` (or evoformer) cannot express."""
    return UserError(f"{family}: {what} cannot be expressed")


def check(family: str, checks: list[tuple[Any, str]]) -> None:
    """Raise :func:`unsupported` for the first ``(bad, what)`` whose ``bad`` is true."""
    for bad, what in checks:
        if bad:
            raise unsupported(family, what)


# -- activations (LLaMA-descended families) ---------------------------------------------------

# HF ``hidden_act`` -> ours. gelu_new / gelu_pytorch_tanh are both the tanh approximation.
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}


def activation_from_hf(family: str, act: str) -> str:
    """HF ``hidden_act`` -> our ``mlp.activation``; a UserError for one we lack."""
    if act not in ACTIVATIONS:
        raise unsupported(family, f"hidden_act={act!r}")
    return ACTIVATIONS[act]


def activation_to_hf(family: str, m: ModelConfig) -> str:
    """Our ``mlp.activation`` (``default`` spelled out for the MLP kind) -> HF ``hidden_act``."""
    act = m.mlp.resolved_activation
    if act not in invert(ACTIVATIONS):
        raise unsupported(family, f"model.mlp.activation={act}")
    return invert(ACTIVATIONS)[act]


# -- tensor names shared by the LLaMA-descended HF classes ------------------------------------

# Non-persistent RoPE buffers that older transformers versions saved with the weights.
ROTARY_BUFFERS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def attention_rules(projections: str = "qkvo") -> tuple[WeightRule, ...]:
    """The attention projections, weights and biases (biases kept only where the model has
    them)."""
    return tuple(
        rule(f"model.layers.{{i}}.self_attn.{p}_proj.{t}", f"layers.{{i}}.attn.{p}_proj.{t}")
        for p in projections
        for t in ("weight", "bias")
    )


def qk_norm_rules() -> tuple[WeightRule, ...]:
    """Per-head (or whole-projection) q/k RMSNorm gains."""
    return tuple(
        rule(f"model.layers.{{i}}.self_attn.{p}_norm.weight", f"layers.{{i}}.attn.{p}_norm.weight")
        for p in "qk"
    )


# The gated MLP without biases.
GATED_MLP_RULES = tuple(
    rule(f"model.layers.{{i}}.mlp.{p}_proj.weight", f"layers.{{i}}.mlp.{p}_proj.weight")
    for p in ("gate", "up", "down")
)
