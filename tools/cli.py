"""What every command line shares: one `error: ...` line and exit 2 for bad input, argparse types with their rules,
Ctrl-C and SIGTERM as clean stops with the command that resumes, outputs that never replace an input, JSON results.

    sys.exit(run_cli(main))      # main(argv) raises InputError for bad input; run_cli prints it as one line
"""
import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import pathlib
import shlex
import signal
import socket
import sys
import threading

import torch
from accelerate.utils import reduce

from common import InputError, atomic_write


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, handled: the work stopped cleanly; the message (one line) says where and how to resume.
    Exit 128 + the signal: 130 (Ctrl-C, SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message, signum=signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


class Terminated(KeyboardInterrupt):
    """SIGTERM (schedulers, containers, `timeout`) or SIGHUP (a closed terminal or ssh session) raised as an exception,
    where Ctrl-C raises KeyboardInterrupt."""
    signum = signal.SIGTERM

    def __init__(self, signum=signal.SIGTERM):
        super().__init__()
        self.signum = signum


SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}
RAISED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # raised as Terminated under run_cli, as Ctrl-C is


@contextlib.contextmanager
def sigterm_raises():
    """Within: SIGTERM raises Terminated (handled like Ctrl-C's KeyboardInterrupt), the previous handler back
    afterwards. Off the main thread, where no handler can be set, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)
    previous = {s: signal.signal(s, handler) for s in RAISED_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def stops_ignored():
    """Within: Ctrl-C, SIGTERM and SIGHUP are ignored (a second Ctrl-C while the first one's line is being made and
    printed would end in a traceback); the previous handlers are back afterwards. Off the main thread: nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, *RAISED_SIGNALS)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


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
        with stops_ignored():                                      # a second Ctrl-C now: no traceback
            print(e, file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt as e:
        with stops_ignored():
            signum = getattr(e, "signum", signal.SIGINT)
            print(f"interrupted ({SIGNAL_NAMES[signum]})", file=sys.stderr)
        return 128 + signum


class ArgumentParser(argparse.ArgumentParser):
    """Every CLI's parser: a usage error is an InputError (one `error: ...` line, exit 2 under run_cli) with a
    --help hint, not argparse's usage block."""

    def error(self, message):
        raise InputError(f"{message} (see --help)")


def default_threads():
    """torch CPU threads for a run: the cores not already busy (from the load average), at least 1 and at most torch's
    default; oversubscribed threads stall badly on a shared machine (evaluate.py took 12 min instead of 107 s on 2
    busy cores)."""
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - round(os.getloadavg()[0])))


def use_threads(threads=None):
    """Set torch's CPU threads to `threads`, else `default_threads()`; the number set, for the run's record."""
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    return threads


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


@contextlib.contextmanager
def held(path, option):
    """Within: this run holds `path` (an --output or --output-dir), and a second live run on it is refused with one
    line (two runs writing one output would mix their results). The hold is an abstract Unix socket named after the
    path with its symlinks resolved: no file is left, and the kernel lets go when the process ends, however it ends.
    Under `accelerate launch` only the main process holds it; where no such socket can be made, nothing is held."""
    if not path or os.environ.get("RANK", "0").strip() not in ("", "0"):
        yield
        return
    key = hashlib.sha256(os.path.realpath(str(path)).encode()).hexdigest()[:40]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(f"\0discffusion-output-{key}")
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"{option} {path}: another run is writing it now (two runs on one output would mix "
                             "their results); wait for it to end, or choose another output") from None
        s = None
    try:
        yield
    finally:
        if s is not None:
            s.close()


def write_json(path, obj):
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=1, default=str)))




# ---- stops: Ctrl-C and SIGTERM ---------------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C; schedulers, containers, `timeout`; a closed terminal


@contextlib.contextmanager
def stops(argv=None):
    """Within: the first Ctrl-C (SIGINT) or SIGTERM sets the yielded Event and its `signum` (train.py's loop ends its
    step, checkpoints and raises Interrupted, given here the command that resumes); a second one acts at once (the
    previous handlers are back: KeyboardInterrupt, or under run_cli Terminated for SIGTERM). The previous handlers are
    back afterwards. Off the main thread, where no handler can be set, the Event is never set."""
    stop = threading.Event()
    stop.signum = signal.SIGINT
    previous = {}

    def handler(signum, frame):
        stop.signum = signum
        stop.set()
        for s, h in previous.items():
            signal.signal(s, h)
        again = "press again" if signum == signal.SIGINT else "send it again"
        print(f"\n{SIGNAL_NAMES[signum]}: stopping after this step ({again} to abort at once)", file=sys.stderr)
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            previous[s] = signal.signal(s, handler) or signal.SIG_DFL
    try:
        yield stop
    except Interrupted as e:
        raise Interrupted(f"{e}; resume with: {resume_command(argv)}", e.signum) from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resume_command(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "train.py", *argv] + ([] if "--resume" in argv else ["--resume"]))


def stop_requested(stop, done, total):
    """Did any process get a stop signal (and is there a step left to resume)? Every process asks at every step."""
    return stop is not None and bool(reduce(torch.tensor(float(stop.is_set())), "sum") > 0) and done < total


def needs_unet(model, tool, reads):
    """A tool built on a UNet's own structure refuses a model whose denoiser is a transformer (SD3 / SD3.5, Flux,
    PixArt-Sigma) with one InputError naming its family; `reads`: what the tool reads that such a model lacks."""
    from diffusers import UNet2DConditionModel
    if not isinstance(model.unet, UNet2DConditionModel):
        raise InputError(f"{tool}: model {model.name!r} is of the {model.family} family ({type(model.unet).__name__}); "
                         f"this tool reads {reads}, which only the UNet families (SD 1.x / 2.x, LCM, SDXL) have")
