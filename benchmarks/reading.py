"""What every data set's loader shares: the `Item`, the load report, and reading a publisher's files safely.

An item is a small image-text matching problem whose score matrix is (len(images), len(texts)). A loader's report
counts what did not become an item: `malformed` records (each listed in `warnings` with its file and line / index) and
items skipped because an image is `missing_images` on disk. Every file name a data file gives is checked by `outside`
before it is looked up, so no data file makes the program read outside its data folder.
"""
import csv
import io
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from common import MAX_LISTED, InputError

# A CSV field may be as long as its file (the file is in memory already): no `field larger than field limit` at
# 131,072 characters; an over-long sentence is cut by the tokenizer, as any long text is.
csv.field_size_limit(2 ** 31 - 1)


@dataclass
class Item:
    id: str
    images: list        # image file paths; images[0] is the true image of texts[0]
    texts: list         # candidate texts; texts[0] is the true text of images[0] (Winoground: image k <-> text k)
    category: str = ""  # the table column the item counts towards, e.g. "subject" / "object" / "verb"
    split: str = ""     # the publisher's split where it has one (RefCOCOg: train / val / test)
    meta: dict = field(default_factory=dict)


class CroppedImage(str):
    """An image path whose `crop` (x, y, w, h in pixels) `datasets.open_image` cuts out before scoring (ARO's VG)."""
    crop = None


def cropped(path, box):
    out = CroppedImage(path)
    out.crop = tuple(float(v) for v in box)
    return out


# ---- shared helpers ----------------------------------------------------------------------------------------------


def new_report(dataset, files):
    return dict(dataset=dataset, files=list(files), records=0, items=0, malformed=0, missing_images=0,
                missing_files=[], n_missing_files=0, warnings=[])


def malformed(report, where, why):
    report["malformed"] += 1
    report["warnings"].append(f"{where}: {why}; skipped")


def missing(report, paths, seen):
    """Count an item skipped for images not on disk; `seen` is the set of distinct missing files."""
    report["missing_images"] += 1
    for p in paths:
        if p not in seen:
            seen.add(p)
            if len(report["missing_files"]) < MAX_LISTED:
                report["missing_files"].append(p)
    report["n_missing_files"] = len(seen)


class DataMissing(InputError):
    """A data set (or its annotation file, or all of its images) is not on disk; `load_items` adds `data_hint`."""


def check_root(root, what):
    if root is None or not os.path.isdir(root):
        raise DataMissing(f"{what} data root not found: {root} is not a folder")


def find_file(what, names, folders):
    """The first folders[i]/names[j] that exists (folders outer), else one-line InputError naming all of them."""
    found = first_existing(names, folders)
    if found is None:
        raise DataMissing(f"{what} not found: looked for {' or '.join(names)} in {', '.join(folders)}")
    return found


def given_file(what, path):
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path} is not a file")
    return path


def outside(name):
    """Why a file name read from a data file could leave the folder it is looked up in, or None if it cannot: every
    name a data file gives stays inside its data root. An absolute path (/x, C:\\x, \\\\host\\x), a '..' component, or a
    NUL byte may leave it (symlinks the user placed under the root are followed: the name itself is what is checked)."""
    if not isinstance(name, str) or not name:
        return "not a file name"
    if "\0" in name:
        return "a NUL byte"
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", name):
        return "an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "a '..' component"
    return None


def escape(report, where, names):
    """Count the record at `where` as malformed if any of `names` (from a data file) could leave its folder."""
    for name in names:
        why = outside(name)
        if why:
            malformed(report, where, f"file name {name!r} could leave the data folder ({why})")
            return True
    return False


def first_existing(names, folders):
    """First existing folder/name over folders (outer) and candidate names (inner); None if none exists. A name that
    could leave its folder (`outside`) is never looked up."""
    for d in folders:
        for n in names:
            if outside(n):
                continue
            p = os.path.join(d, n)
            if os.path.isfile(p):
                return p
    return None


