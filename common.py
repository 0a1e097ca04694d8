"""What the paper's files share: the bad-input error, precisions and devices, files written atomically, the trained
tensors' safetensors files, and items flattened into (image, text) pairs and back.

Not a paper section. The lowest module of the project: it imports nothing of ours, and every other file may import
it. Imports run one way (tests/test_layout.py checks it); each file imports only files above it here:

    common, lse_pool, triplet_loss                           (no project imports but common)
    benchmarks/* -> datasets                                 (one file per data set; the registry, judges, the split)
    prompt_delta -> attention_capture -> families -> discffusion   (eq. 5 -> §4.3 -> each model family -> §4.2)
    baselines/* -> methods                                   (the baselines; every method built from CLI options)
    tools/cli, intervals, tables, resume, processes, runs    (the command lines' machinery)
    evaluate -> tools/training -> train                      (the protocol and its scoring loop; Alg. 1 uses it)
    tools/benchmark, download, figures, ablations, ...       (the tooling: import any file above, nothing imports them)
The command lines' own helpers (argparse types, exit codes, signals, output checks) are in tools/cli.py.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_LISTED = 20  # names listed in a report or message (all are counted)
# the only formats an image file is opened as (Image.open(path, formats=RASTER_FORMATS)): never by what its bytes
# claim, so a PostScript file named .jpg is refused, not handed to Ghostscript by PIL's EPS plugin
RASTER_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


class InputError(Exception):
    """Bad user input (missing file, malformed data, bad option): the CLIs print it as one line and exit 2."""


CHARS_PER_TOKEN = 64  # no CLIP BPE token spans more characters; a whitespace run is one space to its tokenizer


def cut_text(text, n_tokens):
    """The caption's start that holds its first n_tokens tokens (whitespace runs as one space, as CLIP's tokenizer
    reads them), so a 32 MB caption line is never tokenized in full before the cut. Short captions are unchanged."""
    limit = n_tokens * CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    words, n = [], 0
    for m in re.finditer(r"\S+", text):                                  # lazily: no list of every word
        words.append(m.group())
        n += len(words[-1]) + 1
        if n > limit:
            break
    return " ".join(words)[:limit]


def resolve_dtype(dtype, device):
    """None (fp16 on CUDA, fp32 elsewhere), a name of DTYPES, or a torch.dtype -> torch.dtype."""
    if dtype is None:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"precision {dtype!r}: choose from {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def default_device(device=None):
    """None -> cuda if available, else cpu; asking for cuda where there is none is an InputError."""
    if device and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                         f"{torch.cuda.device_count()} GPUs visible); use --device cpu")
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


# ---- files: written atomically; trained tensors as one safetensors file with JSON metadata ----------------------

TMP_LONGEST = ".tmp-4194304-0123abcd"  # atomic_write's temporary suffix at its longest (Linux's largest pid)


def atomic_write(path, write):
    """write(tmp), then rename it over `path`: a reader never sees a half-written file. The temporary name is this
    writer's own (PATH.tmp-PID-RANDOM), so two writers of one path never write into each other's file. Any failure
    (disk full, read-only, not a folder) removes the temporary file, keeps the previous `path`, and is an InputError
    naming the path and the cause."""
    path = str(path)
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise InputError(f"cannot write {path}: {_cause(e, path)}") from None
    except BaseException:  # Ctrl-C mid-write: no temporary file left behind either
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def check_writable(path, folder=False):
    """Before any work: raise an InputError unless `path` (a file to write, or with folder=True a folder to write
    into) can be written. Creates the folder (as the write would), then a probe file in it, and removes both: a
    check leaves nothing behind (the writes create their folders)."""
    path = os.path.abspath(str(path))
    where = path if folder else os.path.dirname(path)
    if not folder and os.path.isdir(path):
        raise InputError(f"cannot write {path}: it is a folder")
    if not folder:
        name_fits(path, TMP_LONGEST)  # atomic_write's temporary name is the longest one
    created, d = [], where                                          # the folders makedirs adds, deepest first
    while not os.path.lexists(d) and os.path.dirname(d) != d:
        created.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(where, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except FileExistsError:
        raise InputError(f"cannot write {path}: {'it' if where == path else where} is a file, not a folder") from None
    except OSError as e:
        raise InputError(f"cannot write {path}: {_cause(e, where)}") from None
    finally:
        for d in created:
            with contextlib.suppress(OSError):
                os.rmdir(d)


def name_fits(path, suffix=""):
    """Raise an InputError unless the last part of `path` + `suffix` fits the file system's name limit (NAME_MAX,
    255 bytes on most), so that an over-long --output is refused before any work, not when it is written."""
    name = os.path.basename(os.path.abspath(str(path))) + suffix
    limit = 255
    with contextlib.suppress(OSError, ValueError):
        limit = os.pathconf(_existing_parent(path), "PC_NAME_MAX")
    if len(os.fsencode(name)) > limit:
        raise InputError(f"cannot write {path}: its name {'with ' + suffix + ' ' if suffix else ''}is "
                         f"{len(os.fsencode(name))} bytes, over this file system's limit of {limit}")


def _existing_parent(path):
    where = os.path.dirname(os.path.abspath(str(path)))
    while not os.path.isdir(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    return where


def _cause(e, path):
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    with contextlib.suppress(OSError):
        if shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2 ** 20:
            return "no space left on device"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def file_hash(path, algorithm="sha256"):
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def save_tensors(path, tensors, meta):
    """Write float32 CPU copies of `tensors` and JSON-encoded `meta` to one safetensors file, atomically."""
    from safetensors.torch import save_file
    atomic_write(path, lambda tmp: save_file({k: t.detach().float().cpu().contiguous() for k, t in tensors.items()},
                                             tmp, metadata={k: json.dumps(v, default=str) for k, v in meta.items()}))


def read_checkpoint(path, tensors=True):
    """(metadata with JSON values decoded, tensors) of a safetensors file ({} for tensors=False: the header only);
    a missing or unreadable file is an InputError naming it."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            raw, out = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except FileNotFoundError:
        raise InputError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for corrupt files
        raise InputError(f"checkpoint {path} is not a readable safetensors file ({type(e).__name__})") from None
    return {k: _json_or_text(v) for k, v in raw.items()}, out


