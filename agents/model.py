"""Policy backbones: standard Hugging Face causal LMs built from scratch from a config section.

Every backbone is a `PreTrainedModel` (save_pretrained / from_pretrained), and where an
architecture vLLM serves fits, it is that architecture — a dense policy is a Llama, a `moe` one a
Qwen2-MoE (agents/moe.py), so the same checkpoint folder runs under the embedded engine,
transformers and vLLM.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

# vLLM's CPU attention kernels accept only these head sizes (docs/rollout.md): a policy we train
# here must be servable there too.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# The archs vLLM serves (dense: Llama; moe: Qwen2-MoE); `rollout.backend: vllm` needs one of them.
VLLM_ARCHS = ("llama", "moe")
# Each backbone but the dense one is a module under agents/ with `build(cfg, vocab_size, pad_id,
# bos_id, eos_id)`, and, when it is not a transformers model type, registers its config and model
# classes with transformers' Auto classes on import (so `from_pretrained` reads its folders).
ARCH_MODULES = {
    "moe": "agents.moe",
    "factor": "agents.factor",
    "monarch": "agents.monarch",
    "mod": "agents.mod",
    "routed_attention": "agents.routed_attention",
}
Arch = Literal["llama", "moe", "factor", "monarch", "mod", "routed_attention"]
# Each arch's own keys and their defaults: set when model.arch is that arch (None = unset; a
# section of another arch must leave them unset). A key may belong to more than one arch.
ARCH_KEYS: dict[str, dict[str, object]] = {
    "llama": {},
    "moe": {"num_experts": 8, "top_k": 2, "expert_size": None, "shared_expert_size": None, "balance_coef": 0.01},
    "factor": {"num_experts": 8, "top_k": 4},
    "monarch": {"monarch_blocks": 4, "monarch_attention": False},
    "mod": {"mod_capacity": 0.5, "mod_layers": None, "mod_threshold": 0.5, "mod_coef": 0.01},
    "routed_attention": {"region_size": 16, "top_regions": 4, "local_conv": 3},
}
MOE_KEYS = ARCH_KEYS["moe"]


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Arch = Field("llama", description="the backbone (docs/backbones.md): llama (dense), moe, factor, "
                       "monarch, mod, routed_attention")
    hidden_size: int = Field(256, ge=32)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="grouped-query attention; None = num_heads")
    intermediate_size: int | None = Field(None, ge=1, description="MLP width; None = 4 * hidden_size")
    max_seq_len: int = Field(1024, ge=16)
    rope_theta: float = Field(10_000.0, gt=0)
    tie_embeddings: bool = True
    context_broadcast: bool = Field(False, description="add to every attention head the mean of the values "
                                    "over the keys it may attend to: causal uniform attention (agents/broadcast.py; "
                                    "any arch but moe; not servable by vLLM)")
    # arch: moe (agents/moe.py) and factor (agents/factor.py)
    num_experts: int | None = Field(None, ge=1, description="moe/factor: routed experts per layer (moe 8, factor 8)")
    top_k: int | None = Field(None, ge=1, description="moe/factor: experts each token runs (moe 2, factor 4)")
    expert_size: int | None = Field(None, ge=1, description="moe: routed expert MLP width; None = hidden_size")
    shared_expert_size: int | None = Field(None, ge=1, description="moe: shared expert width; None = 2 * hidden_size")
    balance_coef: float | None = Field(None, ge=0, description="moe: load-balance loss weight α (default 0.01)")
    # arch: monarch (agents/monarch.py)
    monarch_blocks: int | None = Field(None, ge=1, description="monarch: blocks of each block-diagonal factor "
                                       "(≈ √ of the layer width; default 4)")
    monarch_attention: bool | None = Field(None, description="monarch: attention's projections Monarch too "
                                           "(default false: the MLP only)")
    # arch: mod (agents/mod.py)
    mod_capacity: float | None = Field(None, description="mod: target share of tokens that run a routed "
                                       "layer, in (0, 1] (default 0.5)")
    mod_layers: list[int] | None = Field(None, description="mod: the routed layers (default: all but the first "
                                         "and the last)")
    mod_threshold: float | None = Field(None, description="mod: a token runs a routed layer when its router "
                                        "probability exceeds this, in (0, 1) (default 0.5)")
    mod_coef: float | None = Field(None, ge=0, description="mod: weight of the capacity regulariser (default 0.01)")
    # arch: routed_attention (agents/routed_attention.py)
    region_size: int | None = Field(None, ge=1, description="routed_attention: tokens per region R (default 16)")
    top_regions: int | None = Field(None, ge=1, description="routed_attention: completed past regions each "
                                    "query attends to besides its own (default 4)")
    local_conv: int | None = Field(None, ge=0, description="routed_attention: kernel of the causal local "
                                   "positional conv on the values, 0 = none (default 3)")

    @model_validator(mode="after")
    def _check_arch_keys(self) -> ModelConfig:
        own = ARCH_KEYS[self.arch]
        for keys in ARCH_KEYS.values():
            for key in keys:
                if key not in own and getattr(self, key) is not None:
                    users = [a for a, k in ARCH_KEYS.items() if key in k]
                    raise ValueError(f"model.{key} applies to model.arch={'/'.join(users)} only "
                                     f"(model.arch={self.arch})")
        for key, default in own.items():
            if getattr(self, key) is None:
                setattr(self, key, default)
        if self.arch in ("moe", "factor") and self.top_k > self.num_experts:
            raise ValueError(f"model.top_k={self.top_k} exceeds model.num_experts={self.num_experts}: a token "
                             "cannot run more experts than a layer has")
        if self.arch == "factor" and (self.intermediate_size or 4 * self.hidden_size) % self.num_experts:
            raise ValueError(f"model.intermediate_size={self.intermediate_size or 4 * self.hidden_size} is not "
                             f"divisible by model.num_experts={self.num_experts}: factor experts are equal slices "
                             "of the FFN's neurons")
        if self.arch == "moe" and self.context_broadcast:
            raise ValueError("model.context_broadcast does not apply to model.arch=moe: moe is transformers' "
                             "Qwen2-MoE so that vLLM serves it and transformers reads its per-expert checkpoints, "
                             "both by its model type, which an attention of our own would have to change; use it "
                             f"with {', '.join(a for a in ARCH_KEYS if a != 'moe')}")
        if self.arch == "moe" and self.intermediate_size is not None:
            raise ValueError("model.intermediate_size is the dense MLP's width; model.arch=moe sizes its experts "
                             "with model.expert_size and model.shared_expert_size")
        if self.arch == "monarch":  # each Monarch linear splits its input and output into equal blocks
            sizes = {"model.hidden_size": self.hidden_size,
                     "model.intermediate_size": self.intermediate_size or 4 * self.hidden_size}
            if self.monarch_attention and self.hidden_size % self.num_heads == 0:
                sizes["the key/value width model.num_kv_heads × head size"] = \
                    (self.num_kv_heads or self.num_heads) * (self.hidden_size // self.num_heads)
            for name, size in sizes.items():
                if size % self.monarch_blocks:
                    raise ValueError(f"model.monarch_blocks={self.monarch_blocks} does not divide {name}={size} "
                                     "(a Monarch linear splits its input and output into that many equal blocks)")
        if self.arch == "mod":
            if not 0 < self.mod_capacity <= 1:
                raise ValueError(f"model.mod_capacity={self.mod_capacity} is outside (0, 1]")
            if not 0 < self.mod_threshold < 1:
                raise ValueError(f"model.mod_threshold={self.mod_threshold} is outside (0, 1)")
            bad = [i for i in self.mod_layers or () if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"model.mod_layers names layers {bad}; the model has layers 0..{self.num_layers - 1}")
            if self.mod_layers is not None and len(set(self.mod_layers)) != len(self.mod_layers):
                raise ValueError(f"model.mod_layers={self.mod_layers} names a layer twice")
            if not (self.mod_layers if self.mod_layers is not None else range(1, self.num_layers - 1)):
                raise ValueError(f"model.mod_layers={self.mod_layers} routes no layer (unset, it is every layer but "
                                 f"the first and the last: none of model.num_layers={self.num_layers}); name the "
                                 "routed layers")
        if self.arch == "routed_attention" and self.region_size >= self.max_seq_len:
            raise ValueError(f"model.region_size={self.region_size} is not below model.max_seq_len="
                             f"{self.max_seq_len}: every token would sit in the first region and none be routed")
        return self

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if head_dim not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(
                f"head size hidden_size/num_heads = {head_dim} is not one vLLM can serve; "
                f"use one of {VLLM_CPU_HEAD_SIZES}"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by num_kv_heads={kv}")
        return self


def arch_module(arch: str):
    """The module under agents/ that builds `arch` (see ARCH_MODULES)."""
    import importlib

    return importlib.import_module(ARCH_MODULES[arch])


def register_archs() -> None:
    """Import every backbone's module, so transformers' Auto classes know their model types (what
    reading a saved folder of any arch needs first)."""
    import agents.broadcast  # noqa: F401  (turnstile_llama: the dense backbone with model.context_broadcast)

    for arch in ARCH_MODULES:
        arch_module(arch)


def auxiliary_losses(model: torch.nn.Module, token_mask: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
    """The sum of the auxiliary losses the backbone's modules computed in the model's last forward
    (each already weighted by its own coefficient), over the tokens where `token_mask` [batch,
    length] is nonzero, and their stats to log: (None, {}) when the backbone has none.

    A module takes part by having `auxiliary_loss(token_mask) -> (loss, stats)` (mixture of depths:
    the capacity regulariser). The mixture of experts' balance loss is not one of them: it goes
    through `agents.moe.RouterTap`, which also replays routing.
    """
    total, stats = None, {}
    for module in getattr(model, "module", model).modules():
        fn = getattr(module, "auxiliary_loss", None)
        if callable(fn) and module is not model:
            out = fn(token_mask)
            if out is None:
                continue
            loss, module_stats = out
            total = loss if total is None else total + loss
            for k, v in module_stats.items():
                stats[k] = stats.get(k, 0.0) + v
    return total, stats


def llama_config_fields(cfg: ModelConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> dict:
    """The LlamaConfig fields of a dense `model:` section."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        attn_implementation="sdpa",
    )


