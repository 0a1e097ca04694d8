"""Fetching the data sets of the paper's §5.1, one command per data set, into the layout datasets.py reads.

    python -m tools.download comvg        # the ComVG CSV + only the 524 Visual Genome images it uses
    python -m tools.download winoground   # Hugging Face Hub facebook/winoground (gated: accept its terms, log in)
    python -m tools.download vlchecklist  # VL-CheckList annotations; prints where to get its images
    python -m tools.download vqav2        # the official code's VQAv2 test files; --with-images: their COCO images
    python -m tools.download refcocog     # refcocog.zip; --with-images --yes: COCO train2014.zip too
    python -m tools.download coco         # COCO 2014 captions; --with-images --yes: COCO train2014.zip too

Each data set goes into DATA_ROOT/NAME (default data/NAME). Every file is written to <file>.part and renamed only once
it is complete and checked: sha256 / md5 where known, images must decode with PIL, archives must pass zipfile's CRC
checks. A file failing its check is removed and counted as failed; a killed run never leaves a half file that later
counts as done. A rerun skips what is complete and continues a .part where the server allows (HTTP Range). Each run
ends with a count of fetched / already present / failed files and the manual route for what failed: exit 0 when
nothing failed, 1 when something did, 2 on bad input. Anything over 1 GB states its size and starts only with --yes
(or a yes at the prompt).

URLs are module constants. --mirror URL (or $DISCFFUSION_MIRROR) fetches https://HOST/PATH from URL/HOST/PATH
instead (the tests serve their fixtures this way); Winoground goes through huggingface_hub, which honours HF_ENDPOINT.
"""
import argparse
import csv
import hashlib
import http.client
import json
import os
import shutil
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm

from common import MAX_LISTED, ArgumentParser, InputError, check_writable, file_hash, positive_int, run_cli

GB, MB = 1e9, 1e6
CONFIRM_ABOVE = 1 * GB      # bytes: anything bigger starts only with --yes
TIMEOUT = 60                # seconds without a byte before a request fails
CHUNK = 1 << 20
JOBS = 8                    # images fetched at once
UNREACHABLE_AFTER = 5       # connection failures in a row after which the remaining images are not tried
USER_AGENT = "discffusion-download/1.0 (+python urllib)"

# ---- where everything comes from ----------------------------------------------------------------------------------

DSD_RAW = "https://raw.githubusercontent.com/eric-ai-lab/DSD/main/data"  # the paper's official code, branch main
COMVG_CSV_URL = f"{DSD_RAW}/compositional_visual_genome.csv"
COMVG_CSV_SIZE = 556_175
COMVG_CSV_SHA256 = "9ace4e5d850aca75d42c0bfca420a89d5dac76c4a7c8460b846502579633c38a"
VG_IMAGE_BASES = ("https://cs.stanford.edu/people/rak248/VG_100K", "https://cs.stanford.edu/people/rak248/VG_100K_2")
COMVG_IMAGE_DIRS = ("VG_100K", "VG_100K_2", "vg_concept", "images", "")  # where datasets.load_comvg looks
VG_ARCHIVES = {"images.zip": ("https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip", 9_731_705_982),
               "images2.zip": ("https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip", 5_471_658_058)}

VQA_FILES = {  # name: (url, bytes, sha256) as in the official code's repository
    "test.txt": (f"{DSD_RAW}/test.txt", 877_356, "9ae79531c2ab331362b8d54fb55b821b2720a084c993417e4839516fcb5dce4b"),
    "vqa_text_test.csv": (f"{DSD_RAW}/vqa_text_test.csv", 404_578,
                          "74c6e7dee19abbeb345d751d9e515c142363c28c59617f05cc32c21530210936")}
COCO_IMAGE_BASE = "http://images.cocodataset.org"   # + /val2014/<file_name>, the annotations' coco_url
COCO_IMAGE_BYTES = 160_000                           # a COCO 2014 image on average, for the size estimate
COCO_ZIPS = {  # name: (url, bytes, md5)
    "train2014.zip": ("http://images.cocodataset.org/zips/train2014.zip", 13_510_573_713,
                      "0da8c0bd3d6becc4dcb32757491aca88"),
    "val2014.zip": ("http://images.cocodataset.org/zips/val2014.zip", 6_645_013_297,
                    "a3d79f5ed8d289b7a7554ce06a5782b3"),
    "annotations_trainval2014.zip": ("http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
                                     252_872_794, "0a379cfc70b0e71301e0f377548639bd")}
