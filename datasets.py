"""Data sets of §5.1 (ComVG, RefCOCOg, VQAv2, Winoground, VL-CheckList, MS-COCO), read as their publishers ship them.

Every loader yields `Item`s of one shape, so evaluation and training need no per-data-set branches beyond metrics:
an item is a small image-text matching problem whose score matrix is (len(images), len(texts)).
"""
from dataclasses import dataclass, field


class InputError(Exception):
    """Bad user input (missing file, malformed data, bad option): the CLIs print it as one line and exit 2."""


@dataclass
class Item:
    id: str
    images: list        # image file paths; images[0] is the true image of texts[0]
    texts: list         # candidate texts; texts[0] is the true text of images[0] (Winoground: image k <-> text k)
    category: str = ""  # the table column the item counts towards, e.g. "subject" / "object" / "verb"
    split: str = ""     # the publisher's split where it has one (RefCOCOg: train / val / test)
    meta: dict = field(default_factory=dict)
