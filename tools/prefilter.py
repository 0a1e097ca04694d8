"""--prefilter-k: full retrieval without a UNet pass per candidate. CLIP (the project's, zero-shot cosine) ranks every
candidate of an item; the diffusion scorer re-ranks only CLIP's top K. The filter's own recall@K is reported beside
the re-ranked R@1 / R@5, so a reader sees what the filter lost.

The final ranking of an item is the method's order of CLIP's top K, then CLIP's order of the rest. An item whose true
candidate is not in CLIP's top K is a miss: it is not scored by the diffusion model and keeps its CLIP rank (>= K; its
score matrix is stood in for by one with the true candidate below that many others), so it is wrong at R@1 and at R@5
unless K < 5 and CLIP ranked it within 5. An item with at most K candidates is kept whole. Items are one text against
many images (T->I) or one image against many texts (I->T).

    kept, misses, stats = prefilter(clip_matcher, items, k=20)   # stats: {k, recall, hits, items, candidates}
"""
import torch

from datasets import ImageCache


def candidates(item):
    """'images' for a T->I item (one text), 'texts' for an I->T one."""
    return "images" if len(item.texts) == 1 and len(item.images) > 1 else "texts"


def features(clip, keys, encode, batch):
    """{key: L2-normalised CLIP feature} for the distinct keys, `batch` at a time."""
    keys, out = list(dict.fromkeys(keys)), {}
    for s in range(0, len(keys), batch):
        with torch.inference_mode():
            f = encode(keys[s:s + batch]).float().cpu()                                   # (b, P)
        out.update(zip(keys[s:s + batch], f))
    return out


def clip_ranking(clip, items, batch=32):
    """[(item, cosines of its candidates (n,))]: each item's text against its images or image against its texts."""
    cache = ImageCache(size=batch, prepare=clip.prepare_image)
    images = [str(p) for it in items for p in it.images]
    paths = {str(p): p for it in items for p in it.images}
    img = features(clip, images, lambda keys: clip.image_features(cache.load([paths[k] for k in keys])), batch)
    txt = features(clip, [t for it in items for t in it.texts], clip.text_features_plain, 8 * batch)
    out = []
    for it in items:
        if candidates(it) == "images":
            s = torch.stack([img[str(p)] for p in it.images]) @ txt[it.texts[0]]           # (n_images,)
        else:
            s = torch.stack([txt[t] for t in it.texts]) @ img[str(it.images[0])]           # (n_texts,)
        out.append((it, s))
    return out


def top_k(item, s, k):
    """(the item cut to CLIP's top k candidates, the true one first) or None if the true one is not among them."""
    order = torch.argsort(s, descending=True, stable=True)[:k].tolist()
    if 0 not in order:
        return None
    keep = [0] + [i for i in order if i != 0]
    field = candidates(item)
    cut = [getattr(item, field)[i] for i in keep]
    return type(item)(**{**vars(item), field: cut, "meta": {**item.meta, "prefilter": keep}})


def miss_matrix(item, rank):
    """A score matrix whose true candidate has 0-based rank `rank` (below `rank` others)."""
    s = torch.zeros(rank + 1)
    s[0] = -1.0
    return s[:, None] if candidates(item) == "images" else s[None, :]


def prefilter(clip, items, k, batch=32):
    """(kept items, [(missed item, miss_matrix)], stats) of CLIP's top-k filter over `items`."""
    kept, misses = [], []
    long = [it for it in items if len(getattr(it, candidates(it))) > k]
    ranked = dict((id(it), s) for it, s in clip_ranking(clip, long, batch)) if long else {}
    for it in items:
        if id(it) not in ranked:
            kept.append(it)
            continue
        cut = top_k(it, ranked[id(it)], k)
        if cut is None:
            rank = torch.argsort(ranked[id(it)], descending=True, stable=True).tolist().index(0)   # CLIP's, >= k
            misses.append((it, miss_matrix(it, rank)))
        else:
            kept.append(cut)
    hits = len(items) - len(misses)
    return kept, misses, dict(k=k, recall=100.0 * hits / len(items) if items else None, hits=hits,
                              items=len(items), filtered=len(long),
                              candidates=max((len(getattr(it, candidates(it))) for it in items), default=0))