COCO_CAPTION_FILES = ("annotations/captions_train2014.json", "annotations/captions_val2014.json")

REFCOCOG_URLS = ("https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcocog.zip",  # the publisher (often down)
                 "https://web.archive.org/web/20220413012904id_/"                    # its Internet Archive capture
                 "https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcocog.zip")
REFCOCOG_SIZE = 56_712_951
REFCOCOG_SHA256 = "3d1f7e5b2ff2205940bf59de55f861f5f2cc1403fb980669933a7f9af1aa8211"

WINOGROUND_REPO = "facebook/winoground"
WINOGROUND_FILES = ("data/examples.jsonl", "data/images.zip")

VLC_ARCHIVE_URL = "https://github.com/om-ai-lab/VL-CheckList/archive/refs/heads/main.zip"
VLC_FOLDERS = ("data", "corpus")
VLC_DATASETS_MD = "https://github.com/om-ai-lab/VL-CheckList/blob/main/DATASETS.md"

# What each command fetches (--help) and the one line the loaders' "not found" errors quote.
DATASETS = {
    "comvg": "the ComVG CSV (0.6 MB, github eric-ai-lab/DSD) + only the 524 Visual Genome images it uses (~0.1 GB)",
    "winoground": "Hugging Face dataset facebook/winoground: examples.jsonl + images.zip, 800 images (gated: accept "
                  "its terms at huggingface.co and log in first)",
    "vlchecklist": "VL-CheckList annotations: data/ + corpus/ of github om-ai-lab/VL-CheckList (~10 MB archive, 47 MB "
                   "unpacked); images (VG, SWiG, HAKE) by hand, or --with-images --yes: VG's archives (15.2 GB)",
    "vqav2": "the official code's VQAv2 test files test.txt + vqa_text_test.csv (1.3 MB); --with-images: the 5,762 "
             "COCO val2014 images they use (~0.9 GB)",
    "refcocog": "refcocog.zip (57 MB: refs(google).p, refs(umd).p, instances.json); --with-images --yes: COCO "
                "train2014.zip (13.5 GB)",
    "coco": "COCO 2014 captions from annotations_trainval2014.zip (253 MB); --with-images --yes: COCO train2014.zip "
            "(13.5 GB)",
}
HINTS = {
    "comvg": "python -m tools.download comvg (the ComVG CSV + the 524 Visual Genome images it uses, ~0.1 GB)",
    "winoground": "python -m tools.download winoground (gated on the Hugging Face Hub: accept its terms and log in "
                  "first)",
    "vlchecklist": "python -m tools.download vlchecklist (the annotations; it prints where to get the VG / SWiG / HAKE "
                   "images)",
    "vqav2": "python -m tools.download vqav2 --with-images (the paper's test files + the COCO val2014 images they use, "
             "~0.9 GB)",
    "refcocog": "python -m tools.download refcocog --with-images --yes (refcocog.zip 57 MB + COCO train2014.zip "
                "13.5 GB)",
    "coco": "python -m tools.download coco --with-images --yes (COCO 2014 captions 253 MB + COCO train2014.zip "
            "13.5 GB)",
}


def hint(name):
    """The one-line command fetching data set `name` (what it fetches in brackets), or "" for one it cannot fetch."""
    return f"fetch it with: {HINTS[name]}" if name in HINTS else ""


