"""Fetching a data set, one command per data set, into the layout its loader reads (benchmarks/<name>.py: `fetch`).

    python -m tools.download comvg        # the ComVG CSV + only the 524 Visual Genome images it uses
    python -m tools.download winoground   # Hugging Face Hub facebook/winoground (gated: accept its terms, log in)
    python -m tools.download vlchecklist  # VL-CheckList annotations; prints where to get its images
    python -m tools.download vqav2        # the official code's VQAv2 test files; --with-images: their COCO images
    python -m tools.download refcocog     # refcocog.zip; --with-images --yes: COCO train2014.zip too
    python -m tools.download coco         # COCO 2014 captions; --with-images --yes: COCO train2014.zip too
    python -m tools.download flickr30k    # DiffusionITM's top-10 lists (both); Flickr30K's images by its form
    python -m tools.download coco_order --with-images --yes   # ARO's coco_karpathy_test.json + COCO val2014.zip
    python -m tools.download flickr30k_order / imagecode / clevr / pets / svo / sugarcrepe   # see docs/gdbench.md
    (vg_relation, vg_attribution, mmbias: not fetched; evaluate.py's error line says where to get them)

Each data set goes into DATA_ROOT/NAME (default data/NAME). Every file is written to <file>.part and renamed only once
it is complete and checked: sha256 / md5 where known, images must decode with PIL, archives must pass zipfile's CRC
checks. A file failing its check is removed and counted as failed; a killed run never leaves a half file that later
counts as done. A rerun skips what is complete and continues a .part where the server allows (HTTP Range). Each run
ends with a count of fetched / already present / failed files and the manual route for what failed: exit 0 when
nothing failed, 1 when something did, 2 on bad input. Anything over 1 GB states its size and starts only with --yes
(or a yes at the prompt).

URLs are constants of each data set's file in benchmarks/; the fetching itself is benchmarks/fetching.py. --mirror URL (or $DISCFFUSION_MIRROR) fetches https://HOST/PATH from URL/HOST/PATH
instead (the tests serve their fixtures this way); Winoground goes through huggingface_hub, which honours HF_ENDPOINT.
"""
import argparse
import os
import shutil
import sys

from common import MAX_LISTED, InputError, check_writable
from datasets import REGISTRY
from benchmarks.fetching import JOBS
from tools.cli import ArgumentParser, positive_int, run_cli

FETCHABLE = {name: d.source for name, d in REGISTRY.items() if hasattr(d.source, "fetch")}


def hint(name):
    """The one-line command fetching data set `name` (what it fetches in brackets), or "" for one it cannot fetch."""
    return f"fetch it with: {FETCHABLE[name].HINT}" if name in FETCHABLE else ""


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
        print(f"rerun the same command to retry; by hand: {FETCHABLE[name].manual_route(root)}", file=out)
    return 1 if failed else 0


def build_parser():
    listing = "\n".join(f"  {name:12s} {source.FETCHES}" for name, source in FETCHABLE.items())
    p = ArgumentParser(prog="python -m tools.download", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"data sets:\n{listing}\n\n" + __doc__.split("\n\n", 2)[2])
    p.add_argument("name", metavar="NAME", help=f"the data set: {', '.join(FETCHABLE)}")
    p.add_argument("--data-root", default="data", help="parent folder; the data set goes into DATA_ROOT/NAME "
                                                       "(default data)")
    p.add_argument("--with-images", action="store_true",
                   help="also the images the data set's files use, where its fetch can (see each data set below)")
    p.add_argument("--yes", action="store_true", help="start downloads over 1 GB without asking")
    p.add_argument("--mirror", default=os.environ.get("DISCFFUSION_MIRROR") or None,
                   help="fetch https://HOST/PATH from MIRROR/HOST/PATH instead (default $DISCFFUSION_MIRROR); "
                        "data sets on the Hugging Face Hub: set HF_ENDPOINT instead")
    p.add_argument("--jobs", type=positive_int, default=JOBS, help=f"images fetched at once (default {JOBS})")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.name not in FETCHABLE:
        raise InputError(f"unknown data set {args.name!r}: choose from {', '.join(FETCHABLE)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    root = os.path.join(args.data_root, args.name)
    source = FETCHABLE[args.name]
    fresh = not os.path.exists(root)
    check_writable(root, folder=True)  # a data root that is a file, read-only or inside a file: before any fetch
    print(f"{args.name}: {source.FETCHES} -> {root}")
    try:
        tally = source.fetch(root, args.mirror, args.with_images, args.yes, args.jobs)
    except OSError as e:  # the local side (network failures are FetchErrors): a folder in the way, a full disk, ...
        where = f"{e.filename}" if e.filename else root
        raise InputError(f"cannot write {where}: {(e.strerror or str(e)).lower()}") from None
    finally:
        if fresh and os.path.isdir(root) and not os.listdir(root):  # a failed first fetch leaves no empty folder
            shutil.rmtree(root, ignore_errors=True)
    code = summary(args.name, root, tally)
    after = getattr(source, "after", None) and source.after(root, args)
    if after:
        print(after)
    return code


if __name__ == "__main__":
    sys.exit(run_cli(main))
