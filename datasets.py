"""§5.1 data sets: the registry (one row per data set), how an item is judged, and the few-shot split of §5.2.

Each data set is one file in benchmarks/ that reads it as its publisher ships it (its format, its layout text, its
download entry) and one row of `REGISTRY` here (its title, table, columns, judge, aliases, default split, ...). Every
loader yields `Item`s of one shape, so evaluation and training need no per-data-set branches: an item is a small
image-text matching problem whose score matrix is (len(images), len(texts)), judged by its row's rule:

    ComVG          correct = s[pos, sentence] > s[neg, sentence]                   Subjects / Objects / Predicate / Average
    RefCOCOg       rank of the true text among the 10 (others with s >= true)      Top-1 / Top-5
    VQAv2          Binary: the true image beats the 9 others for its statement;     Binary (yes/no) / Other / All
                   Other: the true text of the 10
    Winoground     text  = s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1)
                   image = s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0); group = both     Text / Image / Group, per tag
    VL-CheckList   correct = s(img, POS) > s(img, NEG)                             Attribute / Object / Relation / Average
    GDBench and the compositional suites (docs/gdbench.md; `SUITES`):
    Flickr30K, ImageCoDe   rank of the true image among the 10 (T->I)           Top-1 / Top-5 (R@1 / R@5)
    Flickr30K text, Pets   rank of the true text (I->T)                         Top-1 / Top-5; Pets Top-1 / Per-class
    ARO VG, CLEVR, SugarCrepe   s(img, true) > s(img, false)                    accuracy; per relation / subtask / file
    ARO Order      the true caption beats its 4 perturbations                   accuracy
    SVO-Probes     s[pos, sentence] > s[neg, sentence]                          Subject / Verb / Object / Average
    MMBias         phi = mean s(pleasant) - mean s(unpleasant) per image        effect size d, p-value, interval

    items, report = load_items("comvg")                  # data/comvg (any alias), or root="folder"
    train, test = split_items(items, "0.05", seed=0)     # the few-shot split of §5.2

A tie counts as an error (strict >) and is reported (`prefer_true`: DiffusionITM's rule, the true candidate wins a tie,
for `evaluate.py --ties first`). A column whose flag is None is set-level (the row's `metrics`: ARO's macro over
relations, Pets' per-class mean, SugarCrepe's add / replace / swap means over files). `report` counts what did not
become an item (benchmarks/reading.py). The few-shot split (`split_items`): items that share any (text, image) pair are
joined into one group, the groups are shuffled with the seed, and whole groups go to training until `shots` items are
reached; every other group is the held-out test split, so no test item shares a sentence-image pair with a training
item. Data sets that ship a split (RefCOCOg) draw the shots from their train split and test on `eval_split`.
"""
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
from PIL import Image, ImageStat

from benchmarks import (clevr, coco, coco_order, comvg, embedded, flickr30k, flickr30k_order, flickr30k_text,
                        imagecode, mmbias, pets, refcocog, shapes, sugarcrepe, svo, vg_attribution, vg_relation,
                        vlchecklist, vqav2, winoground)
from benchmarks.reading import DataMissing, Item, read_json  # noqa: F401 - the loaders' item, re-exported
from common import RASTER_FORMATS, InputError


# ---- how an item is judged (§5.1; Tables 1, 8, 10) ----------------------------------------------------------------
# Pure functions of one item's score matrix s (n_images, n_texts), higher = better match.

def pos_image_wins(s):
    """s (2 images, 1 text): the positive image scores higher than the negative one (ComVG)."""
    return bool(s[0, 0] > s[1, 0])

def pos_text_wins(s):
    """s (1 image, 2 texts [POS, NEG]): POS scores higher (VL-CheckList)."""
    return bool(s[0, 0] > s[0, 1])

def true_image_wins(s):
    """s (n images, 1 text): image 0 scores strictly higher than every other image (text-to-image top-1)."""
    return bool((s[1:, 0] < s[0, 0]).all())

def true_image_rank(s):
    """0-based rank of image 0 for text 0 among all images; a tie counts against it (pessimistic)."""
    return int((s[1:, 0] >= s[0, 0]).sum())


def true_text_rank(s):
    """0-based rank of text 0 for image 0 among all texts; a tie counts against it (pessimistic)."""
    return int((s[0, 1:] >= s[0, 0]).sum())

