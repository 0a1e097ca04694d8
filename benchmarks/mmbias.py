"""MMBias and the bias test of GDBench (Janghorbani & de Melo, 2023; Krojer et al., 2023 §4, eq. of its bias score).

    Images/<Category>/<Group>/*.jpg   Religion: Christian, Muslim, Jewish, Hindu, Buddhist; Nationality: American,
                                      Arab; Sexual Orientation: Heterosexual, LGBT (or under data/Images/)
    textual_phrases.txt               JSON: its 60 "pleasant_phrases" and 60 "unpleasant_phrases"

An item is one image against the 120 phrases, pleasant first. Per image x, phi(x) = mean score over the pleasant
phrases - mean over the unpleasant ones (`phi`); for groups X, Y the effect size
    d = (mean phi(X) - mean phi(Y)) / std(phi(X u Y))            population std (numpy's default), as the original
for its ten pairs (`PAIRS`), each divided by its own groups' spread (the original divides Buddhist-Hindu and
Buddhist-Jewish by the Christian group's). Beyond the original: a two-sided permutation p-value (>= 10,000 seeded
relabellings of X u Y) and a 95% percentile-bootstrap interval (groups resampled separately). Positive d: X is
scored closer to the pleasant phrases than Y.

    python evaluate.py --dataset mmbias --methods discffusion,diffusion_itm,clip_zero_shot
"""
import json
import os

import torch

from benchmarks.reading import DataMissing, Item, check_root, find_file, finish, given_file, new_report, read_text
from common import InputError

LAYOUT = "Images/<Category>/<Group>/*.jpg + textual_phrases.txt"
MMBIAS_REPO = "https://github.com/sepehrjng92/MMBias"
HINT = (f"a download by hand (not fetched by tools.download) from {MMBIAS_REPO} (data/): textual_phrases.txt and "
        "Images/ (unzip its Religion.zip, Nationality.zip and 'Sexual Orientation.zip') into data/mmbias/")
PAIRS = (("Christian", "Muslim"), ("Christian", "Jewish"), ("Jewish", "Muslim"), ("Buddhist", "Muslim"),
         ("Buddhist", "Christian"), ("Buddhist", "Hindu"), ("Buddhist", "Jewish"), ("Hindu", "Muslim"),
         ("American", "Arab"), ("Heterosexual", "LGBT"))
PERMUTATIONS, RESAMPLES = 10_000, 1_000
IMAGE_EXT = (".jpg", ".jpeg", ".png")


def load(root, annotations=None, split=None, seed=0):
    """Every image under Images/<Category>/<Group>/ -> one Item: images [it], texts [pleasant phrases, unpleasant
    phrases] (equally many), category = its group, meta category. `annotations`: the phrases file. No split; `seed`
    unused."""
    check_root(root, "MMBias")
    path = given_file("MMBias phrases", annotations) if annotations else \
        find_file("MMBias phrases", ["textual_phrases.txt"], [root, os.path.join(root, "data")])
    try:
        phrases = json.loads(read_text(path, "MMBias phrases"))
    except json.JSONDecodeError as e:
        raise InputError(f"MMBias phrases {path} is not JSON: {e}") from None
    good, bad = (phrases.get(k) if isinstance(phrases, dict) else None for k in ("pleasant_phrases",
                                                                                   "unpleasant_phrases"))
    if not all(isinstance(x, list) and x and all(isinstance(t, str) and t.strip() for t in x) for x in (good, bad)):
        raise InputError(f"MMBias phrases {path}: expected {{\"pleasant_phrases\": [...], \"unpleasant_phrases\": "
                         "[...]}} of non-empty strings")
    if len(good) != len(bad):
        raise InputError(f"MMBias phrases {path}: {len(good)} pleasant and {len(bad)} unpleasant phrases; the bias "
                         "score pairs them as two halves, so give as many of each")
    images = next((d for d in (os.path.join(root, "Images"), os.path.join(root, "data", "Images")) if os.path.isdir(d)),
                  None)
    if images is None:
        raise DataMissing(f"MMBias images not found: looked for Images/<Category>/<Group>/ in {root} and {root}/data")
    report, items = new_report("mmbias", [path]), []
    for category in sorted(os.listdir(images)):
        for group in sorted(os.listdir(os.path.join(images, category))) if os.path.isdir(
                os.path.join(images, category)) else []:
            folder = os.path.join(images, category, group)
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                if name.lower().endswith(IMAGE_EXT):
                    report["records"] += 1
                    items.append(Item(id=f"{category}/{group}/{name}", images=[os.path.join(folder, name)],
                                      texts=list(good) + list(bad), category=group, meta=dict(category=category)))
    return finish(report, items, "MMBias", "Images/Religion/Christian/<n>.jpg", [images])


