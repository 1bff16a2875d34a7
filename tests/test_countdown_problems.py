"""Countdown problem generation, splits, config validation and user files."""

import itertools
import json
import random

import pytest
from pydantic import ValidationError

from envs.countdown import CountdownConfig, CountdownTasks, Problem, load_problems_jsonl
from envs.countdown.problems import split_targets
from envs.countdown.search import can_reach, combine, solve
from envs.countdown.verify import verify_solution


def tasks(**kw):
    return CountdownTasks(CountdownConfig(**{"train_size": 300, "heldout_size": 100, **kw}))


def brute_force(numbers, target):
    """The paper's plain exhaustive DFS, as an independent reference."""
    if len(numbers) == 1:
        return [] if numbers[0] == target else None
    for i, j in itertools.combinations(range(len(numbers)), 2):
        rest = [n for k, n in enumerate(numbers) if k not in (i, j)]
        for result, op in combine(numbers[i], numbers[j]):
            found = brute_force(rest + [result], target)
            if found is not None:
                return [op] + found
    return None


def test_solver_matches_brute_force():
    rng = random.Random(3)
    for _ in range(1500):
        numbers = [rng.randint(0, 25) for _ in range(rng.choice([2, 3, 4]))]
        target = rng.randint(0, 80)
        expected = brute_force(numbers, target)
        assert can_reach(numbers, target) == (expected is not None), (numbers, target)
        assert solve(numbers, target) == expected, (numbers, target)


def test_same_seed_same_problems_other_seed_different():
    for split in ("train", "heldout_seen", "heldout_unseen"):
        a = tasks(seed=5).problems(split)
        assert a == tasks(seed=5).problems(split)
        assert a != tasks(seed=6).problems(split)


def test_first_n_do_not_depend_on_size():
    source = tasks()
    assert source.problems("train", 40) == source.problems("train")[:40]
    assert tasks(train_size=1000).problems("train")[:300] == source.problems("train")


@pytest.mark.parametrize("num_inputs", [2, 3, 4])
def test_every_problem_is_solvable_and_in_range(num_inputs):
    source = tasks(num_inputs=num_inputs, min_number=1, max_number=60)
    for split in source.splits():
        for p in source.problems(split):
            assert len(p.numbers) == num_inputs
            assert all(1 <= n <= 60 for n in p.numbers)
            assert 10 <= p.target <= 100
            verdict = verify_solution(p.numbers, p.target, p.solution)
            assert verdict.ok, (p, verdict.reason)


def test_target_split():
    seen, valid, unseen = split_targets(CountdownConfig())
    # 10% of the 91 targets 10..100 unseen, as the paper; another 10% for the valid split
    assert len(unseen) == 9 and len(valid) == 9 and len(seen) == 73
    assert not set(seen) & set(unseen) and not set(seen) & set(valid) and not set(valid) & set(unseen)
    assert sorted(seen + valid + unseen) == list(range(10, 101))
    assert split_targets(CountdownConfig(seed=1))[2] != unseen
    # the test split keeps the unseen targets it had before the valid split existed
    assert unseen == [17, 18, 21, 29, 36, 39, 51, 54, 86]
    assert split_targets(CountdownConfig(valid_target_frac=0.0)) == (sorted(seen + valid), [], unseen)


def test_valid_split_is_unseen_targets_of_its_own():
    source = tasks(train_size=500, heldout_size=100)
    assert source.splits() == ["train", "valid", "heldout_seen", "heldout_unseen"]
    valid = source.problems("valid")
    assert {p.target for p in valid} <= set(source.valid_targets)
    assert len({p.key for p in valid}) == len(valid)
    others = {p.target for split in ("train", "heldout_seen", "heldout_unseen") for p in source.problems(split)}
    assert not others & set(source.valid_targets)


def test_rl_train_draws_share_no_problem_with_valid_or_any_test_split():
    # sample_tasks is the path RL draws its train tasks from (fresh problems, not the train split)
    source = tasks(num_inputs=3, max_number=20, train_size=50, heldout_size=60)
    drawn = source.sample_tasks("train", 500, random.Random(0))
    drawn_keys = {source.task_key(t) for t in drawn}
    assert len(drawn_keys) > 100
    for split in source.heldout_splits():
        assert not drawn_keys & {source.task_key(t) for t in source.tasks(split)}, split
    assert not {t["target"] for t in drawn} & set(source.valid_targets + source.unseen_targets)


def test_heldout_splits_never_overlap_train():
    source = tasks(train_size=2000, heldout_size=300)
    train = source.problems("train")
    assert {p.target for p in train} <= set(source.seen_targets)
    assert {p.target for p in source.problems("heldout_unseen")} <= set(source.unseen_targets)
    assert not {p.target for p in train} & set(source.unseen_targets)
    train_keys = {p.key for p in train}
    assert not train_keys & {p.key for p in source.problems("heldout_seen")}
    for split in ("heldout_seen", "heldout_unseen"):
        keys = [p.key for p in source.problems(split)]
        assert len(keys) == len(set(keys)), f"{split} has repeated problems"


