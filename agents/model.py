"""Policy backbones: standard Hugging Face causal LMs built from scratch from a config section.

Every backbone is a `PreTrainedModel` (save_pretrained / from_pretrained), and where an
architecture vLLM serves fits, it is that architecture — a dense policy is a Llama, so the same
checkpoint folder runs under the embedded engine, transformers and vLLM.
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


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Literal["llama"] = "llama"
    hidden_size: int = Field(256, ge=32)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="grouped-query attention; None = num_heads")
    intermediate_size: int | None = Field(None, ge=1, description="MLP width; None = 4 * hidden_size")
    max_seq_len: int = Field(1024, ge=16)
    rope_theta: float = Field(10_000.0, gt=0)
    tie_embeddings: bool = True

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
