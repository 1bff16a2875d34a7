"""The multi-turn episode loop: many environments, one batched generate call per turn.

    reset every env ─► prompt tokens
    while any episode is live:
        generate one turn for every live episode (a single batched engine call; with sessions the
        engine reuses each conversation's KV cache, so only the new observation is prefilled)
        step each env with its action (in a thread, under a time limit)
        append the action tokens (policy) and the observation tokens (env) to the conversation

An env that raises, or hangs past `env_timeout_s`, ends its episode with `infra_error` set: the
learner drops such episodes and the metrics count them; they are never scored as failures.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

import envs
from rollout.engine import SamplingParams
from rollout.trajectory import Trajectory


class RolloutConfig(BaseModel):
    """How episodes are played (the `rollout` section of a recipe)."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(1, ge=0, description="Ray rollout actors; 0 = play in the learner's process")
    backend: str = Field("torch", pattern="^(torch|vllm)$", description="inference engine of each worker")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where each worker's engine runs; auto = cuda when the worker sees a GPU (Ray gives one "
        "with gpus_per_worker > 0), else cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="engine weights and KV cache; auto = bfloat16 on cuda, and on a cpu with native bf16 "
        "(AMX or AVX512-BF16) for a policy of hidden_size >= 512 when runtime.precision is auto, bf16 or amp_bf16, "
        "else float32 (the learner corrects the sampling/learner log-prob gap with truncated importance sampling); the run log says which")
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads in a worker; None = its CPUs")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each worker reserves besides its CPUs/GPUs (e.g. "
        "{rollout_node: 1}: workers go only to nodes started with that resource)")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "SPREAD", description="Ray placement-group strategy of the workers' reservation")
    replace_timeout_s: float = Field(
        120.0, gt=0, description="a dead worker's replacement that cannot be placed within this long (its node "
        "is gone and no other can host it) turns that worker's episodes into infra errors; the pool goes on "
        "without it")
    max_turn_tokens: int = Field(64, ge=1, description="new tokens per turn; a longer turn is cut")
    max_episode_tokens: int | None = Field(None, ge=8, description="conversation budget; None = model.max_seq_len")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    env_timeout_s: float = Field(30.0, gt=0, description="an env step or reset slower than this is an infra error")
    mode: Literal["sync", "async"] = Field(
        "sync", description="sync: each iteration plays with the newest weights, then the learner updates; async: "
        "the workers play the next iterations' episodes while the learner updates (with weights up to "
        "max_staleness updates old; the TIS weights correct for it)")
    max_staleness: int = Field(
        1, ge=1, description="rollout.mode=async: iterations played ahead of the learner, and the oldest policy "
        "(in updates behind the learner's) whose episodes may train it; older ones are dropped and counted")
    max_batch_size: int = Field(256, ge=1, description="sequences per engine forward")
    constrain_actions: bool = Field(
        False, description="decode only the actions the env lists (info['admissible_actions'], e.g. TextWorld's "
        "admissible commands): constrained decoding (torch, or vllm >= 0.11 through a logits processor); log-probs are "
        "those of the masked distribution")

    @model_validator(mode="after")
    def _check(self) -> RolloutConfig:
        if self.mode == "async" and self.num_workers == 0:
            raise ValueError("rollout.mode=async needs rollout.num_workers ≥ 1: workers in their own processes play "
                             "while the learner updates")
        if self.constrain_actions and self.backend == "vllm":
            from rollout.vllm_engine import CONSTRAINED_VLLM, installed_vllm_too_old

            if old := installed_vllm_too_old():
                raise ValueError(f"rollout.constrain_actions with rollout.backend=vllm needs vLLM >= {CONSTRAINED_VLLM} "
                                 f"(per-request logits processors); vLLM {old} is installed: upgrade it, or use "
                                 "rollout.backend=torch")
        if self.device == "cuda" and self.num_workers > 0 and self.gpus_per_worker == 0:
            raise ValueError("rollout.device=cuda needs rollout.gpus_per_worker > 0 (Ray hides the GPUs from actors "
                             "that reserve none)")
        return self


@dataclass
class EpisodeStats:
    """What one `play` call measured (summed over its episodes)."""

    episodes: int = 0
    turns: int = 0
    policy_tokens: int = 0
    generate_s: float = 0.0
    env_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class _Episode:
    """One episode in play: its trajectory and what the next turn needs."""

    traj: Trajectory
    session: int  # the engine's key for this conversation's KV cache
    last_obs: str = ""  # the env's latest observation (formats turn completions into actions with it)
    choices: list[str] | None = None  # what the policy may write next (rollout.constrain_actions)
    room: int = 0  # tokens left in the episode's budget