def top_k(s, k):
    return true_text_rank(s) < k

def winoground_hits(s):
    """s (2 images, 2 texts), image k <-> caption k -> (text, image, group) booleans (Thrush et al., 2022)."""
    text = bool(s[0, 0] > s[0, 1]) and bool(s[1, 1] > s[1, 0])   # each image prefers its own caption
    image = bool(s[0, 0] > s[1, 0]) and bool(s[1, 1] > s[0, 1])  # each caption prefers its own image
    return text, image, text and image


class Judge(NamedTuple):
    flags: Callable   # s -> {flag: value}: the per-item correctness flags the columns average
    tied: Callable    # s -> does the true candidate tie exactly with a false one in a comparison the flags make?


def _ranked_texts(s):
    return dict(top1=top_k(s, 1), top5=top_k(s, 5), rank=true_text_rank(s))

def _texts_tied(s):
    return bool((s[0, 1:] == s[0, 0]).any())  # text 0 against the other texts of image 0


def _ranked_images(s):
    rank = true_image_rank(s)
    return dict(top1=rank < 1, top5=rank < 5, rank=rank)


def _images_tied(s):
    return bool((s[1:, 0] == s[0, 0]).any())  # image 0 against the other images of text 0


POS_IMAGE = Judge(lambda s: dict(correct=pos_image_wins(s)), lambda s: bool(s[0, 0] == s[1, 0]))
POS_TEXT = Judge(lambda s: dict(correct=pos_text_wins(s)), _texts_tied)
RANKED_TEXTS = Judge(_ranked_texts, _texts_tied)
RANKED_IMAGES = Judge(_ranked_images, _images_tied)                       # GDBench's T->I retrieval: R@1, R@5
TRUE_TEXT = Judge(lambda s: dict(correct=top_k(s, 1)), _texts_tied)      # ARO's order sets: text 0 of 5 scores highest
BIAS = Judge(lambda s: dict(phi=mmbias.phi(s)), lambda s: False)         # MMBias: no right answer, phi per image
WINOGROUND = Judge(lambda s: dict(zip(("text", "image", "group"), winoground_hits(s))),
                   lambda s: bool(s[0, 0] == s[0, 1] or s[1, 1] == s[1, 0] or s[0, 0] == s[1, 0] or s[1, 1] == s[0, 1]))
# the paper form of VQAv2: Binary items are 1 statement vs 10 images, Other items 1 image vs 10 texts
TRUE_IMAGE_OR_TEXT = Judge(lambda s: dict(correct=true_image_wins(s) if s.shape[0] > 1 else top_k(s, 1)),
                           lambda s: bool((s[1:, 0] == s[0, 0]).any()) if s.shape[0] > 1 else _texts_tied(s))


def _is(*cats):
    return lambda c: c.lower() in cats


def prefer_true(s):
    """DiffusionITM's tie rule: the first candidate (always the true one) wins a tie, as numpy's argmax. The true
    entry s[0, 0] is moved to the next float up, so a strict comparison it tied now holds and one it lost still
    fails (no float lies between the two). For one-row or one-column items; others are returned unchanged."""
    if 1 not in s.shape:
        return s
    s = s.clone()
    s[0, 0] = torch.nextafter(s[0, 0], torch.tensor(float("inf"), dtype=s.dtype))
    return s


# ---- set-level columns: the mean over groups of a per-item flag (ARO's macro over relations, Pets' per class) ------

def group_mean(records, flag, key):
    """The mean over groups key(item) of each group's mean of `flag`, in percent; None without records."""
    groups = {}
    for item, m in records:
        groups.setdefault(key(item), []).append(float(m[flag]))
    return 100.0 * sum(sum(v) / len(v) for v in groups.values()) / len(groups) if groups else None


