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
from rollout.machine import machine_name, native_bf16
from rollout.runner import EpisodeRunner, RolloutConfig
from rollout.trajectory import Trajectory


class RayConfig(BaseModel):
    """Where Ray runs (the `ray` section). address None starts a local cluster on this machine."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="'auto' or 'host:port' of a running cluster; None = local")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local cluster; None = all")
    namespace: str = "turnstile"
    placement_timeout_s: float = Field(
        300.0, gt=0, description="how long to wait for the cluster to reserve the rollout workers' and learner "
        "ranks' resources before failing with what was asked and what the cluster has")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build itself, picklable for Ray."""

    policy_folder: str  # a save_pretrained folder (model + tokenizer): the starting weights
    env_name: str
    env_options: dict[str, Any]
    max_episode_tokens: int = 1024
    # the recipe's runtime.precision: a bf16 one (or auto) lets rollout.dtype=auto roll out in bf16 on a
    # CPU that computes bf16 natively (engine_placement)
    precision: str = "fp32"


# Below this width a CPU engine runs faster in fp32 even where bf16 is native: the 1.1M policy
# (hidden 128) decoded at 0.70x fp32's speed in bf16 on an AVX512-BF16 EPYC, where the 25.6M one
# (hidden 512) ran 0.99x single-turn and 1.88x with sessions (1.19x / 1.36x on a Xeon with AMX).
BF16_MIN_HIDDEN = 512


def engine_placement(cfg: RolloutConfig, precision: str = "fp32", hidden_size: int | None = None) -> tuple[str, str]:
    """(device, dtype) of this process's engine from `rollout.device` / `rollout.dtype`. Resolved
    inside the worker: a Ray actor sees a GPU only if it reserved one (gpus_per_worker).

    dtype auto: bfloat16 on CUDA; on a CPU, bfloat16 where the recipe trains in bf16 (`precision`:
    runtime.precision amp_bf16, bf16 or auto), the CPU computes it natively (AMX or AVX512-BF16) and
    the policy is wide enough to gain from it (`hidden_size` ≥ BF16_MIN_HIDDEN; docs/rollout.md has
    the tables), else float32 (exact log-probs, and the only fast choice where bf16 is emulated)."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("rollout.device=cuda but this rollout worker sees no GPU (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); set rollout.gpus_per_worker or device=cpu")
    if cfg.dtype != "auto":
        return device, cfg.dtype
    if device == "cuda":
        return device, "bfloat16"
    wants_bf16 = (precision == "auto" or "bf16" in precision) and (hidden_size or 0) >= BF16_MIN_HIDDEN
    return device, "bfloat16" if wants_bf16 and native_bf16(torch.device("cpu")) else "float32"


def make_engine(backend: str, model, tokenizer, spec: WorkerSpec, cfg: RolloutConfig):
    device, dtype = engine_placement(cfg, spec.precision, getattr(model.config, "hidden_size", None))
    if cfg.dtype == "auto":
        print(f"rollout engine ({backend}): {dtype} on {device} (rollout.dtype=auto, runtime.precision="
              f"{spec.precision}; {machine_name()})", flush=True)
    if backend == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(spec.policy_folder, dtype=dtype, device=device, max_batch_size=cfg.max_batch_size,
                          constrain_actions=cfg.constrain_actions)
    from rollout.engine import TorchEngine

    engine = TorchEngine(model, pad_token_id=tokenizer.pad_token_id, device=device,
                         dtype=getattr(torch, dtype), max_batch_size=cfg.max_batch_size)
    if engine.decoder_attention not in (None, "sdpa"):  # a choice was made (timed, or forced): say which
        print(f"rollout engine (torch): decode attention {engine.decoder_attention}", flush=True)
    return engine


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

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int | None = None) -> float:
        t0 = time.perf_counter()
        self.runner.engine.update_weights(state_dict)
        if version is not None:
            self.runner.policy_version = version
        return time.perf_counter() - t0

    def ping(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


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
        # address="local": a cluster of this job's own, even where another job's Ray runs on the machine
        ray.init(address="local", num_cpus=cfg.num_cpus, namespace=cfg.namespace, include_dashboard=False,
                 log_to_driver=False)


def reserve(bundles: list[dict[str, float]], strategy: str, what: str, timeout_s: float, local: bool = False):
    """A Ray placement group holding `bundles` (one per actor), ready; or a RuntimeError naming what
    could not be placed and what the cluster has. All-or-nothing: a job never starts half-placed.
    `local`: the cluster is this machine's, started by this job (nothing will join or free up), so a
    request beyond what is free fails at once instead of after `timeout_s`."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [{k: v for k, v in b.items() if v} for b in bundles]  # Ray refuses zero-sized entries
    need = {k: sum(b.get(k, 0) for b in bundles) for k in {k for b in bundles for k in b}}

    def shortfall() -> dict[str, float]:
        have = ray.available_resources() if local else ray.cluster_resources()
        return {k: v for k, v in need.items() if v > have.get(k, 0) + 1e-9}

    short = shortfall()
    # a placement group this job just removed frees its resources a moment later: give it that moment
    deadline = time.monotonic() + min(timeout_s, 20.0)
    while short and local and time.monotonic() < deadline:
        time.sleep(0.2)
        short = shortfall()
    pg = None
    if not short:  # a cluster that has the resources somewhere (or may free them): wait for them
        pg = placement_group(bundles, strategy=strategy)
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            pg = None
    if pg is None:
        why = f"it needs {short} in all ({'free on this machine' if local else 'the cluster has less'})" if short \
            else f"not within {timeout_s:.0f} s"
        raise RuntimeError(
            f"the Ray cluster could not place {len(bundles)} {what} ({bundles[0]} each, strategy {strategy}): {why}; "
            f"it has {_schedulable(ray.cluster_resources())} in all, "
            f"{_schedulable(ray.available_resources())} free. Check the "
            "cpus/gpus per actor and the custom resources the recipe asks for") from None
    return pg


