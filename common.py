"""What every file shares: the bad-input error and its CLI wrapper, precisions, checkpoint files, item flattening.

Not a paper section. The lowest module of the project: it imports nothing of ours, and every other file may import
it. Imports run one way (tests/test_layout.py checks it); each file imports only files above it here:

    common, lse_pool, triplet_loss, tools/sd_configs     (no project imports but common)
    prompt_delta -> attention_capture -> discffusion     (eq. 5 -> §4.3 capture and eq. 3-4 -> §4.2 the model)
    baselines/diffusion_itm, clip_baselines -> methods   (the baselines; every method built from CLI options)
    tools/shapes, tools/download -> datasets             (the embedded world, fetching; every data set, the split)
    evaluate -> train                                    (metrics and tables; training)
    tools/benchmark, pretrain_shapes, figures, ablations (the tooling: import any file above, nothing imports them)
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import threading

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_LISTED = 20  # names listed in a report or message (all are counted)


class InputError(Exception):
    """Bad user input (missing file, malformed data, bad option): the CLIs print it as one line and exit 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, handled: the work stopped cleanly; the message (one line) says where and how to resume.
    Exit 128 + the signal: 130 (Ctrl-C, SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message, signum=signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


class Terminated(KeyboardInterrupt):
    """SIGTERM (schedulers, containers, `timeout`) raised as an exception, where Ctrl-C raises KeyboardInterrupt."""
    signum = signal.SIGTERM


SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


@contextlib.contextmanager
def sigterm_raises():
    """Within: SIGTERM raises Terminated (handled like Ctrl-C's KeyboardInterrupt), the previous handler back
    afterwards. Off the main thread, where no handler can be set, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def run_cli(main, argv=None):
    """Run main(argv) -> exit code: main's own if it returns an int (tools/download.py: 1 when a file failed), else 0; 2
    after an InputError printed as one `error: ...` line on stderr; 128 + the signal after an Interrupted (its one
    line) or an unhandled Ctrl-C / SIGTERM (`interrupted`): 130 for Ctrl-C, 143 for SIGTERM."""
    try:
        with sigterm_raises():
            code = main(argv)
        return code if isinstance(code, int) and not isinstance(code, bool) else 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted ({SIGNAL_NAMES[signum]})", file=sys.stderr)
        return 128 + signum


class ArgumentParser(argparse.ArgumentParser):
    """Every CLI's parser: a usage error is an InputError (one `error: ...` line, exit 2 under run_cli) with a
    --help hint, not argparse's usage block."""

    def error(self, message):
        raise InputError(f"{message} (see --help)")


def number(kind=float, low=None, high=None, above=None):
    """An argparse type: a finite `kind` (int or float) with x > above, low <= x <= high (each bound optional); a bad
    value is a usage error giving the rule, e.g. `argument --lam: must be finite and > 0, got nan`."""
    rule = " and ".join((["finite"] if kind is float else []) +
                        [f"{op} {v}" for op, v in ((">", above), (">=", low), ("<=", high)) if v is not None])

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (math.isfinite(x) and (above is None or x > above) and (low is None or x >= low)
                and (high is None or x <= high)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return x
    return parse


positive_int, positive = number(int, low=1), number(above=0)  # the two most common rules
MAX_SIZE = 2048  # pixels: the largest image side any option accepts (refused before anything is allocated)


def image_size(multiple=1, high=MAX_SIZE):
    """An argparse type: an image side in pixels, a multiple of `multiple` from `multiple` to `high`, e.g.
    `argument --resolution: must be a multiple of 8 from 8 to 2048, got 100000`."""
    rule = f"a multiple of {multiple} from {multiple} to {high}" if multiple > 1 else f"from 1 to {high}"

    def parse(text):
        x = number(int)(text)
        if not (multiple <= x <= high and x % multiple == 0):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return x
    return parse


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

def atomic_write(path, write):
    """write(tmp), then rename it over `path`: a reader never sees a half-written file. Any failure (disk full,
    read-only, not a folder) removes the temporary file, keeps the previous `path`, and is an InputError naming the
    path and the cause."""
    path = str(path)
    tmp = f"{path}.tmp"
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
        name_fits(path, ".tmp")  # atomic_write's temporary name is the longest one
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


def _inside(path, folder):
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_apart(outputs, inputs):
    """Before any work: an InputError unless every output stays clear of every input, paths compared with symlinks
    resolved. outputs [(path, kind)]: kind "file" (written, also as path.tmp) or "folder" (created and removed
    again, e.g. evaluate.py's OUTPUT.items). inputs [(path, what, kind)]: kind "file" (a checkpoint, an annotation
    file, an image: never written) or "tree" (a --model folder: nothing is written anywhere under it). A folder
    output may not hold any input. Thousands of image inputs are cheap: folders are resolved once each."""
    folders = {}

    def real(p):  # the folder's symlinks resolved (once per folder), then the name's own
        p = os.path.abspath(str(p))
        head, name = os.path.split(p)
        if head not in folders:
            folders[head] = os.path.realpath(head)
        return os.path.join(folders[head], name)
    outs = [(path, kind, os.path.realpath(path)) for out, kind in outputs
            for path in ([out, f"{out}.tmp"] if kind == "file" else [out])]
    names = {os.path.basename(o) for _, _, o in outs} | {os.path.basename(str(p)) for p, _, _ in outs}
    for inp, what, ikind in (i for i in inputs if i[0]):
        i = None
        for path, kind, o in outs:
            if ikind == "file" and kind == "file" and os.path.basename(str(inp)) not in names \
                    and not os.path.islink(inp):
                continue  # another name, not a link: not the same file
            i = i or (os.path.realpath(inp) if os.path.islink(inp) else real(inp))
            inside_out = kind == "folder" and _inside(i, o)
            if o == i or (ikind == "tree" and _inside(o, i)) or inside_out:
                how = "is" if o == i else "holds" if inside_out else "lies inside"
                raise InputError(f"cannot write {path}: it {how} the {what} {inp}; an output never replaces an "
                                 "input: choose another output")


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


def write_json(path, obj):
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=1, default=str)))


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
        if saved[k].shape != t.shape:
            raise InputError(f"checkpoint {path}{about}: {k} has shape {tuple(saved[k].shape)} in the file, "
                             f"{tuple(t.shape)} in this model")
        if saved[k].is_floating_point() and not torch.isfinite(saved[k]).all():
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