def group_mean_ci(records, flag, key, resamples=1000, seed=0):
    """95% percentile-bootstrap interval of `group_mean` over resampled items (seeded, as every interval)."""
    if not records:
        return None
    g = torch.Generator().manual_seed(seed)
    keys = sorted({key(item) for item, _ in records})
    gid = torch.tensor([keys.index(key(item)) for item, _ in records])
    hit = torch.tensor([float(m[flag]) for _, m in records], dtype=torch.float64)
    idx = torch.randint(len(hit), (resamples, len(hit)), generator=g)                  # (R, N)
    sums = torch.zeros(resamples, len(keys), dtype=torch.float64).scatter_add_(1, gid[idx], hit[idx])
    counts = torch.zeros(resamples, len(keys), dtype=torch.float64).scatter_add_(1, gid[idx], torch.ones_like(
        hit[idx]))
    means = (sums / counts.clamp(min=1)).sum(1) / (counts > 0).sum(1)                   # (R,) groups drawn
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [100 * low, 100 * high]


def group_means(*cols):
    """A row's set-level metrics: cols (column, flag, which, key) -> {"metrics", "counts", "ci"} of each column, the
    mean over groups key(item) of the items whose category passes `which` (the column's flag is None in `columns`)."""
    def metrics(records):
        out = dict(metrics={}, counts={}, ci={})
        for col, flag, which, key in cols:
            recs = [(item, m) for item, m in records if which is None or which(item.category)]
            out["metrics"][col], out["counts"][col] = group_mean(recs, flag, key), len(recs)
            out["ci"][col] = group_mean_ci(recs, flag, key)
        return out
    return metrics


# ---- the registry -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Breakdown:
    """Per-group accuracies of a data set's all-item columns, e.g. Winoground per collapsed_tag (Table 10)."""
    name: str                       # results key: per_<name> and per_<name>_ci
    key: Callable                   # item -> its group
    order: tuple = ()               # groups listed first, in this order
    table: Optional[tuple] = None   # (table key, title) to print it as a table of its own


@dataclass(frozen=True)
class Dataset:
    source: object                  # its file in benchmarks/: load(root, annotations, split, seed, **options), LAYOUT,
                                    # and where it can be fetched: fetch(root, args), FETCHES, HINT, manual_route(root)
    title: str
    table: str                      # the table it is printed in (evaluate.TABLES)
    columns: list                   # [(column, flag, which items: category predicate or None = all)], paper order
    judge: Judge
    aliases: tuple = ()             # other folder names under data/
    split: Optional[str] = None     # the split evaluated unless another is asked for
    found: bool = True              # looked for under data/ by a bare evaluate.py
    headline: str = "Average"       # the column the ablation figures plot
    chance: float = 50.0            # the headline column of a random scorer
    macro: bool = False             # report the mean of the category columns too
    options: dict = field(default_factory=dict)   # CLI dest -> loader keyword (`add_data_args`)
    breakdown: Optional[Breakdown] = None
    metrics: Optional[Callable] = None  # set-level metrics over [(item, flags)] (e.g. an effect size, a macro
                                        # column: a column whose flag is None), merged into the per-column means
    bias: bool = False              # a bias set: no columns, its set-level `bias` table (d, p, interval per pair)
    embedded: Optional[Callable] = None  # writes its shapes-world instance in its format (benchmarks/embedded.py)


COMVG_COLUMNS = [("Subjects", "correct", _is("subject")), ("Objects", "correct", _is("object")),
                 ("Predicate", "correct", _is("verb")), ("Average", "correct", None)]
RANKED_COLUMNS = [("Top-1", "top1", None), ("Top-5", "top5", None)]
WINOGROUND_TAGS = ("Relation", "Object", "Both")  # Table 10's column groups (collapsed_tag)