def _json_or_text(value):
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError):  # not JSON, or nested too deeply to be metadata
        return value


def meta_value(path, meta, key, kind, what):
    """meta[key] of checkpoint `path` if it is a `kind` (a type or tuple of types), else an InputError naming the
    file, the key and what it should hold."""
    value = meta.get(key)
    if not isinstance(value, kind):
        got = "absent" if key not in meta else json.dumps(value, default=str)[:60]
        raise InputError(f"checkpoint {path}: its metadata {key!r} is {got}, not {what}")
    return value


def check_tensors(path, saved, own, about=""):
    """Raise an InputError naming the first difference between a file's tensors and the model's {name: tensor}."""
    extra, lacking = sorted(set(saved) - set(own)), sorted(set(own) - set(saved))
    if extra or lacking:
        raise InputError(f"checkpoint {path}{about} does not fit this model: not in this model {extra[:3]}, "
                         f"not in the checkpoint {lacking[:3]}")
    for k, t in own.items():
        if not saved[k].is_floating_point():                      # int, bool, complex: copy_ would coerce silently
            raise InputError(f"checkpoint {path}{about}: {k} is {str(saved[k].dtype).replace('torch.', '')}, not a "
                             "real floating-point tensor (the trained files hold float32)")
        if saved[k].shape != t.shape:
            raise InputError(f"checkpoint {path}{about}: {k} has shape {tuple(saved[k].shape)} in the file, "
                             f"{tuple(t.shape)} in this model")
        if not torch.isfinite(saved[k]).all():
            raise InputError(f"checkpoint {path}{about}: {k} holds non-finite values (NaN or inf)")


def copy_tensors(saved, own):
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(saved[k])


# ---- items -> (image, text) pairs and back ------------------------------------------------------------------------

def pair_index(shapes):
    """Item shapes [(n_img, n_txt), ...] -> (image index, text index) of every pair, item by item, row-major, into
    the concatenated images and texts of all items."""
    img, txt, i0, t0 = [], [], 0, 0
    for n, m in shapes:
        img += [i0 + i for i in range(n) for _ in range(m)]
        txt += [t0 + j for _ in range(n) for j in range(m)]
        i0, t0 = i0 + n, t0 + m
    return img, txt


def split_scores(flat, shapes):
    """Pair scores (P,) in pair_index order -> one (n_img, n_txt) matrix per item."""
    return [s.reshape(shape) for s, shape in zip(flat.split([n * m for n, m in shapes]), shapes)]


def layer_key(name):
    """A module name usable as an nn.ParameterDict key."""
    return name.replace(".", "_")
