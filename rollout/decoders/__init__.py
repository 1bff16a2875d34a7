"""A backbone's cached inference forward: what the embedded engine (rollout/engine.py) runs,
one file per backbone beside the dense one (rollout/decoders/llama.py: the `Decoder` protocol,
`LayerWeights` and `LlamaDecoder`, which the others build on).

`decoder_for(model)` picks the forward for a model: the first class in `DECODERS` whose
`supports(model)` is true, or None, and the engine then runs the model's own (transformers)
forward, which is slower but works for any causal LM.
"""
from __future__ import annotations

from transformers import PreTrainedModel

from rollout.decoders.factor import FactorDecoder
from rollout.decoders.llama import Decoder, LlamaDecoder
from rollout.decoders.mod import ModDecoder
from rollout.decoders.moe import MoeDecoder, RoutingTrace
from rollout.decoders.monarch import MonarchDecoder
from rollout.decoders.routed_attention import RoutedAttentionDecoder

__all__ = ["DECODERS", "Decoder", "LlamaDecoder", "MoeDecoder", "RoutingTrace", "decoder_for"]

# Every cached forward the engine knows, tried in order; a new backbone's class goes here.
DECODERS: list[type] = [LlamaDecoder, MoeDecoder, FactorDecoder, RoutedAttentionDecoder, MonarchDecoder, ModDecoder]


def decoder_for(model: PreTrainedModel, compile_attention: bool | None = None) -> Decoder | None:
    """The cached forward for `model`, or None when no decoder here supports it (the engine then
    runs the model's own forward). `compile_attention`: decode-step attention through the kernel
    compiled by inductor (None: on CPU in 16-bit precision, when the probe accepts it)."""
    for decoder in DECODERS:
        if decoder.supports(model):
            return decoder(model, compile_attention)
    return None
