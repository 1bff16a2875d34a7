"""Stream-of-search writers and the verifier."""

import random
import re

import pytest

from envs.countdown import (
    CountdownConfig,
    CountdownTasks,
    bfs_stream,
    combine,
    dfs_stream,
    mult_heuristic,
    optimal_stream,
    random_stream,
    sum_heuristic,
    verify_solution,
    verify_stream,
)

# The opening of the paper's DFS stream for 47:[42, 61, 66] (sum heuristic).
REFERENCE_DFS = """\
Current State: 47:[42, 61, 66], Operations: []
Exploring Operation: 66-42=24, Resulting Numbers: [61, 24]
Generated Node #0,0: 47:[61, 24] Operation: 66-42=24
Moving to Node #0,0
Current State: 47:[61, 24], Operations: ['66-42=24']
Exploring Operation: 61-24=37, Resulting Numbers: [37]
37,47 unequal: No Solution
Moving to Node #0,0
Current State: 47:[61, 24], Operations: ['66-42=24']
Exploring Operation: 61+24=85, Resulting Numbers: [85]"""


def problems(num_inputs, n):
    config = CountdownConfig(num_inputs=num_inputs, heldout_size=n)
    return CountdownTasks(config).problems("heldout_seen")


def test_combine_follows_paper_rule():
    assert combine(5, 7) == [(12, "5+7=12"), (35, "5*7=35"), (2, "7-5=2")]
    assert combine(12, 4) == [(16, "12+4=16"), (48, "12*4=48"), (8, "12-4=8"), (3, "12/4=3")]
    assert combine(4, 12)[-1] == (3, "12/4=3")
    assert combine(0, 5) == [(5, "0+5=5"), (0, "0*5=0"), (5, "5-0=5")]  # no division by 0
    assert combine(6, 6)[-1] == (1, "6/6=1")


def test_heuristics():
    assert sum_heuristic([47], 47) == 0 and sum_heuristic([40], 47) == 7
    assert sum_heuristic([42, 61, 66], 47) == (5 + 14 + 19) / 3
    # factors of 24 in 2..24: 2 3 4 6 8 12 24
    assert mult_heuristic([5, 13, 30], 24) == 1 + 1 + 6


def test_dfs_matches_reference_stream():
    stream = dfs_stream([42, 61, 66], 47, "sum")
    assert stream.startswith(REFERENCE_DFS + "\n")
    assert stream.endswith("47,47 equal: Goal Reached")
    assert verify_stream(stream).operations == ["61-42=19", "66-19=47"]


def test_bfs_is_deterministic_in_rng_and_numbers_nodes():
    a = bfs_stream([4, 9, 3], 24, 3, "mult", random.Random(4))
    assert a == bfs_stream([4, 9, 3], 24, 3, "mult", random.Random(4))
    lines = a.splitlines()
    assert lines[0] == "Current State: 24:[4, 9, 3], Operations: []"
    generated = re.findall(r"Generated Node #([\d,]+):", a)
    assert generated[:3] == ["0,0", "0,1", "0,2"]  # beam 3 keeps three children of the root
    assert lines[-1] == "24,24 equal: Goal Reached"


def test_bfs_shuffles_kept_children_with_the_rng():
    # the beam's children are tried in an rng order, so seeds give different streams
    streams = {bfs_stream([4, 9, 3], 24, 3, "mult", random.Random(seed)) for seed in range(8)}
    assert len(streams) > 1
    first_tries = {s.splitlines()[1] for s in streams}
    assert len(first_tries) > 1


def test_exhausted_search_says_so_and_does_not_verify():
    # 1,1,1 can never make 50
    for stream in (dfs_stream([1, 1, 1], 50), bfs_stream([1, 1, 1], 50, 2)):
        assert stream.endswith("No solution found.")
        assert not verify_stream(stream).ok


def test_optimal_stream_format():
    stream = optimal_stream([42, 61, 66], 47, ["61-42=19", "66-19=47"])
    assert stream.splitlines() == [
        "Current State: 47:[42, 61, 66], Operations: []",
        "Exploring Operation: 61-42=19, Resulting Numbers: [66, 19]",
        "Generated Node #2: [66, 19] from Operation: 61-42=19",
        "Current State: 47:[66, 19], Operations: ['61-42=19']",
        "Exploring Operation: 66-19=47, Resulting Numbers: [47]",
        "47,47 equal: Goal Reached",
    ]
    # repeated inputs: only one 5 is used up (the paper's version dropped both)
    assert "Resulting Numbers: [5, 10]" in optimal_stream([5, 5, 2], 15, ["5*2=10", "5+10=15"])


