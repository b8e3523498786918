"""Standard error and the exact McNemar test against hand-computed values and independent implementations."""
import itertools
import math

import pytest
from scipy.stats import binomtest

from vlmquant.errors import VlmquantError
from vlmquant.report.significance import is_binary, mcnemar_p, standard_error


def paired(b, c, same_right=3, same_wrong=2):
    """Two runs' 0/1 scores: b questions right only in the first, c only in the second, the rest agreeing."""
    pairs = [(1, 0)] * b + [(0, 1)] * c + [(1, 1)] * same_right + [(0, 0)] * same_wrong
    return {i: x for i, (x, _) in enumerate(pairs)}, {i: y for i, (_, y) in enumerate(pairs)}


def sign_flip_p(b, c):
    """The exact test by enumeration: each discordant question is right in either run with probability 1/2;
    p = the share of the 2^n assignments at least as unbalanced as the observed one."""
    n = b + c
    flips = list(itertools.product((0, 1), repeat=n))
    return sum(1 for f in flips if abs(2 * sum(f) - n) >= abs(b - c)) / len(flips)


def test_standard_error_of_an_accuracy():
    scores = {i: 1.0 if i < 950 else 0.0 for i in range(1000)}
    assert standard_error(scores) == pytest.approx(math.sqrt(0.95 * 0.05 / 1000))  # 0.00689
    assert standard_error({0: 1, 1: 1}) == 0
    assert standard_error({i: float(i) for i in range(4)}) == pytest.approx(math.sqrt(1.25 / 4))  # var 1.25
    assert math.isnan(standard_error({}))


@pytest.mark.parametrize("b, c, expected", [(0, 5, 2 / 32), (1, 9, 22 / 1024), (5, 0, 2 / 32), (3, 3, 1.0),
                                            (0, 0, 1.0), (4, 3, 1.0)])
def test_mcnemar_by_hand(b, c, expected):
    assert mcnemar_p(*paired(b, c)) == pytest.approx(expected)


@pytest.mark.parametrize("b, c", [(0, 1), (2, 7), (6, 6), (9, 4), (1, 12), (0, 14)])
def test_mcnemar_equals_enumeration_and_scipy(b, c):
    first, second = paired(b, c)
    p = mcnemar_p(first, second)
    assert p == pytest.approx(sign_flip_p(b, c), rel=1e-12)
    assert p == pytest.approx(binomtest(b, b + c, 0.5).pvalue if b + c else 1.0, rel=1e-9)
    assert mcnemar_p(second, first) == p  # symmetric


def test_mcnemar_on_a_thousand_questions():
    """n = 1000 questions, 110 discordant: 2^110 and the binomial coefficients stay exact integers."""
    p = mcnemar_p(*paired(40, 70, same_right=850, same_wrong=40))
    assert p == pytest.approx(binomtest(40, 110, 0.5).pvalue, rel=1e-9)
    assert 0.004 < p < 0.006


def test_mcnemar_refuses_other_questions_and_non_binary_scores():
    first, second = paired(2, 3)
    del second[0]
    with pytest.raises(VlmquantError, match=r"^mbq vs rtn: the two runs were scored on different questions "
                                            r"\(10 vs 9; doc_id 0 in one only\)"):
        mcnemar_p(first, second, "mbq vs rtn")
    with pytest.raises(VlmquantError, match="needs 0/1 scores"):
        mcnemar_p({0: 0.5}, {0: 1.0})
    assert is_binary({0: 1.0, 1: 0}) and not is_binary({0: 0.5})
