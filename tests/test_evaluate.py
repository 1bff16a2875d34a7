"""Evaluation summaries group failures by kind, without the particular numbers."""
from envs.countdown.stats import failure_kind


def test_failure_kinds_drop_particulars_but_keep_the_kind():
    a = failure_kind("operation 1 '50-35=1': wrong arithmetic: 50-35 is 15, not 1")
    b = failure_kind("operation 2 '9*9=10': wrong arithmetic: 9*9 is 81, not 10")
    assert a == b == "operation N : wrong arithmetic"
    assert failure_kind("no 'equal: Goal Reached' line") == "no 'equal: Goal Reached' line"
    assert failure_kind("operation 1 '5*3=15' needs 5 once but the numbers left are [3, 4, 9]") != a