REGISTRY = {
    "comvg": Dataset(comvg, "Compositional Visual Genome", "table1", COMVG_COLUMNS, POS_IMAGE,
                     aliases=("compositional_visual_genome",), macro=True,
                     embedded=embedded.comvg_csv),
    "refcocog": Dataset(refcocog, "RefCOCOg", "table1", RANKED_COLUMNS, RANKED_TEXTS, split="val",
                        headline="Top-1", chance=10.0,
                        options={"split_by": "split_by", "ref_negatives": "negatives", "mask_object": "mask_object"}),
    "vqav2": Dataset(vqav2, "VQAv2", "table1",
                     [("Binary", "correct", _is("yes/no")), ("Other", "correct", lambda c: c.lower() != "yes/no"),
                      ("All", "correct", None)], TRUE_IMAGE_OR_TEXT, aliases=("vqa", "vqa_v2"), split="val",
                     headline="All", chance=10.0),
    "winoground": Dataset(winoground, "Winoground", "table8",
                          [("Text", "text", None), ("Image", "image", None), ("Group", "group", None)], WINOGROUND,
                          headline="Group", chance=100 / 6,
                          breakdown=Breakdown("tag", lambda item: item.category, WINOGROUND_TAGS,
                                              ("table10", "Table 10: Winoground per collapsed_tag, accuracy (%)")),
                          embedded=embedded.winoground_pairs),
    "vlchecklist": Dataset(vlchecklist, "VL-checklist", "table8",
                           [("Attribute", "correct", _is("attribute")), ("Object", "correct", _is("object")),
                            ("Relation", "correct", _is("relation")), ("Average", "correct", None)], POS_TEXT,
                           aliases=("vl-checklist",), macro=True, options={"vlc_max_per_file": "max_per_file"},
                           breakdown=Breakdown("file", lambda item: item.meta.get("file", "")),
                           embedded=embedded.checklist_files),
    "coco": Dataset(coco, "MS-COCO captions", "coco", RANKED_COLUMNS, RANKED_TEXTS, aliases=("mscoco",),
                    found=False, headline="Top-1", chance=10.0),
    "flickr30k": Dataset(flickr30k, "Flickr30K image retrieval", "gdbench", RANKED_COLUMNS, RANKED_IMAGES,
                         headline="Top-1", chance=10.0,
                         options={"flickr_every": "every", "flickr_karpathy": "karpathy"},
                         embedded=embedded.top10_images),
    "flickr30k_text": Dataset(flickr30k_text, "Flickr30K text retrieval", "gdbench", RANKED_COLUMNS, RANKED_TEXTS,
                              aliases=("flickr30k",), headline="Top-1", chance=10.0,
                              options={"flickr_karpathy": "karpathy"},
                              embedded=embedded.top10_texts),
    "vg_relation": Dataset(vg_relation, "ARO VG-Relation", "gdbench",
                           [("Accuracy", "correct", None), ("Macro", None, None)], POS_TEXT, aliases=("aro",),
                           headline="Accuracy",
                           metrics=group_means(("Macro", "correct", None, lambda item: item.category)),
                           breakdown=Breakdown("relation", lambda item: item.category),
                           embedded=embedded.aro_relation),
    "vg_attribution": Dataset(vg_attribution, "ARO VG-Attribution", "gdbench", [("Accuracy", "correct", None)],
                              POS_TEXT, aliases=("aro",), headline="Accuracy",
                              embedded=embedded.aro_attribution),
    "coco_order": Dataset(coco_order, "ARO COCO-Order", "gdbench", [("Accuracy", "correct", None)], TRUE_TEXT,
                          headline="Accuracy", chance=20.0,
                          embedded=embedded.coco_karpathy),
    "flickr30k_order": Dataset(flickr30k_order, "ARO Flickr30k-Order", "gdbench", [("Accuracy", "correct", None)],
                               TRUE_TEXT, aliases=("flickr30k",), headline="Accuracy", chance=20.0,
                               embedded=embedded.flickr_karpathy),
    "imagecode": Dataset(imagecode, "ImageCoDe", "gdbench", RANKED_COLUMNS, RANKED_IMAGES, headline="Top-1",
                         chance=10.0, options={"imagecode_video": "video"},
                         embedded=embedded.image_sets),
    "svo": Dataset(svo, "SVO-Probes", "gdbench",
                   [("Subject", "correct", _is("subject")), ("Verb", "correct", _is("verb")),
                    ("Object", "correct", _is("object")), ("Average", "correct", None)], POS_IMAGE,
                   aliases=("svo_probes",),
                   embedded=embedded.svo_csv),
    "clevr": Dataset(clevr, "CLEVR", "gdbench",
                     [(t, "correct", _is(t)) for t in clevr.SUBTASKS] + [("Overall", "correct", None)], POS_TEXT,
                     headline="Overall", macro=True,
                     embedded=embedded.clevr_captions),
    "pets": Dataset(pets, "Oxford-IIIT Pet", "gdbench", [("Top-1", "top1", None), ("Per-class", None, None)],
                    RANKED_TEXTS, aliases=("oxford_pets",), headline="Top-1", chance=100 / 37,
                    options={"pets_template": "template"},
                    metrics=group_means(("Per-class", "top1", None, lambda item: item.category)),
                    embedded=embedded.pets_folder),
    "sugarcrepe": Dataset(sugarcrepe, "SugarCrepe", "compositional",
                          [("Add", None, None), ("Replace", None, None), ("Swap", None, None),
                           ("All", "correct", None)], POS_TEXT, aliases=("sugar_crepe",), headline="All",
                          metrics=group_means(*[(k.title(), "correct", lambda c, k=k: c.startswith(k),
                                                 lambda item: item.category) for k in ("add", "replace", "swap")]),
                          breakdown=Breakdown("file", lambda item: item.category),
                          embedded=embedded.sugarcrepe_files),
    "mmbias": Dataset(mmbias, "MMBias", "bias", [], BIAS, headline=None, chance=None,
                      bias=True, metrics=mmbias.bias_test,
                      embedded=embedded.bias_groups),
    "shapes": Dataset(shapes, "Shapes (ComVG format)", "table1", COMVG_COLUMNS, POS_IMAGE, found=False, macro=True),
}


