"""Rollout workers: Ray actors that each own an inference engine and a batch of environments.

    pool = RolloutPool(spec, rollout_cfg, ray_cfg)     # N actors (or one in-process worker)
    trajs, stats = pool.play(tasks, group_size=8, seed=it)
    pool.update_weights(learner.policy_state_dict())   # one object-store put, every actor loads it

`num_workers: 0` plays in the calling process (no Ray): the same code path and the same seeds, so
it plays exactly the episodes one Ray worker would (handy for debugging). With several workers
each plays a contiguous share of the tasks with the same per-episode reset seeds; sampling draws
per engine call, so the tokens sampled depend on how the batch was split.
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from agents.model import load_pretrained
from rollout.runner import EpisodeRunner, RolloutConfig
from rollout.trajectory import Trajectory


class RayConfig(BaseModel):
    """Where Ray runs (the `ray` section). address None starts a local cluster on this machine."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="'auto' or 'host:port' of a running cluster; None = local")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local cluster; None = all")
    namespace: str = "turnstile"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build itself, picklable for Ray."""

    policy_folder: str  # a save_pretrained folder (model + tokenizer): the starting weights
    env_name: str
    env_options: dict[str, Any]
    max_episode_tokens: int = 1024


def engine_placement(cfg: RolloutConfig) -> tuple[str, str]:
    """(device, dtype) of this process's engine from `rollout.device` / `rollout.dtype`. Resolved
    inside the worker: a Ray actor sees a GPU only if it reserved one (gpus_per_worker)."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("rollout.device=cuda but this rollout worker sees no GPU (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); set rollout.gpus_per_worker or device=cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return device, dtype


def make_engine(backend: str, model, tokenizer, spec: WorkerSpec, cfg: RolloutConfig):
    device, dtype = engine_placement(cfg)
    if backend == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(spec.policy_folder, dtype=dtype, device=device, max_batch_size=cfg.max_batch_size)
    from rollout.engine import TorchEngine

    return TorchEngine(model, pad_token_id=tokenizer.pad_token_id, device=device,
                       dtype=getattr(torch, dtype), max_batch_size=cfg.max_batch_size)


class RolloutWorker:
    """One engine + its environments. Used directly (in-process) or as a Ray actor."""

    def __init__(self, spec: WorkerSpec, cfg: RolloutConfig, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        model, tokenizer = load_pretrained(spec.policy_folder, device="cpu")
        engine = make_engine(cfg.backend, model, tokenizer, spec, cfg)
        self.runner = EpisodeRunner.for_env(engine, tokenizer, spec.env_name, spec.env_options, cfg,
                                            spec.max_episode_tokens)

    def play(self, tasks: Sequence[dict], group_size: int, seed: int, temperature: float | None = None,
             first_group: int = 0):
        trajs, stats = self.runner.play(tasks, group_size, seed, temperature, first_group)
        return trajs, stats.as_dict()

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> float:
        t0 = time.perf_counter()
        self.runner.engine.update_weights(state_dict)
        return time.perf_counter() - t0

    def ping(self) -> int:
        return os.getpid()


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local clusters: no token files under $HOME
    # Ray starts its workers at nice 15, so rollout actors lose the CPU to any other busy process
    # (the main job's iterations took 3-9x longer beside a compile); ours are the job's main work.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if cfg.address:
        ray.init(address=cfg.address, namespace=cfg.namespace, log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.num_cpus, namespace=cfg.namespace, include_dashboard=False, log_to_driver=False)


class RolloutPool:
    """N rollout workers behind one call; tasks are split into contiguous chunks, groups intact."""

    def __init__(self, spec: WorkerSpec, cfg: RolloutConfig, ray_cfg: RayConfig | None = None):
        self.cfg = cfg
        threads = cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker))
        if cfg.num_workers == 0:
            self.local: RolloutWorker | None = RolloutWorker(spec, cfg, threads=cfg.threads_per_worker)
            self.actors: list = []
            return
        import ray

        init_ray(ray_cfg or RayConfig())
        actor_cls = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)(RolloutWorker)
        self.local = None
        self._new_actor = lambda: actor_cls.remote(spec, cfg, threads)
        self._weights_ref = None  # the last weights pushed: a replacement actor loads them
        self.restarts = 0
        self.actors = [self._new_actor() for _ in range(cfg.num_workers)]
        ray.get([a.ping.remote() for a in self.actors])  # surface construction errors here

    def play(self, tasks: Sequence[dict], group_size: int, seed: int,
             temperature: float | None = None) -> tuple[list[Trajectory], dict[str, float]]:
        if self.local is not None:
            return self.local.play(tasks, group_size, seed, temperature)
        import ray

        k = len(self.actors)
        bounds = [round(j * len(tasks) / k) for j in range(k + 1)]
        # Each share keeps its global group ids and seeds (first_group): one worker plays exactly
        # what the in-process runner would.
        calls = [(j, a.play.remote(list(tasks[bounds[j]:bounds[j + 1]]), group_size, seed, temperature, bounds[j]))
                 for j, a in enumerate(self.actors) if bounds[j + 1] > bounds[j]]
        trajs: list[Trajectory] = []
        stats: dict[str, float] = {}
        for j, ref in calls:
            try:
                part, part_stats = ray.get(ref)
            except ray.exceptions.ActorDiedError as e:
                # A worker process died (an env's native code can take it down). Replace it, give
                # it the current weights and replay its share once; a second death is an error.
                part, part_stats = self._replay_on_new_actor(j, e, list(tasks[bounds[j]:bounds[j + 1]]),
                                                             group_size, seed, temperature, bounds[j])
            trajs += part
            for key, v in part_stats.items():
                # Phases run in parallel across workers: time is the slowest worker's, counts add up.
                stats[key] = max(stats.get(key, 0.0), v) if key.endswith("_s") else stats.get(key, 0) + v
        return trajs, stats

    def _replay_on_new_actor(self, j: int, err: Exception, tasks: list[dict], group_size: int, seed: int,
                             temperature: float | None, first_group: int):
        import ray

        warnings.warn(f"rollout worker {j} died ({str(err).splitlines()[0][:200]}); replacing it and "
                      f"replaying its {len(tasks)} tasks", RuntimeWarning, stacklevel=3)
        self.restarts += 1
        self.actors[j] = actor = self._new_actor()
        if self._weights_ref is not None:
            ray.get(actor.update_weights.remote(self._weights_ref))
        return ray.get(actor.play.remote(tasks, group_size, seed, temperature, first_group))

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> float:
        """Push new policy weights to every worker; returns the wall seconds it took."""
        t0 = time.perf_counter()
        if self.local is not None:
            self.local.update_weights(state_dict)
        else:
            import ray

            self._weights_ref = ray.put(dict(state_dict))  # one copy in the object store, read by every actor
            ray.get([a.update_weights.remote(self._weights_ref) for a in self.actors])
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        if self.local is not None:
            self.local.runner.close()
        for a in self.actors:
            import ray

            ray.kill(a)
        self.actors = []
