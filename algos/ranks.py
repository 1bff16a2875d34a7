"""Several learner ranks: the RL update data-parallel over Ray actors (`learner.num_ranks > 1`).

    learner, tokenizer = make_learner(exp, policy_folder)   # a Learner, or a LearnerGroup of N ranks
    metrics = learner.update(trajs, seed)                    # every rank: the whole batch, its share of it
    pool.update_weights(learner.policy_state_dict())         # gathered once (ZeRO-3: from every rank)
    learner.save(run_dir, step, tokenizer, state, keep)      # each rank its partition, rank 0 the rest

The driver (launch.py's process) stays one process: it plays the episodes, hands every rank the
same trajectories, and gets the update's metrics from rank 0. Each rank is a Ray actor holding a
`Learner` (algos/learner.py) in one torch.distributed group — NCCL where the ranks hold GPUs
(`learner.gpus_per_rank`), gloo on CPUs — so DeepSpeed runs data-parallel across them with any
ZeRO stage: the ranks score and train on interleaved shares of each mini-batch, and the gradients
are averaged at each optimizer step, which makes N ranks compute the update one rank computes
(tests/test_ranks.py checks it for ZeRO 0, 2 and 3 within fp32 round-off).

A rank that dies mid-update fails the iteration with `LearnerRankError`; the run resumes from its
last checkpoint (`launch.py train ... --resume`), which N ranks write and read together.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch

from algos.checkpoint import load_policy
from algos.config import Experiment
from algos.learner import Learner
from algos.runtime import WORLD_OF_ONE
from rollout.trajectory import Trajectory
from rollout.worker import in_bundle, init_ray, reserve


class LearnerRankError(RuntimeError):
    """A learner rank died or failed; the message says which and how to continue."""


def make_learner(exp: Experiment, policy_folder: str | Path):
    """(learner, tokenizer) for the RL stage: a `Learner` in this process for one rank, a
    `LearnerGroup` of Ray actors for several; both start from the policy in `policy_folder`."""
    model, tokenizer = load_policy(policy_folder)
    if exp.learner.num_ranks == 1:
        return Learner(exp, model, tokenizer.pad_token_id), tokenizer
    del model  # each rank loads its own copy
    return LearnerGroup(exp, policy_folder), tokenizer


class LearnerRank:
    """One rank: a Ray actor that joins the group in `setup` and then runs the `Learner` calls."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.learner: Learner | None = None

    def address(self) -> tuple[str, int]:
        """(this node's IP, a free port): where rank 0 hosts the group's rendezvous."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, exp: Experiment, policy_folder: str, master: tuple[str, int], threads: int,
              optimizer_cls=torch.optim.AdamW) -> None:
        # What a launcher gives each process. Ray shows a GPU actor only its own GPU(s), so the
        # local rank is 0; DeepSpeed's initialize then joins the group (all ranks block until all are in).
        os.environ.update({"MASTER_ADDR": master[0], "MASTER_PORT": str(master[1]), "RANK": str(self.rank),
                           "WORLD_SIZE": str(self.world), "LOCAL_RANK": "0",
                           WORLD_OF_ONE: "0"})  # a rank's group: not the world of one a parent may have left marked
        torch.set_num_threads(threads)
        model, tokenizer = load_policy(policy_folder)
        self.learner = Learner(exp, model, tokenizer.pad_token_id, optimizer_cls=optimizer_cls)

    def update(self, trajs: list[Trajectory], seed: int) -> dict[str, float] | None:
        metrics = self.learner.update(trajs, seed=seed)
        return metrics if self.rank == 0 else None

    def policy_state_dict(self) -> dict[str, torch.Tensor] | None:
        weights = self.learner.policy_state_dict()  # collective under ZeRO-3: every rank takes part
        return weights if self.rank == 0 else None

    def save(self, run_dir: str, step: int, tokenizer, state: dict[str, Any], keep: int) -> str:
        return str(self.learner.save(run_dir, step, tokenizer, state, keep))

    def load(self, ck: str) -> dict[str, Any]:
        return self.learner.load(Path(ck))

    def parameters(self) -> dict[str, torch.Tensor]:
        """The policy's full weights (fp32, CPU): for tests comparing ranks."""
        return self.learner.policy_state_dict()

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class LearnerGroup:
    """`learner.num_ranks` ranks behind the `Learner` calls the RL loop makes."""

    def __init__(self, exp: Experiment, policy_folder: str | Path, optimizer_cls=torch.optim.AdamW):
        import ray

        cfg = exp.learner
        init_ray(exp.ray)
        bundle = {"CPU": cfg.cpus_per_rank, "GPU": cfg.gpus_per_rank, **cfg.resources}
        self.placement = reserve([bundle] * cfg.num_ranks, cfg.placement, "learner ranks", exp.ray.placement_timeout_s,
                                 local=exp.ray.address is None)
        actor = ray.remote(num_cpus=cfg.cpus_per_rank, num_gpus=cfg.gpus_per_rank,
                           resources=cfg.resources or None)(LearnerRank)
        self.ranks = [actor.options(**in_bundle(self.placement, r)).remote(r, cfg.num_ranks)
                      for r in range(cfg.num_ranks)]
        threads = cfg.threads_per_rank or max(1, int(cfg.cpus_per_rank))
        master = self._call(lambda: [self.ranks[0].address.remote()], "start")[0]
        self._call(lambda: [r.setup.remote(exp, str(policy_folder), master, threads, optimizer_cls)
                            for r in self.ranks], "set up")

    def _call(self, remote_calls, what: str) -> list:
        """The results of one call on every rank, in rank order. The first rank to fail fails the
        call at once (the others may wait forever in a collective for it): the group is stopped."""
        import ray

        refs = remote_calls()
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # raises if that rank failed
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            rank = refs.index(done[0])
            self.shutdown()
            raise LearnerRankError(
                f"learner rank {rank} failed to {what} ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                "the update was not applied: rerun with --resume to continue from the last checkpoint") from None
        return ray.get(refs)

    def pids(self) -> list[int]:
        import ray

        return ray.get([r.pid.remote() for r in self.ranks])

    def node_ids(self) -> list[str]:
        import ray

        return ray.get([r.node_id.remote() for r in self.ranks])

    def update(self, trajs: list[Trajectory], seed: int = 0) -> dict[str, float]:
        import ray

        ref = ray.put(trajs)  # one copy in the object store, read by every rank
        return self._call(lambda: [r.update.remote(ref, seed) for r in self.ranks], "update")[0]

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        return self._call(lambda: [r.policy_state_dict.remote() for r in self.ranks], "gather the weights")[0]

    def save(self, run_dir: str | Path, step: int, tokenizer, state: dict[str, Any], keep: int) -> Path:
        return Path(self._call(lambda: [r.save.remote(str(run_dir), step, tokenizer, state, keep)
                                        for r in self.ranks], "save a checkpoint")[0])

    def load(self, ck: Path) -> dict[str, Any]:
        return self._call(lambda: [r.load.remote(str(ck)) for r in self.ranks], "load a checkpoint")[0]

    def parameters(self) -> list[dict[str, torch.Tensor]]:
        return self._call(lambda: [r.parameters.remote() for r in self.ranks], "gather the weights")

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for r in self.ranks:
            ray.kill(r)
        if self.ranks:
            remove_placement_group(self.placement)
        self.ranks = []
