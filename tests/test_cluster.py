"""Placement on a simulated multi-node Ray cluster (Ray's cluster utilities, three nodes on this
machine with their own CPU counts and custom resources): rollout workers and learner ranks land
where the config's resources say, a node removed mid-run costs exactly its workers' episodes
(infra errors), after which the pool plays on with the workers it has, and a reservation the
cluster cannot hold is a named error."""
from __future__ import annotations

import pytest
from rl_helpers import rl_experiment, tiny_policy, tiny_tokenizer

pytest.importorskip("ray")


@pytest.fixture()
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"learner_node": 2}})
    yield c
    ray.shutdown()
    c.shutdown()


def _policy_folder(tmp_path):
    tok = tiny_tokenizer()
    folder = tmp_path / "policy"
    tiny_policy(tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_actors_land_where_the_resources_say_and_a_lost_node_costs_only_its_episodes(cluster, tmp_path):
    from algos.ranks import LearnerGroup
    from rollout.runner import RolloutConfig
    from rollout.worker import RayConfig, RolloutPool, WorkerSpec

    a = cluster.add_node(num_cpus=1, resources={"rollout_node": 1})
    b = cluster.add_node(num_cpus=1, resources={"rollout_node": 1})
    cluster.wait_for_nodes()
    ray_cfg = RayConfig(address=cluster.address, placement_timeout_s=60)
    folder = _policy_folder(tmp_path)

    # two learner ranks on the head (the one node with learner_node), packed together
    exp = rl_experiment(tmp_path)
    exp.ray = ray_cfg
    exp.learner.num_ranks, exp.learner.resources = 2, {"learner_node": 1}
    group = LearnerGroup(exp, folder)
    try:
        assert group.node_ids() == [cluster.head_node.node_id] * 2
    finally:
        group.shutdown()

    # two rollout workers, one on each rollout node (never on the head)
    spec = WorkerSpec(policy_folder=str(folder), env_name="countdown_search",
                      env_options={"num_inputs": 3, "max_number": 20, "max_turns": 2}, max_episode_tokens=128)
    cfg = RolloutConfig(num_workers=2, cpus_per_worker=1, threads_per_worker=1, resources={"rollout_node": 1},
                        max_turn_tokens=6, replace_timeout_s=10)
    pool = RolloutPool(spec, cfg, ray_cfg)
    try:
        assert sorted(pool.node_ids()) == sorted([a.node_id, b.node_id])
        tasks = [{"id": f"train{i}", "numbers": [3, 4, i + 5], "target": 12 + i} for i in range(4)]
        before, _ = pool.play(tasks, group_size=2, seed=3, temperature=0.0)
        assert len(before) == 8 and not any(t.infra_error for t in before)

        on_b = pool.node_ids().index(b.node_id)  # worker on_b plays tasks 2*on_b, 2*on_b + 1
        cluster.remove_node(b)  # its node goes: no other node has rollout_node free
        with pytest.warns(RuntimeWarning, match=r"could not be replaced within 10 s.*goes on with 1 workers"):
            during, _ = pool.play(tasks, group_size=2, seed=3, temperature=0.0)
        lost = [t for t in during if t.infra_error]
        assert {t.task["id"] for t in lost} == {f"train{2 * on_b}", f"train{2 * on_b + 1}"} and len(lost) == 4
        assert all("no replacement could be placed" in t.infra_error for t in lost)
        kept = [t for t in during if not t.infra_error]  # the live worker's share is what it played before
        assert [t.token_ids for t in kept] == [t.token_ids for t in before if t.task["id"] not in
                                               {x.task["id"] for x in lost}]
        assert len(pool.actors) == 1 and pool.lost == 1

        after, _ = pool.play(tasks, group_size=2, seed=3, temperature=0.0)  # the survivor plays every task
        assert not any(t.infra_error for t in after) and [t.token_ids for t in after] == [t.token_ids for t in before]
    finally:
        pool.shutdown()

    # a reservation the cluster cannot hold fails at once, naming what was asked and what there is
    cfg = RolloutConfig(num_workers=2, cpus_per_worker=1, resources={"gpu_box": 1})
    with pytest.raises(RuntimeError, match=r"could not place 2 rollout workers \(\{'CPU': 1.0, 'gpu_box': 1.0\} each.*"
                       r"it has \{'CPU': 3.0, 'learner_node': 2.0, 'rollout_node': 1.0\} in all"):
        RolloutPool(spec, cfg, RayConfig(address=cluster.address, placement_timeout_s=3))
