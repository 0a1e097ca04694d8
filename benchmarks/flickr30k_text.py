"""Flickr30K text retrieval of GDBench (Krojer et al., 2023, §4): one image against 10 captions (I->T, R@1 / R@5).

    val_top10_RN50x64_text.json   {image path: [10 captions]}, the true caption first, the other 9 CLIP RN50x64's
    images/<id>.jpg               top hits among other images' captions (paths read as the image-retrieval file's)

Every image of the file is a query (1,000), as DiffusionITM's loader. Fetched with the retrieval lists
(`python -m tools.download flickr30k`); the same folder (data/flickr30k is its default root too).
"""
import os

from benchmarks.top10 import image_paths, karpathy_pool, read_lists, valid_list
from benchmarks.reading import Item, finish, new_report

TOP10_TEXT = "val_top10_RN50x64_text.json"
LAYOUT = f"{TOP10_TEXT} + images/<id>.jpg (the same folder as flickr30k's)"
HINT = "python -m tools.download flickr30k (both candidate lists; the images from Flickr30K's authors into images/)"


def load(root, annotations=None, split=None, seed=0, karpathy=False):
    """val_top10_RN50x64_text.json -> one Item per image: images [it], texts its 10 candidate captions (the true one
    first). No split; `seed` unused (the lists are frozen).

    karpathy=True (--flickr-karpathy): dataset_flickr30k.json's `split` (default test) instead, each image against the
    first caption of every image of the split (its own first): full retrieval with one true text per image (not the
    5-caption protocol, where any of an image's 5 captions counts), for --prefilter-k."""
    if karpathy:
        path, report, pool = karpathy_pool(root, annotations, split)
        firsts = [caps[0] for _, caps in pool]
        items = [Item(id=f"i{i}", images=[p], texts=[firsts[i]] + firsts[:i] + firsts[i + 1:])
                 for i, (p, _) in enumerate(pool)]
        return finish(report, items, "Flickr30K", "images/<filename>", [os.path.join(root, "images")])
    path, data = read_lists(root, annotations, TOP10_TEXT, "Flickr30K text-retrieval lists")
    report, items, seen = new_report("flickr30k_text", [path]), [], set()
    for k, (image, captions) in enumerate(data.items()):
        report["records"] += 1
        where = f"{path}[{k}]"
        if not valid_list(report, where, image, captions):
            continue
        images = image_paths(report, where, [image], root, seen)
        if images:
            items.append(Item(id=f"i{k}", images=images, texts=list(captions)))
    return finish(report, items, "Flickr30K", "images/<id>.jpg", [os.path.join(root, "images")])