def episode_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (the same across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpisodeRunner:
    """Plays episodes of one env with one engine, batching generation across live episodes."""

    def __init__(self, engine, tokenizer, env_factory: Callable[[], Any], fmt, cfg: RolloutConfig,
                 max_episode_tokens: int):
        self.engine, self.tokenizer, self.env_factory, self.fmt, self.cfg = engine, tokenizer, env_factory, fmt, cfg
        self.max_episode_tokens = min(cfg.max_episode_tokens or max_episode_tokens, max_episode_tokens)
        self.stop_ids = tuple(sorted({i for t in fmt.stop_texts for i in self._stop_tokens(t)})) + (
            tokenizer.eos_token_id,)
        if cfg.constrain_actions and not fmt.lists_choices:
            raise ValueError(f"rollout.constrain_actions: the {type(fmt).__name__} format has no list of actions "
                             "to choose from (only text games that report admissible commands do)")
        self.envs: list[Any] = []
        self.policy_version = 0  # the learner updates in the engine's weights (set by whoever loads them)
        self._pool = cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="env")
        self._sessions = 0

    @classmethod
    def for_env(cls, engine, tokenizer, env_name: str, env_options: dict, cfg: RolloutConfig,
                max_episode_tokens: int) -> EpisodeRunner:
        """A runner of the registered env `env_name` (its config validated once, its own format)."""
        env_cfg = envs.validate_config(env_name, env_options)
        return cls(engine, tokenizer, lambda: envs.make(env_name, env_cfg), envs.format_for(env_name), cfg,
                   max_episode_tokens)

    def _stop_tokens(self, text: str) -> list[int]:
        """Every token whose text contains the stop text: under phrase-level BPE a line ends in
        tokens like "]\n" as well as in a bare "\n"."""
        vocab = sorted(self.tokenizer.get_vocab().values())
        ids = [i for i, piece in zip(vocab, self.tokenizer.batch_decode([[i] for i in vocab])) if text in piece]
        if not ids:
            raise ValueError(f"no token of this tokenizer contains the stop text {text!r}")
        return ids

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _call(self, fn, *args, **kwargs):
        """Run an env call under the time limit; (result, None) or (None, error text)."""
        future = self._pool.submit(fn, *args, **kwargs)
        try:
            return future.result(timeout=self.cfg.env_timeout_s), None
        except cf.TimeoutError:
            # The thread cannot be killed; a fresh pool keeps the hung one from blocking later calls.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="env")
            return None, f"timeout after {self.cfg.env_timeout_s:g}s in {getattr(fn, '__name__', 'env call')}"
        except Exception as e:  # any env failure is an infra error, not a policy failure
            return None, f"{type(e).__name__}: {e}"

    def play(self, tasks: Sequence[dict], group_size: int = 1, seed: int = 0, temperature: float | None = None,
             first_group: int = 0) -> tuple[list[Trajectory], EpisodeStats]:
        """Play `group_size` episodes of each task; returns trajectories in (task, member) order.

        Task k of this call is group `first_group + k`, and every seed derives from (seed, global
        episode index): a pool that splits one batch across workers hands each its `first_group`,
        so one worker and the in-process runner play exactly the same episodes.
        """
        n = len(tasks) * group_size
        while len(self.envs) < n:
            self.envs.append(self.env_factory())
        episodes = [_Episode(Trajectory(task=tasks[i // group_size], group=first_group + i // group_size),
                             session=self._next_session()) for i in range(n)]
        first_episode = first_group * group_size
        stats = EpisodeStats(episodes=n)
        live = self._reset_all(episodes, seed, first_episode, stats)
        params = dict(temperature=self.cfg.temperature if temperature is None else temperature, top_p=self.cfg.top_p,
                      stop_token_ids=self.stop_ids)
        turn = 0
        while live:
            live = self._end_over_budget(episodes, live)
            if not live:
                break
            sampling = SamplingParams(max_new_tokens=min(self.cfg.max_turn_tokens, max(episodes[i].room for i in live)),
                                      seed=episode_seed(seed, "turn", first_group, turn), **params)
            completions = self._generate_turn(episodes, live, sampling, stats)
            live = self._step_envs(episodes, live, completions, stats)
            turn += 1

        self.engine.release([ep.session for ep in episodes])
        trajs = [ep.traj for ep in episodes]
        for tr in trajs:
            tr.check()
        return trajs, stats

    def _reset_all(self, episodes: list[_Episode], seed: int, first_episode: int, stats: EpisodeStats) -> list[int]:
        """Reset every env on its task; the prompt opens each conversation. Returns the live episodes."""
        t0 = time.perf_counter()
        live = []
        bos = [self.tokenizer.bos_token_id]
        for i, ep in enumerate(episodes):
            out, err = self._call(self.envs[i].reset, seed=episode_seed(seed, first_episode + i),
                                  options={"task": ep.traj.task})
            if err:
                ep.traj.infra_error = f"reset: {err}"
                self.envs[i] = self.env_factory()
                continue
            obs, info = out
            ep.last_obs, ep.choices = obs, self.fmt.choices(info)
            ep.traj.append(bos + self._encode(self.fmt.prompt(obs)), policy=False)
            ep.traj.transcript = [{"observation": obs}]
            live.append(i)
        stats.env_s += time.perf_counter() - t0
        return live

    def _end_over_budget(self, episodes: list[_Episode], live: list[int]) -> list[int]:
        """Episodes at their token budget end here (truncated); the rest go on."""
        for i in live:
            episodes[i].room = self.max_episode_tokens - len(episodes[i].traj.token_ids)
            if episodes[i].room <= 0:
                episodes[i].traj.truncated = "episode_tokens"
        return [i for i in live if episodes[i].room > 0]

    def _generate_turn(self, episodes: list[_Episode], live: list[int], params: SamplingParams,
                       stats: EpisodeStats) -> list:
        """One batched engine call: the next turn of every live episode (sessions keep their KV)."""
        t0 = time.perf_counter()
        constrained = {}
        if self.cfg.constrain_actions:
            constrained["choices"] = [self._encode_many(episodes[i].choices) if episodes[i].choices else None
                                      for i in live]
        completions = self.engine.generate([episodes[i].traj.token_ids for i in live], params,
                                           sessions=[episodes[i].session for i in live], **constrained)
        stats.generate_s += time.perf_counter() - t0
        return completions

    def _step_envs(self, episodes: list[_Episode], live: list[int], completions: list,
                   stats: EpisodeStats) -> list[int]:
        """Append each completion (policy tokens), step its env with the action, append the reply
        (env tokens). Returns the episodes still live."""
        t0 = time.perf_counter()
        still_live = []
        for i, comp in zip(live, completions):
            ep, tr = episodes[i], episodes[i].traj
            ids, logps = comp.token_ids[: ep.room], comp.logprobs[: ep.room]
            if comp.routed_experts is not None:  # the prompt was tr.token_ids, so its indices are the trajectory's
                tr.routing.append((comp.routed_from, comp.routed_experts))
            tr.append(ids, policy=True, logprobs=logps, allowed=comp.allowed and comp.allowed[: ep.room])
            tr.turns += 1
            tr.policy_versions.append(self.policy_version)
            stats.turns += 1
            stats.policy_tokens += len(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if len(ids) < len(comp.token_ids):  # cut by the episode budget: no action is taken
                tr.add_turn_reward(0.0)
                tr.truncated = "episode_tokens"
                tr.transcript.append({"action": text, "reward": 0.0, "cut": "the episode's token budget"})
                continue
            if comp.finish_reason == "length":
                tr.cut_turns += 1  # recorded; the cut text is still the action
            action = self.fmt.action(ep.last_obs, text)
            out, err = self._call(self.envs[i].step, action)
            if err:
                tr.add_turn_reward(0.0)
                tr.infra_error = f"step: {err}"
                tr.transcript.append({"action": text, "reward": 0.0, "error": str(err)})
                self.envs[i] = self.env_factory()
                continue
            obs, reward, terminated, truncated, info = out
            tr.transcript.append({"action": text, "reward": float(reward), "observation": obs})
            if info.get("infra_error"):
                tr.infra_error = str(info["infra_error"])
            tr.add_turn_reward(reward)
            tr.won = bool(info.get("won", False))
            if "episode_stats" in info:
                tr.episode_stats = dict(info["episode_stats"])
            if terminated or truncated or tr.infra_error:
                if truncated and not terminated:
                    tr.truncated = "max_turns"
                continue
            tr.append(self._encode(self.fmt.observation(obs, action, text)), policy=False)
            ep.last_obs, ep.choices = obs, self.fmt.choices(info)
            still_live.append(i)
        stats.env_s += time.perf_counter() - t0
        return still_live

    def _next_session(self) -> int:
        self._sessions += 1
        return self._sessions

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for env in self.envs:
            try:
                env.close()
            except Exception:  # closing a broken env must not mask the real result
                pass