def manual_route(name, root):
    """Where to get data set `name` by hand, for what failed."""
    return {
        "comvg": f"the CSV from https://github.com/eric-ai-lab/DSD/tree/main/data into {root}/; the images from "
                 f"Visual Genome's archives {VG_ARCHIVES['images.zip'][0]} (9.7 GB) and "
                 f"{VG_ARCHIVES['images2.zip'][0]} (5.5 GB), unzipped into {root}/ (VG_100K/, VG_100K_2/)",
        "winoground": f"https://huggingface.co/datasets/{WINOGROUND_REPO}: data/examples.jsonl into {root}/, "
                      f"data/images.zip unzipped into {root}/images/",
        "vlchecklist": f"https://github.com/om-ai-lab/VL-CheckList: its data/ and corpus/ folders into {root}/",
        "vqav2": f"test.txt and vqa_text_test.csv from https://github.com/eric-ai-lab/DSD/tree/main/data into "
                 f"{root}/; COCO val2014 images ({COCO_ZIPS['val2014.zip'][0]}, 6.6 GB) unzipped into {root}/ "
                 "(val2014/)",
        "refcocog": f"refcocog.zip ({REFCOCOG_URLS[1]}, see github lichengunc/refer) unzipped into "
                    f"{os.path.dirname(root) or '.'}/; COCO {COCO_ZIPS['train2014.zip'][0]} unzipped into {root}/",
        "coco": f"https://cocodataset.org/#download: {COCO_ZIPS['annotations_trainval2014.zip'][0]} (its "
                f"annotations/captions_*2014.json) and {COCO_ZIPS['train2014.zip'][0]}, unzipped into {root}/",
    }[name]


def vlc_image_route(root):
    return (f"VL-CheckList images are not fetched by default: put them under {root}/images/ as vg/ (Visual Genome: "
            f"`python -m tools.download vlchecklist --with-images --yes` fetches its two archives, 15.2 GB), swig/ "
            f"(https://swig-data-weights.s3.us-east-2.amazonaws.com/images_512.zip) and hake/ (HAKE's images), "
            f"exactly as in {VLC_DATASETS_MD}")


def mirrored(url, mirror):
    """https://HOST/PATH -> MIRROR/HOST/PATH (unchanged without a mirror)."""
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    return f"{mirror.rstrip('/')}/{parts.netloc}{parts.path}"


# ---- one file: fetched to .part, checked, renamed -----------------------------------------------------------------

class FetchError(Exception):
    """One file could not be fetched or failed its check: counted as failed, the others go on.
    status: the HTTP status (None for no answer); unreachable: no connection to the server at all."""

    def __init__(self, message, status=None, unreachable=False):
        super().__init__(message)
        self.status, self.unreachable = status, unreachable


def verify(path, size=None, sha256=None, md5=None, check=None):
    """None if the file is the expected one, else why not."""
    got = os.path.getsize(path)
    if size is not None and got != size:
        return f"{got:,} bytes, expected {size:,}"
    for algorithm, want in (("sha256", sha256), ("md5", md5)):
        if want and (have := file_hash(path, algorithm)) != want:
            return f"{algorithm} mismatch: got {have}, expected {want}"
    return check(path) if check else None


