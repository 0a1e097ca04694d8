"""95% intervals of every number in the tables: a percentile bootstrap over the items, and paired differences.

Each interval resamples the items (CI_RESAMPLES times, seeded), so two methods scored on the same items share their
resamples and their difference is paired; a column's interval covers its items only (its category).
"""
import torch

from datasets import REGISTRY, groups_of


CI_RESAMPLES, CI_SEED = 1000, 0  # every interval: 95% percentile bootstrap over items, the same resamples for a count


def bootstrap_ci(values, resamples=1000, seed=0, level=0.95):
    """(low, high) percentile-bootstrap interval of the mean of per-item `values` (0/1 hits: a percent after x100),
    over `resamples` resamples of the items drawn with `seed`; None without items. The resamples depend only on the
    item count and the seed, so the difference of two methods' hits on the same items is paired (same resamples)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if not len(x):
        return None
    g = torch.Generator().manual_seed(seed)
    means = torch.cat([x[torch.randint(len(x), (min(100, resamples - k), len(x)), generator=g)].mean(1)
                       for k in range(0, resamples, 100)])                     # (resamples,)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(means, q).tolist()
    return low, high


def _hits(records, flag, which=None):
    return [float(m[flag]) for item, m in records if which is None or which(item.category)]


def percent_ci(values):
    """[low, high] in percent (or points, for differences) of the mean of per-item 0/1 values; None without items."""
    ci = bootstrap_ci(values, CI_RESAMPLES, CI_SEED)
    return ci and [100 * ci[0], 100 * ci[1]]


def intervals(name, records):
    """{"ci": {column: [low, high]}}, and for a data set with a breakdown (Winoground's Table 10) {"per_<name>_ci":
    {group: {column: [low, high]}}} of its all-item columns."""
    row = REGISTRY[name]
    out = {"ci": {col: percent_ci(_hits(records, flag, which)) for col, flag, which in row.columns if flag}}
    if row.breakdown:
        out[f"per_{row.breakdown.name}_ci"] = {
            g: {col: percent_ci(_hits(recs, flag)) for col, flag, which in row.columns if which is None and flag}
            for g, recs in groups_of(name, records).items()}
    return out


def paired_differences(name, first, other):
    """{column: {difference, ci, n}}: `other` minus `first` in points, item by item (two evaluate_items results on
    the same items; the same resamples for both); None when they scored different items."""
    a, b = first["items"], other["items"]
    if [r["id"] for r in a] != [r["id"] for r in b]:
        return None
    out = {}
    for col, flag, which in REGISTRY[name].columns:
        if flag is None:                                    # a set-level column: no per-item difference
            out[col] = dict(difference=None, ci=None, n=0)
            continue
        d = [float(y[flag]) - float(x[flag]) for x, y in zip(a, b) if which is None or which(x["category"])]
        out[col] = dict(difference=100 * sum(d) / len(d) if d else None, ci=percent_ci(d), n=len(d))
    return out
