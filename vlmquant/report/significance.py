"""Standard error of a score over questions, and the exact McNemar test of two runs on the same questions.

Scores are per-question values keyed by lmms-eval's doc_id ({doc_id: score}); exact_match is 0 or 1.
"""
import math

from vlmquant.errors import VlmquantError


def standard_error(scores):
    """Standard error of the mean of `scores` ({doc_id: float}): sqrt(Σ(x − x̄)² / n) / sqrt(n).

    For 0/1 scores this is the binomial sqrt(p(1 − p)/n) of an accuracy p over n questions (lmms-eval's own
    *_stderr uses n − 1 in the variance). NaN for no questions."""
    values = list(scores.values())
    n = len(values)
    if n == 0:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((x - mean) ** 2 for x in values) / n / n)


def is_binary(scores):
    """Every score is 0 or 1 (an accuracy's per-question correctness)."""
    return all(x in (0, 1) for x in scores.values())


def mcnemar_p(first, second, where="scores"):
    """Exact two-sided McNemar p-value of two runs scored 0/1 on the same questions ({doc_id: 0 or 1} each).

    Of the n discordant questions (right in one run, wrong in the other), b are right only in `first`; under
    the null both kinds are equally likely, b ~ Binomial(n, 1/2), and p = min(1, 2·P(B ≤ min(b, n − b)))
    (McNemar 1947; the exact form of the test as in Fagerland, Lydersen & Laake 2013). 1.0 when n = 0.
    Raises VlmquantError naming `where` when the doc_id sets differ or a score is not 0/1.
    """
    if first.keys() != second.keys():
        only = sorted(first.keys() - second.keys()) or sorted(second.keys() - first.keys())
        raise VlmquantError(f"{where}: the two runs were scored on different questions ({len(first)} vs "
                            f"{len(second)}; doc_id {only[0]} in one only); rerun lmms-eval with the same tasks "
                            "and limit")
    if not (is_binary(first) and is_binary(second)):
        raise VlmquantError(f"{where}: McNemar's test needs 0/1 scores per question (an accuracy)")
    b = sum(1 for k in first if first[k] == 1 and second[k] == 0)
    c = sum(1 for k in first if first[k] == 0 and second[k] == 1)
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)
