"""Writing the shapes world (benchmarks/shapes.py) to a folder from the command line.

    python -m tools.shapes --out data/shapes --n 50 --seed 0
"""
import sys

from benchmarks.shapes import COLORS, RELATIONS, SHAPES, write_comvg
from tools.cli import MAX_SIZE, ArgumentParser, image_size, positive_int, run_cli


def build_parser():
    p = ArgumentParser(prog="python -m tools.shapes", description="Write the shapes world (coloured shapes in spatial relations) in the ComVG format.")
    p.add_argument("--out", required=True, help="folder for comvg.csv and images/")
    p.add_argument("--n", type=positive_int, default=50, help="items per negative type (subject / object / verb)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=image_size(), default=32, help=f"image side in pixels, 1 to {MAX_SIZE}")
    p.add_argument("--colors", default=",".join(COLORS), help=f"comma-separated, from {','.join(COLORS)}")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--relations", default=",".join(RELATIONS))
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    path = write_comvg(a.out, a.n, a.seed, a.size, a.colors.split(","), a.shapes.split(","), a.relations.split(","))
    print(f"wrote {3 * a.n} items to {path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