def test_heldout_seen_excluded_from_train_in_a_small_problem_space():
    # 2 numbers in 1..12 and 15 targets: ~150 problems exist, so without the exclusion a
    # 600-problem train split would certainly repeat held-out ones.
    source = tasks(num_inputs=2, min_number=1, max_number=12, min_target=10, max_target=24,
                   train_size=600, heldout_size=40)
    heldout = {p.key for p in source.problems("heldout_seen")}
    assert len(heldout) == 40
    assert not heldout & {p.key for p in source.problems("train")}
    rng = random.Random(0)
    assert all(source.sample_train(rng).key not in heldout for _ in range(200))


def test_too_small_problem_space_raises_instead_of_hanging():
    # Only one problem exists here (3 and 4 make 12), but 50 distinct ones are asked for.
    with pytest.raises(ValueError, match="heldout_seen: ran out of new problems"):
        tasks(num_inputs=2, min_number=1, max_number=4, min_target=12, max_target=12,
              unseen_target_frac=0.0, heldout_size=50).problems("heldout_seen")
    with pytest.raises(ValueError, match="no solvable problem"):
        tasks(num_inputs=2, min_number=1, max_number=2, min_target=50, max_target=50,
              unseen_target_frac=0.0).problems("train", 1)


def test_no_unseen_or_valid_split_when_no_target_is_held_out_for_it():
    assert tasks(unseen_target_frac=0.0).splits() == ["train", "valid", "heldout_seen"]
    assert tasks(unseen_target_frac=0.0, valid_target_frac=0.0).splits() == ["train", "heldout_seen"]


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"min_number": 20, "max_number": 5}, "min_number"),
        ({"min_target": 200, "max_target": 100}, "min_target"),
        ({"num_inputs": 7}, "num_inputs"),
        ({"train_size": -1}, "train_size"),
        ({"unseen_target_frac": -0.1}, "unseen_target_frac"),
        ({"max_numbr": 5}, "max_numbr"),
    ],
)
def test_config_validation_names_field(kw, field):
    with pytest.raises(ValidationError, match=field):
        CountdownConfig(**kw)


def test_problem_dict_round_trip():
    p = tasks().problems("train")[0]
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Problem.from_dict(d) == p
    assert Problem.from_dict({"numbers": [3, 5], "target": 8}).solution == ("3+5=8",)


def write_lines(tmp_path, lines):
    path = tmp_path / "problems.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_problems_jsonl(tmp_path):
    path = write_lines(tmp_path, [
        '{"numbers": [42, 61, 66], "target": 47}',
        "",
        '{"numbers": [1, 1, 1], "target": 97, "id": "x"}',
    ])
    solvable, unsolvable = load_problems_jsonl(path)
    assert solvable.solvable and verify_solution([42, 61, 66], 47, solvable.solution).ok
    assert not unsolvable.solvable and unsolvable.to_dict()["solvable"] is False


@pytest.mark.parametrize(
    "bad_line, why",
    [
        ('{"numbers": [1, 2, 3], "target": 6', "bad JSON"),
        ('{"numbers": [1, 2, 3]}', "missing key 'target'"),
        ('{"target": 6}', "missing key 'numbers'"),
        ('{"numbers": [1, 2.5, 3], "target": 6}', "integers"),
        ('{"numbers": [1, "2", 3], "target": 6}', "integers"),
        ('{"numbers": [1, 2, 3], "target": "6"}', "target"),
        ('{"numbers": [1, 2, 3], "target": true}', "target"),
        ('{"numbers": [1], "target": 1}', "numbers"),
        ('[1, 2, 3]', "JSON object"),
    ],
)
def test_load_problems_jsonl_errors_name_file_and_line(tmp_path, bad_line, why):
    path = write_lines(tmp_path, ['{"numbers": [1, 2, 3], "target": 6}', bad_line])
    with pytest.raises(ValueError) as e:
        load_problems_jsonl(path)
    msg = str(e.value)
    assert f"{path}:2:" in msg and why in msg


def test_load_problems_jsonl_wrong_count(tmp_path):
    path = write_lines(tmp_path, ['{"numbers": [1, 2, 3], "target": 6}'])
    with pytest.raises(ValueError, match=r":1: expected 4 numbers, got 3"):
        load_problems_jsonl(path, num_inputs=4)


def test_the_main_jobs_test_split_is_pinned():
    # The README's before/after table is scored on these 255 problems; adding the valid split left
    # them exactly as they were (the hash was computed on the code before the valid split existed).
    import hashlib
    import json

    import envs

    source = envs.make_tasks("countdown", num_inputs=3, min_number=1, max_number=10, min_target=10, max_target=100,
                             unseen_target_frac=0.1, heldout_size=255)
    problems = [(t["numbers"], t["target"]) for t in source.tasks("heldout_unseen")]
    digest = hashlib.sha256(json.dumps(problems, sort_keys=True).encode()).hexdigest()[:16]
    assert len(problems) == 255 and digest == "15f9236c3051a24a"