def _schedulable(resources: dict[str, float]) -> dict[str, float]:
    """A cluster's resources without Ray's per-node, memory and placement-group entries (what a
    recipe can ask for)."""
    return {k: v for k, v in sorted(resources.items())
            if not k.startswith("node:") and "memory" not in k and "_group_" not in k}  # placement groups' own


def in_bundle(pg, index: int) -> dict:
    """Ray actor options that put an actor in bundle `index` of placement group `pg`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)}


class _Unplaced(Exception):
    """A dead worker's replacement that could not be placed in time (`actor`: the pending one)."""

    def __init__(self, actor):
        super().__init__("replacement not placed")
        self.actor = actor


@dataclass
class Played:
    """A submitted play: per worker (actor, its tasks, its first group, the pending result), or the
    in-process worker's finished result."""

    calls: list
    local: tuple | None
    group_size: int
    seed: int
    temperature: float | None


class RolloutPool:
    """N rollout workers behind one call; tasks are split into contiguous chunks, groups intact.

    On a Ray cluster the workers are reserved together in one placement group (`rollout.placement`,
    each bundle the worker's CPUs, GPUs and `rollout.resources`). A worker that dies (its process,
    or its node) is replaced in its bundle, which Ray moves to a live node when one can host it,
    and its share is replayed; when no replacement can be placed within `rollout.replace_timeout_s`
    its episodes become infra errors (dropped from the update, counted) and the pool goes on with
    the workers it has.
    """

    def __init__(self, spec: WorkerSpec, cfg: RolloutConfig, ray_cfg: RayConfig | None = None):
        self.cfg = cfg
        threads = cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker))
        self.version = 0  # the policy version of the weights last pushed
        if cfg.num_workers == 0:
            self.local: RolloutWorker | None = RolloutWorker(spec, cfg, threads=cfg.threads_per_worker)
            self.actors: list = []
            return
        import ray

        ray_cfg = ray_cfg or RayConfig()
        init_ray(ray_cfg)
        bundle = {"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker, **cfg.resources}
        self.placement = reserve([bundle] * cfg.num_workers, cfg.placement, "rollout workers",
                                 ray_cfg.placement_timeout_s, local=ray_cfg.address is None)
        actor_cls = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
                               resources=cfg.resources or None)(RolloutWorker)
        self.local = None
        # worker j lives in bundle j of the reservation (a replacement takes its place there)
        self._new_actor = lambda j: actor_cls.options(**in_bundle(self.placement, j)).remote(spec, cfg, threads)
        self._weights_ref = None  # the last weights pushed: a replacement actor loads them
        self.restarts = 0
        self.lost = 0  # workers dropped because no replacement could be placed
        self.actors = [self._new_actor(j) for j in range(cfg.num_workers)]
        self.bundles = list(range(cfg.num_workers))  # each live actor's bundle
        ray.get([a.ping.remote() for a in self.actors])  # surface construction errors here

    def play(self, tasks: Sequence[dict], group_size: int, seed: int,
             temperature: float | None = None) -> tuple[list[Trajectory], dict[str, float]]:
        """Play `group_size` episodes of each task on the workers; returns them in task order."""
        return self.collect(self.submit(tasks, group_size, seed, temperature))

    def submit(self, tasks: Sequence[dict], group_size: int, seed: int, temperature: float | None = None) -> Played:
        """Start playing (returns at once; `collect` waits for the episodes). Calls reach each
        worker in order, so a play submitted before `update_weights` plays the older weights."""
        if self.local is not None:
            return Played([], self.local.play(tasks, group_size, seed, temperature), group_size, seed, temperature)
        k = len(self.actors)
        bounds = [round(j * len(tasks) / k) for j in range(k + 1)]
        # Each share keeps its global group ids and seeds (first_group): one worker plays exactly
        # what the in-process runner would.
        shares = [(a, list(tasks[bounds[j]:bounds[j + 1]]), bounds[j]) for j, a in enumerate(self.actors)
                  if bounds[j + 1] > bounds[j]]
        calls = [(a, share, first, a.play.remote(share, group_size, seed, temperature, first))
                 for a, share, first in shares]
        return Played(calls, None, group_size, seed, temperature)

    def collect(self, played: Played) -> tuple[list[Trajectory], dict[str, float]]:
        """The episodes of a `submit`, in task order, once every worker has played its share."""
        if played.local is not None:
            return played.local
        import ray

        trajs: list[Trajectory] = []
        stats: dict[str, float] = {}
        lost: list = []
        for actor, share, first, ref in played.calls:
            try:
                part, part_stats = ray.get(ref)
            except ray.exceptions.ActorDiedError as e:
                # A worker process died (an env's native code can take it down, or its node went).
                # Replace it, give it the current weights and replay its share once; a second death
                # is an error, and a replacement that cannot be placed loses the share.
                try:
                    part, part_stats = self._replay(actor, e, share, played, first)
                except _Unplaced as unplaced:
                    part, part_stats = lost_episodes(share, played.group_size, first, self.cfg.replace_timeout_s), {}
                    lost.append(unplaced.actor)
            trajs += part
            for key, v in part_stats.items():
                # Phases run in parallel across workers: time is the slowest worker's, counts add up.
                stats[key] = max(stats.get(key, 0.0), v) if key.endswith("_s") else stats.get(key, 0) + v
        if lost:
            self._drop(lost)
        return trajs, stats

    def _replay(self, dead, err: Exception, tasks: list[dict], played: Played, first_group: int):
        """Replay a dead worker's share on its replacement (made here, in its bundle, unless an
        earlier collect already replaced it; then on a live worker, which has the current weights)."""
        import ray

        if dead not in self.actors:
            if not self.actors:
                raise RuntimeError("every rollout worker was lost and none could be replaced")
            actor = self.actors[0]
        else:
            j = self.actors.index(dead)
            warnings.warn(f"rollout worker {j} died ({str(err).splitlines()[0][:200]}); replacing it and "
                          f"replaying its {len(tasks)} tasks", RuntimeWarning, stacklevel=3)
            self.restarts += 1
            self.actors[j] = actor = self._new_actor(self.bundles[j])
            # the replacement must come up within the timeout (ping); once up, its replay takes as long as it takes
            try:
                ray.get(actor.ping.remote(), timeout=self.cfg.replace_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise _Unplaced(actor) from None
            if self._weights_ref is not None:
                ray.get(actor.update_weights.remote(self._weights_ref, self.version))
        return ray.get(actor.play.remote(tasks, played.group_size, played.seed, played.temperature, first_group))

    def _drop(self, lost: list) -> None:
        """Go on without the workers whose replacement could not be placed."""
        import ray

        gone = [j for j, a in enumerate(self.actors) if a in lost]
        warnings.warn(f"rollout workers {gone} could not be replaced within {self.cfg.replace_timeout_s:.0f} s; "
                      f"their episodes are infra errors and the pool goes on with {len(self.actors) - len(gone)} "
                      "workers", RuntimeWarning, stacklevel=3)
        for j in sorted(gone, reverse=True):
            ray.kill(self.actors[j])  # the pending replacement: it would take a bundle when one frees up
            del self.actors[j], self.bundles[j]
        self.lost += len(gone)
        if not self.actors:
            raise RuntimeError("every rollout worker was lost and none could be replaced: the cluster has no "
                               f"node that can host one ({ray.available_resources()} free)")

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int | None = None,
                       wait: bool = True) -> float:
        """Push new policy weights (policy `version`: the learner updates they hold) to every worker;
        returns the wall seconds it took. `wait=False` returns once the weights are in the object
        store: each worker loads them after the plays already submitted to it (rollout.mode=async)."""
        t0 = time.perf_counter()
        if version is not None:
            self.version = version
        if self.local is not None:
            self.local.update_weights(state_dict, self.version)
        else:
            import ray

            self._weights_ref = ray.put(dict(state_dict))  # one copy in the object store, read by every actor
            loads = [a.update_weights.remote(self._weights_ref, self.version) for a in self.actors]
            if wait:
                ray.get(loads)
        return time.perf_counter() - t0

    def node_ids(self) -> list[str]:
        """The Ray node each live worker runs on."""
        import ray

        return ray.get([a.node_id.remote() for a in self.actors])

    def shutdown(self) -> None:
        if self.local is not None:
            self.local.runner.close()
            return
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        self.actors = []
        remove_placement_group(self.placement)


def lost_episodes(tasks: Sequence[dict], group_size: int, first_group: int, timeout_s: float) -> list[Trajectory]:
    """The episodes of a share whose worker was lost: infra errors, with the groups they would have had."""
    why = f"the rollout worker was lost and no replacement could be placed within {timeout_s:.0f} s"
    return [Trajectory(task=task, group=first_group + k, infra_error=why)
            for k, task in enumerate(tasks) for _ in range(group_size)]