def build_model(cfg: ModelConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> PreTrainedModel:
    """A freshly initialised policy for `cfg` (float32; the learner casts for bf16/fp16)."""
    if cfg.arch != "llama":
        return arch_module(cfg.arch).build(cfg, vocab_size, pad_id, bos_id, eos_id)
    if cfg.context_broadcast:  # a model type of our own (turnstile_llama); without the flag the plain Llama
        from agents.broadcast import TurnstileLlamaConfig, TurnstileLlamaForCausalLM

        fields = llama_config_fields(cfg, vocab_size, pad_id, bos_id, eos_id)
        return TurnstileLlamaForCausalLM(TurnstileLlamaConfig(**fields, context_broadcast=True))
    return LlamaForCausalLM(LlamaConfig(**llama_config_fields(cfg, vocab_size, pad_id, bos_id, eos_id)))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class PolicyLoadError(RuntimeError):
    """A policy folder that cannot be read; the message names the folder and what is wrong."""


def load_pretrained(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode from a `save_pretrained` folder (weights, config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    register_archs()
    if not (folder / "config.json").exists():
        raise PolicyLoadError(f"{folder} holds no model (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    except Exception as e:  # corrupt weights, truncated json, missing tokenizer files...
        raise PolicyLoadError(f"cannot load the policy in {folder}: {type(e).__name__}: {e}") from None
    return model.eval(), tokenizer
