"""`Trajectory`: one played episode, as the learner needs it.

The conversation is kept as token ids, built turn by turn (observation tokens are appended as ids,
the whole text is never re-tokenised), with per-token arrays aligned to it:

    token_ids    <bos> obs_0 act_1 obs_1 act_2 ... act_T [obs_T]
    policy_mask  0     0...  1...  0...  1...      1...  0...     1 only where the policy wrote
    logprobs     sampling log-prob of each policy token under the engine (0 elsewhere)
    rewards      turn t's reward on the last token of act_t (0 elsewhere)
    choice_sets  {index: token ids allowed there} for policy tokens drawn by constrained decoding
                 (rollout.constrain_actions): the learner masks its logits the same way
    routing      a mixture-of-experts policy's recorded routing: (first index, experts [tokens,
                 layers, k]) for each run of tokens the engine put through the model; the
                 learner routes those tokens the same way under rl.routing_replay
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Trajectory:
    task: dict[str, Any]
    group: int  # episodes of one task in one batch share a group (GRPO / RLOO baselines)
    token_ids: list[int] = field(default_factory=list)
    policy_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)  # index of each turn's last policy token
    choice_sets: dict[int, list[int]] = field(default_factory=dict)
    routing: list[tuple[int, Any]] = field(default_factory=list)
    won: bool = False
    turns: int = 0
    # Why the episode stopped without the env ending it: "episode_tokens" (the conversation hit
    # its token budget) or "max_turns" (the env's turn limit).
    truncated: str | None = None
    cut_turns: int = 0  # turns that hit the per-turn token limit (their cut text was still played)
    infra_error: str | None = None  # the env raised or hung: dropped from the update
    # the policy version (learner updates applied) whose weights sampled each turn: rollout.mode=async
    # plays with weights one or more updates behind the learner's (rollout.max_staleness)
    policy_versions: list[int] = field(default_factory=list)
    # what the env counted over the episode (its last info's "episode_stats", e.g. SWE's tool
    # calls): the eval records carry it to the env's eval_stats
    episode_stats: dict[str, float] = field(default_factory=dict)
    # the conversation as text: [{"observation": the env's first}, then one per turn {"action":
    # the decoded text, "reward", "observation": the env's reply (or "error", or "cut")}]: what
    # the eval files save and `launch.py show` prints
    transcript: list[dict[str, Any]] = field(default_factory=list)

    @property
    def end(self) -> str:
        """Why the episode ended, in words."""
        if self.infra_error:
            return f"infra error: {self.infra_error}"
        if self.truncated == "max_turns":
            return "out of turns"
        if self.truncated == "episode_tokens":
            return "out of tokens (the episode's budget)"
        return "won" if self.won else "ended by the env, not won"

    @property
    def staleness_base(self) -> int | None:
        """The oldest policy version any of its turns was sampled with (None before any turn)."""
        return min(self.policy_versions) if self.policy_versions else None

    @property
    def episode_return(self) -> float:
        return float(sum(self.rewards))

    @property
    def num_policy_tokens(self) -> int:
        return int(sum(self.policy_mask))

    def append(self, ids: list[int], policy: bool, logprobs: list[float] | None = None,
               allowed: list[list[int] | None] | None = None) -> None:
        for k, choice in enumerate(allowed or []):
            if choice is not None:
                self.choice_sets[len(self.token_ids) + k] = choice
        self.token_ids += ids
        self.policy_mask += [int(policy)] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.rewards += [0.0] * len(ids)

    def add_turn_reward(self, reward: float) -> None:
        """Put a turn's reward on its last policy token (the turn just appended)."""
        last = len(self.token_ids) - 1
        self.turn_ends.append(last)
        self.rewards[last] += float(reward)

    def check(self) -> None:
        n = len(self.token_ids)
        if not (len(self.policy_mask) == len(self.logprobs) == len(self.rewards) == n):
            raise AssertionError("trajectory arrays are misaligned")