# the suites of `evaluate.py --suite`: GDBench (Krojer et al., 2023) and the compositional suite of arXiv 2505.17955
SUITES = {"gdbench": ("flickr30k", "flickr30k_text", "winoground", "vg_relation", "vg_attribution", "coco_order",
                      "flickr30k_order", "imagecode", "svo", "clevr", "pets", "mmbias"),
          "compositional": ("winoground", "vg_relation", "vg_attribution", "coco_order", "flickr30k_order",
                            "sugarcrepe", "clevr", "vlchecklist", "comvg")}


def lookup(name):
    if name not in REGISTRY:
        raise InputError(f"unknown data set {name!r}: choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def item_metrics(name, s):
    """The per-item correctness flags data set `name`'s columns average."""
    return REGISTRY[name].judge.flags(s)


def tied(name, s):
    """Does the true candidate tie exactly with a false one in a comparison the metric makes? (Counted wrong, as
    every tie is, and reported.)"""
    return REGISTRY[name].judge.tied(s)


def accuracy(records, flag, which=None):
    """(percent or None, count) of `flag` over the records [(item, flags)] whose category passes `which`; a set-level
    column (flag None) is (None, 0) here, its value from the row's `metrics`."""
    if flag is None:
        return None, 0
    hits = [m[flag] for item, m in records if which is None or which(item.category)]
    return (100.0 * sum(hits) / len(hits) if hits else None), len(hits)


def groups_of(name, records):
    """{group: its records} of data set `name`'s breakdown, the row's order first, then sorted."""
    b = REGISTRY[name].breakdown
    keys = sorted({b.key(item) for item, _ in records}, key=lambda g: (g not in b.order, b.order.index(g)
                                                                        if g in b.order else 0, g))
    return {g: [(item, m) for item, m in records if b.key(item) == g] for g in keys}


# ---- finding and loading a data set -------------------------------------------------------------------------------

def _norm(name):
    return name.lower().replace("-", "").replace("_", "")


def default_root(name, data="data"):
    """data/<name> (any alias and case, e.g. data/VL-CheckList), or data/<name> as the place looked if absent. An
    empty folder (a failed download) is not a data set."""
    subdirs = {_norm(d): os.path.join(data, d) for d in sorted(os.listdir(data))
               if os.path.isdir(os.path.join(data, d)) and os.listdir(os.path.join(data, d))} \
        if os.path.isdir(data) else {}
    names = (name,) + REGISTRY[name].aliases
    return next((subdirs[_norm(a)] for a in names if _norm(a) in subdirs), os.path.join(data, name))


def found_under(root="data"):
    """[(data set, its folder)] of every data set a bare evaluate.py looks for that has a non-empty folder in root."""
    out = [(n, default_root(n, root)) for n, d in REGISTRY.items() if d.found]
    return [(n, r) for n, r in out if os.path.isdir(r) and os.listdir(r)]


def find_datasets(root="data"):
    """[(data set, its folder)] of every table data set found under `root`; none is an InputError saying how to get
    one."""
    fetch = f"fetch one with e.g.: {comvg.HINT}, or evaluate offline: --dataset shapes"
    if not os.path.isdir(root):
        raise DataMissing(f"data root not found: {root} is not a folder; {fetch}")
    found = found_under(root)
    if not found:
        raise DataMissing(f"no data set found: looked for "
                          f"{', '.join(os.path.join(root, n) for n, d in REGISTRY.items() if d.found)}; {fetch}")
    return found


def has_table_data(root="data"):
    """Whether `root` holds a non-empty folder of any table data set (the embedded shapes world does not count)."""
    return os.path.isdir(root) and bool(found_under(root))


def data_hint(name, root):
    """What goes where, the download command and the offline alternative, for a missing data set (one line)."""
    source = REGISTRY[name].source
    parts = [f"{root}/ holds {source.LAYOUT}"] if getattr(source, "LAYOUT", None) else []
    parts += [f"fetch it with: {source.HINT}"] if getattr(source, "HINT", None) else []
    return "; ".join(parts + ["or run offline on the embedded shapes world: --dataset shapes"])


def load_items(name, root=None, annotations=None, seed=0, split=None, **options):
    """(items, report) of data set `name` from its folder (default data/<name>); split None = every split; `options`
    go to the loader (`loader_options`). A missing data set's error says where it goes and how to fetch it."""
    source = lookup(name).source
    root = root or default_root(name)
    try:
        items, report = source.load(root, annotations=annotations, split=split, seed=seed, **options)
    except DataMissing as e:
        raise InputError(f"{e}; {data_hint(name, root)}") from None
    return items, count_duplicates(items, report)


def data_inputs(items, report):
    """The files a loaded data set reads (its annotation files, every image), as output-check inputs."""
    images = dict.fromkeys(str(p) for it in items for p in it.images)
    return [(f, "annotation file", "file") for f in report["files"]] + [(p, "image", "file") for p in images]


def add_data_args(p):
    """The loader options of train.py and evaluate.py (each registry row's `options`)."""
    g = p.add_argument_group("data set forms (benchmarks/)")
    for source in dict.fromkeys(d.source for d in REGISTRY.values()):   # each loader file once
        if hasattr(source, "add_args"):  # the loader's own options; its rows' `options` map them to `load`
            source.add_args(g)


def loader_options(args, name):
    """The loader keywords of data set `name` that the command line set."""
    return {kw: getattr(args, dest) for dest, kw in lookup(name).options.items()
            if getattr(args, dest, None) is not None}


def count_duplicates(items, report):
    """Records loaded twice (an item id, or the same images and texts, seen before): report["duplicates"] and a
    warning with the count. They stay in: every loaded item is scored and counted, as the publisher ships it."""
    ids, contents, dup = set(), set(), []
    for it in items:
        content = (tuple(map(str, it.images)), tuple(it.texts))
        if it.id in ids or content in contents:
            dup.append(it.id)
        ids.add(it.id)
        contents.add(content)
    report["duplicates"] = len(dup)
    if dup:
        report["warnings"].append(f"{len(dup)} duplicate records (an item id or the same images and texts seen "
                                  f"before, e.g. {', '.join(dup[:3])}); each is scored and counted as loaded")
    return report


# ---- how an item is judged: the paper's columns (§5.1; Tables 1, 8, 10) ------------------------------------------
# Pure functions of one item's score matrix s (n_images, n_texts), higher = better match; a tie counts as an error

# ---- the few-shot split (§5.2) -------------------------------------------------------------------------------------

# ---- the few-shot split (§5.2) -------------------------------------------------------------------------------------

def parse_shots(value, n):
    """--shots as a fraction ("0.05") or a count ("27") of n available items -> a count in [1, n - 1]."""
    try:
        x = float(value)
    except ValueError:
        raise InputError(f"--shots {value!r}: expected a fraction like 0.05 or a count like 27") from None
    if not x > 0 or x == float("inf"):  # nan and inf too
        raise InputError(f"--shots {value}: must be a positive finite number")
    if "." in str(value) or "e" in str(value).lower():
        if x >= 1:
            raise InputError(f"--shots {value}: a fraction must be below 1 (use a whole number for a count)")
        count = max(1, round(x * n))
    else:
        count = int(x)
    if count >= n:
        raise InputError(f"--shots {value}: asks for {count} training items but the data set has {n} "
                         "(at least one must stay for testing)")
    return count


def linked_groups(items):
    """Union-find over items that share a (text, image) pair -> list of lists of item indices, in first-seen order."""
    parent = list(range(len(items)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    owner = {}
    for i, it in enumerate(items):
        for pair in ((t, str(im)) for t in it.texts[:1] for im in it.images) if len(it.texts) == 1 else \
                ((t, str(im)) for t in it.texts for im in it.images[:1]):
            j = owner.setdefault(pair, i)
            parent[find(i)] = find(j)
    groups = {}
    for i in range(len(items)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def split_items(items, shots, seed, eval_split="val", holdout=True):
    """(train, test) item lists; see the module docstring. Deterministic in `seed`.

    Items that carry the publisher's split train on 'train' and test on `eval_split`; without a 'train' split the
    items are split by shots. holdout=False: every item not drawn for training is left out (test = [])."""
    pool = [it for it in items if it.split == "train"]
    test = [it for it in items if it.split == eval_split] if pool else None
    if not pool:
        pool = items
    elif holdout and not test:
        raise InputError(f"the data set ships splits {sorted({it.split for it in items})}: no items in "
                         f"--eval-split {eval_split!r}")
    n = parse_shots(shots, len(pool) + (0 if test is None and holdout else 1))
    groups = linked_groups(pool)
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    train_idx, rest = [], []
    for g in order:
        (train_idx if len(train_idx) < n else rest).extend(groups[g])
    train = [pool[i] for i in sorted(train_idx)]
    if not holdout:
        return train, []
    if test is None:
        test = [pool[i] for i in sorted(rest)]
        if not test:
            raise InputError(f"--shots {shots}: no test items left after drawing the training split")
    return train, test



# ---- images --------------------------------------------------------------------------------------------------------

def fill_box(image, box):
    """Table 6's masking: the box (x, y, w, h) filled with the image's mean colour, a fill that adds no shape of its
    own beyond the box's edges (black would add a dark patch the model may match to words)."""
    image = image.convert("RGB")                                          # a copy: the cached file stays as read
    x, y, w, h = box
    image.paste(tuple(round(v) for v in ImageStat.Stat(image).mean),
                (int(x), int(y), int(math.ceil(x + w)), int(math.ceil(y + h))))
    return image


def open_image(path):
    """A decoded image (a RefCOCOg path with a `box`: that box masked, Table 6; a path with a `crop`: that region)."""
    with Image.open(path, formats=RASTER_FORMATS) as im:
        im.load()  # decode now: a corrupt file fails here, not inside the model
    if getattr(path, "crop", None):                                      # ARO's VG items: the relation's box
        x, y, w, h = path.crop
        im = im.crop((round(x), round(y), round(x + w), round(y + h)))
    return fill_box(im, path.box) if getattr(path, "box", None) else im


def pixel_count(image):
    """The pixels an image holds: a PIL image's, or a prepared array / tensor's (its elements over 3 channels)."""
    return image.width * image.height if isinstance(image, Image.Image) else math.prod(image.shape) // 3


class ImageCache:
    """Decoded images by path (training revisits items every epoch), each reduced at once by `prepare` (a model's
    `prepare_image`: what it encodes, at its input size; None keeps the decoded image), the `size` most recently used
    kept, and no more than `pixels` pixels in all (the one just read always). So what a scoring group or a training
    batch holds per image is bounded by the model's input, not by the file (36 legal 49-Mpx photos in one group held
    5.3 GB)."""

    def __init__(self, size=64, pixels=2 ** 26, prepare=None):
        self.size, self.pixels, self.prepare, self.images = size, pixels, prepare, OrderedDict()

    def get(self, path):
        key = (str(path), getattr(path, "box", None), getattr(path, "crop", None))  # masked / cropped: another image
        if key in self.images:
            self.images.move_to_end(key)
        else:
            image = open_image(path)
            self.images[key] = self.prepare(image) if self.prepare else image
            held = sum(map(pixel_count, self.images.values()))
            while len(self.images) > 1 and (len(self.images) > self.size or held > self.pixels):
                held -= pixel_count(self.images.popitem(last=False)[1])
        return self.images[key]

    def load(self, paths):
        return [self.get(p) for p in paths]