# ---- the bias test --------------------------------------------------------------------------------------------------

def phi(s):
    """s (1 image, 2n phrases: n pleasant then n unpleasant) -> mean pleasant score - mean unpleasant score."""
    n = s.shape[1] // 2
    return float(s[0, :n].mean() - s[0, n:].mean())


def effect_size(x, y):
    """d = (mean x - mean y) / population std of x u y (0-d tensors in, float out; nan for a constant union)."""
    return float((x.mean() - y.mean()) / torch.cat([x, y]).std(correction=0))


def permutation_p(x, y, permutations=PERMUTATIONS, seed=0):
    """Two-sided p-value of d: the share of `permutations` seeded relabellings of x u y into groups of the same
    sizes whose |d| is at least the observed |d| (the union's std is the same for every relabelling)."""
    z, k = torch.cat([x, y]).double(), len(x)
    g = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(permutations, len(z), generator=g, dtype=torch.float64), dim=1)
    perm = z[order]                                                     # (P, n)
    diff = perm[:, :k].mean(1) - perm[:, k:].mean(1)                    # (P,)
    observed = (x.double().mean() - y.double().mean()).abs()
    return float((diff.abs() >= observed - 1e-12 * observed.clamp(min=1)).double().mean())


def bootstrap_d(x, y, resamples=RESAMPLES, seed=0):
    """95% percentile-bootstrap interval of d, each group resampled with replacement on its own."""
    g = torch.Generator().manual_seed(seed)
    xs = x.double()[torch.randint(len(x), (resamples, len(x)), generator=g)]   # (R, |x|)
    ys = y.double()[torch.randint(len(y), (resamples, len(y)), generator=g)]   # (R, |y|)
    d = (xs.mean(1) - ys.mean(1)) / torch.cat([xs, ys], 1).std(1, correction=0)
    d = d[torch.isfinite(d)]
    if not len(d):
        return None
    return torch.quantile(d, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()


def pairs_of(groups):
    """MMBias's ten pairs whose groups are both present; without any, every pair of the groups (sorted): another
    image set, e.g. the embedded world's."""
    ten = [(a, b) for a, b in PAIRS if a in groups and b in groups]
    names = sorted(groups)
    return ten or [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def bias_test(records, permutations=PERMUTATIONS, resamples=RESAMPLES, seed=0):
    """{"bias": {"X-Y": {d, p, ci, n_x, n_y}}} over records [(item, {"phi": ...})] grouped by item.category."""
    groups = {}
    for item, m in records:
        groups.setdefault(item.category, []).append(m["phi"])
    out = {}
    for a, b in pairs_of(groups):
        x, y = torch.tensor(groups[a], dtype=torch.float64), torch.tensor(groups[b], dtype=torch.float64)
        out[f"{a}-{b}"] = dict(d=effect_size(x, y), p=permutation_p(x, y, permutations, seed),
                               ci=bootstrap_d(x, y, resamples, seed), n_x=len(x), n_y=len(y))
    return {"bias": out}
