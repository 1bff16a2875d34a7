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
# The `moe` keys and their defaults (set when arch is moe; a llama section must leave them unset).
MOE_KEYS = {"num_experts": 8, "top_k": 2, "expert_size": None, "shared_expert_size": None, "balance_coef": 0.01}


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Literal["llama", "moe"] = Field(
        "llama", description="llama: dense; moe: routed + shared experts (Qwen2-MoE, docs/backbones.md)")
    hidden_size: int = Field(256, ge=32)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="grouped-query attention; None = num_heads")
    intermediate_size: int | None = Field(None, ge=1, description="MLP width; None = 4 * hidden_size")
    max_seq_len: int = Field(1024, ge=16)
    rope_theta: float = Field(10_000.0, gt=0)
    tie_embeddings: bool = True
    # arch: moe (agents/moe.py); None = unset, which a llama section must leave them
    num_experts: int | None = Field(None, ge=1, description="moe: routed experts per layer (default 8)")
    top_k: int | None = Field(None, ge=1, description="moe: experts each token runs (default 2)")
    expert_size: int | None = Field(None, ge=1, description="moe: routed expert MLP width; None = hidden_size")
    shared_expert_size: int | None = Field(None, ge=1, description="moe: shared expert width; None = 2 * hidden_size")
    balance_coef: float | None = Field(None, ge=0, description="moe: load-balance loss weight α (default 0.01)")

    @model_validator(mode="after")
    def _check_experts(self) -> ModelConfig:
        if self.arch != "moe":
            for key in MOE_KEYS:
                if getattr(self, key) is not None:
                    raise ValueError(f"model.{key} applies to model.arch=moe only (model.arch={self.arch})")
            return self
        if self.intermediate_size is not None:
            raise ValueError("model.intermediate_size is the dense MLP's width; model.arch=moe sizes its experts "
                             "with model.expert_size and model.shared_expert_size")
        for key, default in MOE_KEYS.items():
            if getattr(self, key) is None:
                setattr(self, key, default)
        if self.top_k > self.num_experts:
            raise ValueError(f"model.top_k={self.top_k} exceeds model.num_experts={self.num_experts}: a token "
                             "cannot run more experts than a layer has")
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


def build_model(cfg: ModelConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> PreTrainedModel:
    """A freshly initialised policy for `cfg` (float32; the learner casts for bf16/fp16)."""
    if cfg.arch == "moe":
        from agents.moe import build_moe_model

        return build_moe_model(cfg, vocab_size, pad_id, bos_id, eos_id)
    hf_cfg = LlamaConfig(
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
    return LlamaForCausalLM(hf_cfg)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class PolicyLoadError(RuntimeError):
    """A policy folder that cannot be read; the message names the folder and what is wrong."""


def load_pretrained(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode from a `save_pretrained` folder (weights, config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise PolicyLoadError(f"{folder} holds no model (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    except Exception as e:  # corrupt weights, truncated json, missing tokenizer files...
        raise PolicyLoadError(f"cannot load the policy in {folder}: {type(e).__name__}: {e}") from None
    return model.eval(), tokenizer
