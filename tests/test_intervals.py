"""tools/intervals.py: the 95% bootstrap intervals of the tables and the paired differences between methods."""
import datasets
from datasets import Item
from tools import intervals


def test_bootstrap_interval_deterministic_contains_the_estimate_and_shrinks():
    hits = [1.0] * 60 + [0.0] * 40
    low, high = intervals.bootstrap_ci(hits, seed=3)
    assert (low, high) == intervals.bootstrap_ci(hits, seed=3) != intervals.bootstrap_ci(hits, seed=4)
    assert low < 0.6 < high
    wide, narrow = intervals.bootstrap_ci(hits[::10] * 1), intervals.bootstrap_ci(hits * 10)
    assert narrow[1] - narrow[0] < (high - low) < wide[1] - wide[0]
    assert abs((high - low) - 2 * 1.96 * (0.6 * 0.4 / 100) ** 0.5) < 0.03     # the normal approximation's width
    a, b = [1.0, 0.0] * 50, [1.0, 1.0] * 50                                    # paired: the same resamples
    d = intervals.bootstrap_ci([x - y for x, y in zip(a, b)], seed=1)
    assert d[0] < -0.5 + 1e-9 and d[1] > -0.5 - 1e-9 and d[1] < 0
    assert intervals.bootstrap_ci([]) is None


def test_intervals_and_paired_differences_on_hand_made_records():
    recs = [(Item(str(k), [], [], ("subject", "object")[k % 2]), dict(correct=k % 3 != 0)) for k in range(30)]
    ci = intervals.intervals("comvg", recs)["ci"]
    assert ci == intervals.intervals("comvg", recs)["ci"] and ci["Predicate"] is None
    for col in ("Subjects", "Objects", "Average"):
        assert ci[col][0] <= datasets.accuracy(recs, "correct", None if col == "Average" else
                                               datasets._is(col.lower()[:-1]))[0] <= ci[col][1]
    rows = lambda flags: {"items": [dict(id=str(k), category="subject", correct=f)  # noqa: E731
                                    for k, f in enumerate(flags)]}
    d = intervals.paired_differences("comvg", rows([True, False] * 10), rows([True, True] * 10))
    assert d["Average"]["difference"] == 50.0 and d["Average"]["n"] == 20 and d["Objects"]["n"] == 0
    assert d["Average"]["ci"][0] > 0                                     # paired: every item improves or ties
    assert intervals.paired_differences("comvg", rows([True]), rows([True, False])) is None
