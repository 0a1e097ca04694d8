"""Fetching a publisher's files into the layout its loader reads: one file at a time, checked, never half-written.

Every file is written to <file>.part and renamed only once it is complete and checked: sha256 / md5 where known,
images must decode with PIL, archives must pass zipfile's CRC checks. A file failing its check is removed and counted
as failed; a killed run never leaves a half file that later counts as done. A rerun skips what is complete and
continues a .part where the server allows (HTTP Range). Each data set's file in benchmarks/ has its own `fetch(root,
args)` built from these; `python -m tools.download NAME` runs it. --mirror URL fetches https://HOST/PATH from
URL/HOST/PATH instead (the tests serve their fixtures this way).
"""
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

from common import RASTER_FORMATS, InputError, file_hash

GB, MB = 1e9, 1e6
CONFIRM_ABOVE = 1 * GB      # bytes: anything bigger starts only with --yes
TIMEOUT = 60                # seconds without a byte before a request fails
CHUNK = 1 << 20
JOBS = 8                    # images fetched at once
UNREACHABLE_AFTER = 5       # connection failures in a row after which the remaining images are not tried
USER_AGENT = "discffusion-download/1.0 (+python urllib)"

# ---- public sources several data sets share ---------------------------------------------------------------------

DSD_RAW = "https://raw.githubusercontent.com/eric-ai-lab/DSD/main/data"  # the paper's official code, branch main
VG_ARCHIVES = {"images.zip": ("https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip", 9_731_705_982),
               "images2.zip": ("https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip", 5_471_658_058)}
COCO_IMAGE_BASE = "http://images.cocodataset.org"   # + /val2014/<file_name>, the annotations' coco_url
COCO_IMAGE_BYTES = 160_000                           # a COCO 2014 image on average, for the size estimate
COCO_ZIPS = {  # name: (url, bytes, md5)
    "train2014.zip": ("http://images.cocodataset.org/zips/train2014.zip", 13_510_573_713,
                      "0da8c0bd3d6becc4dcb32757491aca88"),
    "val2014.zip": ("http://images.cocodataset.org/zips/val2014.zip", 6_645_013_297,
                    "a3d79f5ed8d289b7a7554ce06a5782b3"),
    "annotations_trainval2014.zip": ("http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
                                     252_872_794, "0a379cfc70b0e71301e0f377548639bd")}

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
        with Image.open(path, formats=RASTER_FORMATS) as im:
            im.verify()
        with Image.open(path, formats=RASTER_FORMATS) as im:  # verify() leaves the image unusable; load() catches a truncated JPEG
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


def fetch_one(tally, name, url, path, size=None, sha256=None):
    """One file (`fetch`) counted in the tally under `name`, a FetchError as failed with its reason; True if the
    file is there."""
    try:
        count(tally, name, fetch(url, path, size, sha256))
        return True
    except FetchError as e:
        count(tally, name, "failed", str(e))
        return False

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