def image_files(report, where, names, folders, seen):
    """The files of an item's image `names`, each the first of `folders` that has it; None when a name could leave its
    folder (the record at `where` counted malformed, `escape`) or an image is not on disk (the item counted missing)."""
    if escape(report, where, names):
        return None
    paths = [first_existing([n], folders) for n in names]
    if None in paths:
        missing(report, [n for n, p in zip(names, paths) if p is None], seen)
        return None
    return paths


def finish(report, items, what, example, folders):
    """Fill the counts; no item at all because no image was found -> InputError naming the image folders."""
    report["items"] = len(items)
    if not items and report["missing_images"]:
        raise DataMissing(f"no {what} images found: looked for e.g. {example} in {', '.join(folders)}")
    if not items:
        first = f" (first: {report['warnings'][0]})" if report["warnings"] else ""
        other = f", {report['other_split']} of other splits" if report.get("other_split") else ""
        raise InputError(f"no usable {what} records in {', '.join(report['files'])}: "
                         f"{report['records']} records, {report['malformed']} malformed{other}{first}")
    return items, report


def is_key(x):
    """Can x be a record's id (a JSON number or string; never a list, a dict or a bool)?"""
    return isinstance(x, (int, str)) and not isinstance(x, bool)


def listed(data, key):
    """The dict records of data[key]: [] unless data is a JSON object holding a list there (a wrong JSON type in an
    annotation file is no record, not a traceback)."""
    rows = data.get(key) if isinstance(data, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def digits(x):
    """Is x (a str, or an int) a whole number in ASCII digits? (str.isdigit() also accepts '²', which int() refuses.)"""
    x = str(x)
    return x.isascii() and x.isdigit()


def read_text(path, what):
    """A UTF-8 file's text (a leading BOM dropped); any other encoding is an InputError naming the file, the offset
    of the first byte that is not UTF-8 and its line (the whole file is decoded at once: the offset is the file's)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{what} {path} is not UTF-8 text: byte {data[e.start]:#04x} at offset {e.start} "
                         f"(line {line}); save it as UTF-8") from None


def read_json(path, what):
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise InputError(f"{what} {path} is nested too deeply to be an annotation file (JSON parser's recursion "
                         "limit)") from None


def csv_rows(f, path, what, required):
    """csv.DictReader over `f` whose header holds every `required` column once; a lacking column or a column named
    twice (DictReader would keep the last) is an InputError naming the file and the column."""
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    twice = [c for c, n in Counter(header).items() if n > 1 and c]
    if twice:
        raise InputError(f"{what} {path}: the header names the column {twice[0]!r} {Counter(header)[twice[0]]} times")
    absent = [c for c in required if c not in header]
    if absent:
        raise InputError(f"{what} {path} lacks the column(s) {', '.join(absent)} "
                         f"(expected header {','.join(required)})")
    return reader


def csv_records(report, path, what, required):
    """(line, row) of each record of the UTF-8 CSV `path` whose header holds every `required` column (`csv_rows`), each
    counted in report["records"]; a row with more or fewer fields than the header is counted malformed."""
    with io.StringIO(read_text(path, what), newline="") as f:
        reader = csv_rows(f, path, what, required)
        for row in reader:
            report["records"] += 1
            if None in row or any(row[c] is None for c in required):
                malformed(report, f"{path}:{reader.line_num}",
                          f"expected the {len(reader.fieldnames)} fields of the header")
                continue
            yield reader.line_num, row


def draw(pool, k, rng, bad_keys=(), bad_texts=()):
    """k distinct texts from pool [(key, text)], skipping bad keys and texts (case-insensitive), in random order."""
    bad_texts = {t.strip().lower() for t in bad_texts}
    n = len(pool)
    out = []
    for tries in (min(n, 4 * k + 16), n):  # a small sample nearly always suffices; else the whole pool
        out, seen = [], set(bad_texts)
        for i in rng.sample(range(n), tries):
            key, text = pool[i]
            t = text.strip().lower()
            if key in bad_keys or t in seen:
                continue
            seen.add(t)
            out.append(text)
            if len(out) == k:
                return out
    return out


def item_rng(seed, item_id):
    return random.Random(f"{seed}/{item_id}")