@pytest.mark.parametrize("num_inputs, n", [(3, 300), (4, 200)])
def test_verifier_accepts_every_goal_stream_and_optimal_stream(num_inputs, n):
    rng = random.Random(num_inputs)
    goals = {"dfs": 0, "bfs": 0}
    for p in problems(num_inputs, n):
        assert verify_stream(optimal_stream(p.numbers, p.target, p.solution)).ok
        for strategy in ("dfs", "bfs"):
            stream = random_stream(p, rng, strategies=[strategy])
            assert stream.goal_reached == ("equal: Goal Reached" in stream.text)
            assert re.fullmatch(r"dfs|bfs_[1-5]", stream.search_type)
            assert stream.search_type.startswith(strategy)
            assert stream.heuristic in ("sum", "mult")
            verdict = verify_stream(stream.text, p.numbers, p.target)
            assert verdict.ok == stream.goal_reached, (stream.text, verdict.reason)
            if not stream.goal_reached:
                assert stream.text.endswith("No solution found.")
            goals[strategy] += stream.goal_reached
    # both searches succeed on a good share of problems, so the check above has teeth
    assert min(goals.values()) > n // 4, goals


@pytest.mark.parametrize("heuristic", ["sum", "mult"])
@pytest.mark.parametrize("beam", [1, 3, 5])
def test_verifier_accepts_every_bfs_goal_stream(heuristic, beam):
    rng = random.Random(beam)
    for p in problems(4, 40):
        stream = bfs_stream(p.numbers, p.target, beam, heuristic, rng)
        assert verify_stream(stream).ok == ("Goal Reached" in stream)


def goal_stream():
    p = problems(4, 1)[0]
    return p, dfs_stream(p.numbers, p.target, "sum")


def test_rejects_wrong_arithmetic():
    p, stream = goal_stream()
    assert verify_stream(stream).ok
    last = re.findall(r"Exploring Operation: (\d+)([-+*/])(\d+)=(\d+)", stream)[-1]
    a, op, b, c = last
    bad = stream.replace(f"{a}{op}{b}={c}", f"{a}{op}{b}={int(c) + 1}")
    verdict = verify_stream(bad)
    assert not verdict.ok and "wrong arithmetic" in verdict.reason


def test_rejects_reused_number():
    # 24/2=12 consumes the only 2; 12*2 reuses it
    verdict = verify_solution([6, 4, 2], 24, ["6*4=24", "24/2=12", "12*2=24"])
    assert not verdict.ok and "needs 2" in verdict.reason
    verdict = verify_solution([5, 3, 2], 25, ["5*5=25", "3-2=1", "25*1=25"])
    assert not verdict.ok and "needs 5 twice" in verdict.reason
    stream = ("Current State: 25:[5, 3, 2], Operations: []\n"
              "Exploring Operation: 5*5=25, Resulting Numbers: [3, 2, 25]\n"
              "25,25 equal: Goal Reached")
    assert not verify_stream(stream).ok


def test_rejects_unused_numbers_and_negative_and_inexact():
    assert "unused" in verify_solution([2, 3, 4], 5, ["2+3=5"]).reason
    assert "negative" in verify_solution([3, 5], 2, ["3-5=-2"]).reason
    assert "exact division" in verify_solution([7, 2], 3, ["7/2=3"]).reason
    assert "exact division" in verify_solution([0, 5], 0, ["0/5=0"]).reason
    assert "not of the form" in verify_solution([2, 3], 6, ["2 times 3 is 6"]).reason
    assert verify_solution([5, 5, 2], 27, ["5*5=25", "25+2=27"]).ok


def test_rejects_wrong_target():
    p, stream = goal_stream()
    verdict = verify_stream(stream, p.numbers, p.target + 1)
    assert not verdict.ok and str(p.target + 1) in verdict.reason
    # the stream rewritten to claim another target
    forged = stream.replace(f"{p.target},{p.target} equal", f"{p.target + 1},{p.target + 1} equal")
    assert not verify_stream(forged).ok


def test_rejects_stream_for_another_problem():
    p, stream = goal_stream()
    other = list(p.numbers[:-1]) + [p.numbers[-1] + 1]
    verdict = verify_stream(stream, other, p.target)
    assert not verdict.ok and "the problem is" in verdict.reason


def test_accepts_stream_without_its_prompt_line_when_problem_given():
    p, stream = goal_stream()
    completion = stream.split("\n", 1)[1]  # what a model writes after the prompt line
    assert verify_stream(completion, p.numbers, p.target).ok
    assert not verify_stream(completion).ok  # nothing to read the problem from


@pytest.mark.parametrize(
    "garbage",
    ["", "hello", "Goal Reached", "47,47 equal: Goal Reached", "\x00\xff" * 20, "[[[", None, 42,
     "Current State: 47:[a, b], Operations: []\n47,47 equal: Goal Reached"],
)
def test_garbage_is_rejected_with_a_reason(garbage):
    verdict = verify_stream(garbage, [42, 61, 66], 47)
    assert not verdict.ok and verdict.reason
    verdict = verify_stream(garbage)
    assert not verdict.ok and verdict.reason


def test_random_corruptions_never_raise():
    p, stream = goal_stream()
    rng = random.Random(0)
    alphabet = "0123456789+-*/=,[]:' \n#abc"
    accepted = 0
    for _ in range(400):
        chars = list(stream)
        for _ in range(rng.randint(1, 5)):
            chars[rng.randrange(len(chars))] = rng.choice(alphabet)
        verdict = verify_stream("".join(chars), p.numbers, p.target)
        if verdict.ok:  # an edit away from the path can leave it valid; then it must be valid
            accepted += 1
            assert verify_solution(p.numbers, p.target, verdict.operations).ok
    assert accepted < 400