def image_check(path):
    """None if PIL opens, verifies and decodes the image, else why not."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the image unusable; load() catches a truncated JPEG
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
        return f"not a readable image ({type(e).__name__}: {e})"
    return None


def zip_check(path):
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError) as e:
        return f"not a zip archive ({e})"


def stream(url, part, have, bar=True):
    """Append url's bytes from offset `have` to `part` (from 0 when the server ignores the Range)."""
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part is not a prefix the server knows: start over
            os.remove(part)
            return stream(url, part, 0, bar)
        raise FetchError(f"HTTP {e.code} {e.reason} at {url}", status=e.code) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(f"cannot reach {urllib.parse.urlsplit(url).netloc} ({reason}): offline?",
                         unreachable=True) from None
    with resp:
        if have and (resp.status != 206 or not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-")):
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        got = have
        try:
            with open(part, "ab" if have else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(part[:-5]),
                         file=sys.stderr, disable=not bar, leave=False, mininterval=0.5) as t:
                while block := resp.read1(CHUNK):
                    f.write(block)
                    f.flush()  # on disk as it comes: a killed run resumes from here
                    got += len(block)
                    t.update(len(block))
        except (OSError, http.client.HTTPException) as e:  # a reset, a timeout, IncompleteRead
            raise FetchError(f"connection lost after {got:,} bytes of {url} ({e}); rerun to continue") from None
    if total is not None and got < total:
        raise FetchError(f"connection lost after {got:,} of {total:,} bytes of {url}; rerun to continue")


def fetch(url, path, size=None, sha256=None, md5=None, check=None, bar=True):
    """url -> path, via path.part; "present" if path is already complete and valid, else "fetched".

    A .part left by an earlier run is continued. Raises FetchError when the file cannot be fetched, or when it fails
    its check (size, sha256, md5, check(path) -> None or why): the bad file is then removed, never kept as done.
    A folder where the file (or its .part) must go is an InputError: nothing of the user's is removed."""
    for p in (path, f"{path}.part"):
        if os.path.isdir(p):
            raise InputError(f"cannot write {p}: a folder is in the way of the file (move it away)")
    if os.path.exists(path):
        if verify(path, size, sha256, md5, check) is None:
            return "present"
        os.remove(path)  # refused: fetched again below
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = f"{path}.part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if size is not None and have > size:
        os.remove(part)
        have = 0
    if size is None or have < size:
        stream(url, part, have, bar)
    why = verify(part, size, sha256, md5, check)
    if why:
        os.remove(part)
        raise FetchError(f"{os.path.basename(path)} from {url}: {why}; refused and removed (rerun to fetch it again)")
    os.replace(part, path)
    return "fetched"


# ---- counting -------------------------------------------------------------------------------------------------------

def new_tally():
    return dict(fetched=0, present=0, failed=[])  # failed: [(name, why)]


def count(tally, name, outcome, why=""):
    if outcome == "failed":
        tally["failed"].append((name, why))
    else:
        tally[outcome] += 1


def summary(name, root, tally, out=None):
    """Print what was fetched / already present / failed, and the manual route for the failures; the exit code."""
    failed, out = tally["failed"], out or sys.stdout
    print(f"{name}: {tally['fetched']} fetched, {tally['present']} already present, {len(failed)} failed "
          f"(in {root})", file=out)
    for what, why in failed[:MAX_LISTED]:
        print(f"  failed: {what}: {why}", file=out)
    if len(failed) > MAX_LISTED:
        print(f"  ... and {len(failed) - MAX_LISTED} more", file=out)
    if failed:
        print(f"rerun the same command to retry; by hand: {manual_route(name, root)}", file=out)
    return 1 if failed else 0


def confirm(what, nbytes, yes):
    """State the size; anything over CONFIRM_ABOVE needs --yes (or a yes at an interactive prompt)."""
    print(f"{what}: {nbytes / GB:.1f} GB" if nbytes >= 0.1 * GB else f"{what}: {nbytes / MB:.0f} MB",
          file=sys.stderr)
    if nbytes <= CONFIRM_ABOVE or yes:
        return
    if sys.stdin.isatty() and input("start? [y/N] ").strip().lower() in ("y", "yes"):
        return
    raise InputError(f"{what} is {nbytes / GB:.1f} GB: rerun with --yes to start it")


# ---- images, one by one -------------------------------------------------------------------------------------------

def fetch_images(jobs_list, tally, jobs=JOBS, desc="images"):
    """[(name, [(url, path), ...])] -> each image from its first url that has it (HTTP 404 -> the next), checked by
    decoding. A failing image does not stop the others; after UNREACHABLE_AFTER connection failures in a row the
    remaining ones are counted as failed without trying."""
    lock, state = threading.Lock(), dict(unreachable=0)

    def one(name, sources):
        if state["unreachable"] >= UNREACHABLE_AFTER:
            return "failed", "not tried: the server is unreachable"
        tried = []
        for url, path in sources:
            try:
                outcome = fetch(url, path, check=image_check, bar=False)
            except FetchError as e:
                with lock:
                    state["unreachable"] = state["unreachable"] + 1 if e.unreachable else 0
                tried.append(str(e))
                if e.status == 404:
                    continue
                return "failed", "; ".join(tried)
            with lock:
                state["unreachable"] = 0
            return outcome, ""
        return "failed", "; ".join(tried)

    with ThreadPoolExecutor(max(1, jobs)) as pool, \
            tqdm(total=len(jobs_list), unit="img", desc=desc, file=sys.stderr, mininterval=0.5) as bar:
        futures = {pool.submit(one, name, sources): name for name, sources in jobs_list}
        try:
            for future in as_completed(futures):
                outcome, why = future.result()
                count(tally, futures[future], outcome, why)
                bar.update(1)
        except BaseException:  # an InputError (a folder in the way) or Ctrl-C: the images not started are not
            pool.shutdown(wait=False, cancel_futures=True)  # tried, the ones in flight end on their own
            raise


def existing_image(names, folders):
    """The first path folder/name that is a readable image, else None."""
    for d in folders:
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and image_check(p) is None:
                return p
    return None


# ---- archives -----------------------------------------------------------------------------------------------------

def safe_join(dest, rel):
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith("/") or ".." in parts or ":" in parts[0]:
        raise FetchError(f"unsafe path {rel!r} in the archive; refused")
    return os.path.join(dest, *[p for p in parts if p])


def extract(zip_path, dest, rename=lambda name: name):
    """Unzip the members rename(name) keeps (None = skip) into dest, each via .part; zipfile checks every CRC.
    A member already there with its size is skipped. Returns the relative paths written."""
    out = []
    with zipfile.ZipFile(zip_path) as z:
        members = [(i, rename(i.filename)) for i in z.infolist() if not i.is_dir()]
        members = [(i, rel) for i, rel in members if rel]
        for info, rel in tqdm(members, unit="file", desc=f"unzip {os.path.basename(zip_path)}", file=sys.stderr,
                              mininterval=0.5):
            path = safe_join(dest, rel)
            out.append(rel)
            if os.path.isfile(path) and os.path.getsize(path) == info.file_size:
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                with z.open(info) as src, open(f"{path}.part", "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                os.remove(f"{path}.part")
                raise FetchError(f"{os.path.basename(zip_path)} is damaged at {info.filename} ({e})") from None
            os.replace(f"{path}.part", path)
    return out


def marker_path(dest, zip_name):
    return os.path.join(dest, f".{zip_name}.done")


def unpacked(dest, zip_name):
    """True if an earlier run unpacked zip_name into dest completely (its marker lists files that all exist)."""
    try:
        with open(marker_path(dest, zip_name)) as f:
            return all(os.path.isfile(os.path.join(dest, rel)) for rel in json.load(f))
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deeply
        return False


def fetch_archive(urls, zip_path, dest, tally, size=None, sha256=None, md5=None, rename=lambda name: name):
    """Fetch a zip (from the first of `urls` that answers), unzip what `rename` keeps into dest, mark it done and
    delete the zip. Counted once in tally; False if it failed."""
    name = os.path.basename(zip_path)
    if unpacked(dest, name):
        count(tally, name, "present")
        return True
    errors, written = [], None
    for url in urls:
        try:
            fetch(url, zip_path, size, sha256, md5, check=zip_check)
            written = extract(zip_path, dest, rename)
            break
        except FetchError as e:
            errors.append(str(e))
            if "damaged" in str(e):
                os.remove(zip_path)  # refused: fetched again by the next run
                errors[-1] += "; removed it (rerun to fetch it again)"
                break
    if written is None:
        count(tally, name, "failed", "; ".join(errors))
        return False
    with open(marker_path(dest, name), "w") as f:
        json.dump(written, f)
    os.remove(zip_path)
    count(tally, name, "fetched")
    return True


def pending_size(archives, dest):
    """Bytes of the archives [(name, bytes)] not yet unpacked into dest."""
    return sum(size for name, size in archives if not unpacked(dest, name))


# ---- the data sets ------------------------------------------------------------------------------------------------

def fetch_comvg(root, mirror=None, jobs=JOBS, csv_sha256=COMVG_CSV_SHA256, csv_size=COMVG_CSV_SIZE):
    """The ComVG CSV of the official code + only the Visual Genome images it references (pos_image_id,
    neg_image_id), each from VG_100K/ or else VG_100K_2/, stored as root/<that folder>/<id>.jpg."""
    tally = new_tally()
    csv_path = os.path.join(root, "compositional_visual_genome.csv")
    try:
        count(tally, "compositional_visual_genome.csv",
              fetch(mirrored(COMVG_CSV_URL, mirror), csv_path, csv_size, csv_sha256))
    except FetchError as e:
        count(tally, "compositional_visual_genome.csv", "failed", str(e))
        return tally
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"pos_image_id", "neg_image_id"} <= set(rows[0]):
        raise InputError(f"{csv_path} has no pos_image_id / neg_image_id columns")
    ids = sorted({r[k].strip() for r in rows for k in ("pos_image_id", "neg_image_id")}, key=lambda s: (len(s), s))
    folders = [os.path.join(root, d) if d else root for d in COMVG_IMAGE_DIRS]
    jobs_list = []
    for image_id in ids:
        name = f"{image_id}.jpg"
        if not image_id.isdigit():
            count(tally, name, "failed", "not a Visual Genome image id")
        elif existing_image([name], folders):
            count(tally, name, "present")
        else:
            bases = [mirrored(b, mirror) for b in VG_IMAGE_BASES]
            jobs_list.append((name, [(f"{b}/{name}", os.path.join(root, b.rsplit("/", 1)[1], name)) for b in bases]))
    print(f"comvg: {len(ids)} Visual Genome images referenced, {len(jobs_list)} to fetch "
          f"(~{len(jobs_list) * 0.15:.0f} MB)", file=sys.stderr)
    fetch_images(jobs_list, tally, jobs, desc="Visual Genome")
    return tally


def hub_error(e, repo_id):
    """A huggingface_hub exception -> one line saying what to do."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    page = f"https://huggingface.co/datasets/{repo_id}"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, (GatedRepoError, RepositoryNotFoundError)) or status in (401, 403):
        return (f"{repo_id} is gated: accept its terms at {page} (logged in there), then log in here with "
                "`hf auth login` (older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN, and rerun")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return (f"the Hugging Face Hub is switched off (HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']}) and {repo_id} "
                "is not in the local cache: unset HF_HUB_OFFLINE and rerun with a network connection")
    if isinstance(e, LocalEntryNotFoundError) or not isinstance(e, HfHubHTTPError):
        return (f"cannot reach the Hugging Face Hub for {repo_id} ({type(e).__name__}): offline? Rerun with a "
                "network connection")
    return f"the Hugging Face Hub refused {repo_id}: {str(e).splitlines()[0]}"


def winoground_examples_ok(path):
    try:
        with open(path, encoding="utf-8") as f:
            return all("image_0" in json.loads(line) for line in f if line.strip())
    except (OSError, ValueError, TypeError, RecursionError):
        return False


def fetch_winoground(root, repo_id=WINOGROUND_REPO):
    """examples.jsonl -> root/examples.jsonl and images.zip -> root/images/, through huggingface_hub (its own
    progress bars, resume and integrity checks; staged in root/.hf and removed once unpacked)."""
    tally = new_tally()
    examples = os.path.join(root, "examples.jsonl")
    if winoground_examples_ok(examples) and unpacked(root, "images.zip"):
        count(tally, "examples.jsonl", "present")
        count(tally, "images.zip", "present")
        return tally
    from huggingface_hub import hf_hub_download
    staging = os.path.join(root, ".hf")
    try:
        paths = [hf_hub_download(repo_id=repo_id, repo_type="dataset", filename=name, local_dir=staging)
                 for name in WINOGROUND_FILES]
    except Exception as e:  # noqa: BLE001 - huggingface_hub and its HTTP client raise many types; all become one line
        if not any(f.endswith(".incomplete") for _, _, files in os.walk(staging) for f in files):
            shutil.rmtree(staging, ignore_errors=True)  # kept for a partial download: hf resumes it
        raise InputError(hub_error(e, repo_id)) from None
    if not winoground_examples_ok(paths[0]):
        count(tally, "examples.jsonl", "failed", f"{paths[0]} is not JSON lines with image_0 / image_1")
        return tally
    shutil.copyfile(paths[0], f"{examples}.part")
    os.replace(f"{examples}.part", examples)
    count(tally, "examples.jsonl", "fetched")
    try:
        with zipfile.ZipFile(paths[1]) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
        in_folder = all(n.startswith("images/") for n in names)  # unzip so that the images land in root/images/
        written = extract(paths[1], root, lambda n: n if in_folder else f"images/{n}")
    except (FetchError, zipfile.BadZipFile) as e:
        count(tally, "images.zip", "failed", str(e))
        return tally
    with open(marker_path(root, "images.zip"), "w") as f:
        json.dump(written, f)
    shutil.rmtree(staging, ignore_errors=True)
    count(tally, "images.zip", "fetched")
    return tally


def fetch_vlchecklist(root, mirror=None, with_images=False, yes=False):
    """VL-CheckList's data/ and corpus/ from its repository's archive into root/; with_images: Visual Genome's two
    archives into root/images/vg/ (VG_100K/, VG_100K_2/), as its DATASETS.md lays them out."""
    tally = new_tally()
    images = os.path.join(root, "images", "vg")
    if with_images:
        confirm("VL-CheckList: Visual Genome images.zip + images2.zip",
                pending_size([(n, s) for n, (_, s) in VG_ARCHIVES.items()], images), yes)

    def keep(name):  # VL-CheckList-main/data/... -> data/...
        rel = name.split("/", 1)[1] if "/" in name else ""
        return rel if rel.split("/", 1)[0] in VLC_FOLDERS else None

    fetch_archive([mirrored(VLC_ARCHIVE_URL, mirror)], os.path.join(root, "VL-CheckList-main.zip"), root, tally,
                  rename=keep)
    if with_images:
        for name, (url, _) in VG_ARCHIVES.items():  # its size is only stated: one public source; CRCs check it
            fetch_archive([mirrored(url, mirror)], os.path.join(images, name), images, tally)
    return tally


def vqa_image_names(root):
    """The COCO val2014 file names test.txt and vqa_text_test.csv use."""
    names = set()
    with open(os.path.join(root, "test.txt"), encoding="utf-8") as f:
        names |= {line.split("*", 1)[0].strip() for line in f if "*" in line}
    with open(os.path.join(root, "vqa_text_test.csv"), newline="", encoding="utf-8") as f:
        names |= {f"COCO_val2014_{int(r['pos_image_id']):012d}.jpg" for r in csv.DictReader(f)
                  if str(r.get("pos_image_id", "")).strip().isdigit()}
    return sorted(n for n in names if n.startswith("COCO_val2014_") and n.endswith(".jpg") and "/" not in n)


def fetch_vqav2(root, mirror=None, with_images=False, yes=False, jobs=JOBS, files=VQA_FILES):
    """The official code's test.txt and vqa_text_test.csv into root/; with_images: only the COCO val2014 images they
    use, one by one, into root/val2014/."""
    tally = new_tally()
    for name, (url, size, sha256) in files.items():
        try:
            count(tally, name, fetch(mirrored(url, mirror), os.path.join(root, name), size, sha256))
        except FetchError as e:
            count(tally, name, "failed", str(e))
    if not with_images or tally["failed"]:
        return tally
    folder = os.path.join(root, "val2014")
    jobs_list = []
    for name in vqa_image_names(root):
        if existing_image([name], [folder]):
            count(tally, name, "present")
        else:
            jobs_list.append((name, [(f"{mirrored(COCO_IMAGE_BASE, mirror)}/val2014/{name}",
                                      os.path.join(folder, name))]))
    confirm(f"vqav2: {len(jobs_list):,} COCO val2014 images (estimated)", len(jobs_list) * COCO_IMAGE_BYTES, yes)
    fetch_images(jobs_list, tally, jobs, desc="COCO val2014")
    return tally


def fetch_refcocog(root, mirror=None, with_images=False, yes=False):
    """refcocog.zip (its refcocog/ folder) into root/; with_images: COCO train2014.zip into root/ (train2014/)."""
    tally = new_tally()
    url, size, md5 = COCO_ZIPS["train2014.zip"]
    if with_images:
        confirm("refcocog: COCO train2014.zip", pending_size([("train2014.zip", size)], root), yes)
    fetch_archive([mirrored(u, mirror) for u in REFCOCOG_URLS], os.path.join(root, "refcocog.zip"), root, tally,
                  REFCOCOG_SIZE, REFCOCOG_SHA256,
                  rename=lambda n: n.split("/", 1)[1] if n.startswith("refcocog/") else None)
    if with_images:
        fetch_archive([mirrored(url, mirror)], os.path.join(root, "train2014.zip"), root, tally, size, md5=md5)
    return tally


def fetch_coco(root, mirror=None, with_images=False, yes=False):
    """The 2014 caption files of annotations_trainval2014.zip into root/annotations/; with_images: train2014.zip into
    root/ (train2014/)."""
    tally = new_tally()
    url, size, md5 = COCO_ZIPS["train2014.zip"]
    if with_images:
        confirm("coco: COCO train2014.zip", pending_size([("train2014.zip", size)], root), yes)
    a_url, a_size, a_md5 = COCO_ZIPS["annotations_trainval2014.zip"]
    fetch_archive([mirrored(a_url, mirror)], os.path.join(root, "annotations_trainval2014.zip"), root, tally, a_size,
                  md5=a_md5, rename=lambda n: n if n in COCO_CAPTION_FILES else None)
    if with_images:
        fetch_archive([mirrored(url, mirror)], os.path.join(root, "train2014.zip"), root, tally, size, md5=md5)
    return tally


# ---- CLI ------------------------------------------------------------------------------------------------------------

def build_parser():
    listing = "\n".join(f"  {name:12s} {what}" for name, what in DATASETS.items())
    p = ArgumentParser(prog="python -m tools.download", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"data sets:\n{listing}\n\n" + __doc__.split("\n\n", 2)[2])
    p.add_argument("name", metavar="NAME", help=f"the data set: {', '.join(DATASETS)}")
    p.add_argument("--data-root", default="data", help="parent folder; the data set goes into DATA_ROOT/NAME "
                                                       "(default data)")
    p.add_argument("--with-images", action="store_true",
                   help="vqav2: the COCO val2014 images its files use; refcocog, coco: COCO train2014.zip; "
                        "vlchecklist: Visual Genome's archives")
    p.add_argument("--yes", action="store_true", help="start downloads over 1 GB without asking")
    p.add_argument("--mirror", default=os.environ.get("DISCFFUSION_MIRROR") or None,
                   help="fetch https://HOST/PATH from MIRROR/HOST/PATH instead (default $DISCFFUSION_MIRROR); "
                        "Winoground: set HF_ENDPOINT instead")
    p.add_argument("--jobs", type=positive_int, default=JOBS, help=f"images fetched at once (default {JOBS})")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.name not in DATASETS:
        raise InputError(f"unknown data set {args.name!r}: choose from {', '.join(DATASETS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    root = os.path.join(args.data_root, args.name)
    check_writable(root, folder=True)  # a data root that is a file, read-only or inside a file: before any fetch
    print(f"{args.name}: {DATASETS[args.name]} -> {root}")
    try:
        tally = fetch_dataset(args, root)
    except OSError as e:  # the local side (network failures are FetchErrors): a folder in the way, a full disk, ...
        where = f"{e.filename}" if e.filename else root
        raise InputError(f"cannot write {where}: {(e.strerror or str(e)).lower()}") from None
    code = summary(args.name, root, tally)
    if args.name == "vlchecklist" and not args.with_images:
        print(vlc_image_route(root))
    return code


def fetch_dataset(args, root):
    """The tally of fetching data set args.name into root."""
    if args.name == "comvg":
        return fetch_comvg(root, args.mirror, args.jobs)
    if args.name == "winoground":
        return fetch_winoground(root)
    if args.name == "vlchecklist":
        return fetch_vlchecklist(root, args.mirror, args.with_images, args.yes)
    if args.name == "vqav2":
        return fetch_vqav2(root, args.mirror, args.with_images, args.yes, args.jobs)
    if args.name == "refcocog":
        return fetch_refcocog(root, args.mirror, args.with_images, args.yes)
    return fetch_coco(root, args.mirror, args.with_images, args.yes)


if __name__ == "__main__":
    sys.exit(run_cli(main))
