"""Constrained decoding inside vLLM: each request's completion stays within its list of choices.

Imported only where vLLM is installed (`VLLMEngine(constrain_actions=True)` hands `ChoiceMask` to
`vllm.LLM(logits_processors=...)`). A request that carries `SamplingParams.extra_args[CHOICES_KEY]`
(token-id sequences, e.g. a text game's admissible commands, each ending in a stop token) has, at
every step, every token that would leave all of them masked, by the same rule and the same finite
minimum as `TorchEngine` (`rollout.engine.allowed_next`, `mask_logits`). vLLM's logits processors
run before its sampler computes `processed_logprobs`, so the log-prob vLLM returns for each sampled
token is the masked distribution's, which is what the learner scores with the allowed sets.

The processor uses vLLM's V1 interface (`vllm.v1.sample.logits_processor.AdapterLogitsProcessor`,
a per-request callable on the live list of output ids): the engine runs vLLM's V1 model runner
for it (`VLLM_USE_V2_MODEL_RUNNER=0`), whose sampler applies such processors.
"""
from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from rollout.engine import allowed_next, choice_tree

CHOICES_KEY = "turnstile_choices"  # SamplingParams.extra_args: {key: [[ids], ...], STOP_KEY: [ids]}
STOP_KEY = "turnstile_stop"


def allowed_steps(choices: list[list[int]], token_ids: list[int], stop_ids: list[int]) -> list[list[int] | None]:
    """Per sampled token, the tokens its step allowed: the walk `ChoiceMask` made, replayed."""
    node: dict | None = choice_tree(choices)
    steps = []
    for token in token_ids:
        steps.append(allowed_next(node, stop_ids))
        node = None if node is None else node.get(token)
    return steps


class ChoiceMask(AdapterLogitsProcessor):
    """Masks each constrained request's logits row to the tokens its choices allow next."""

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is likeliest

    def new_req_logits_processor(self, params):
        args = params.extra_args or {}
        if CHOICES_KEY not in args:
            return None  # a free request: this processor leaves its row alone
        tree, stop = choice_tree(args[CHOICES_KEY]), list(args.get(STOP_KEY, []))

        def mask(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:  # logits [V]
            node: dict | None = tree
            for token in output_ids:  # the request's tokens so far (a live list): ≤ a choice's length
                node = None if node is None else node.get(token)
            allowed = allowed_next(node, stop)
            if allowed is None:
                return logits
            keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            keep[allowed] = True
            return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)

        return mask
