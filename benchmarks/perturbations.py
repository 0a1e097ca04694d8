"""ARO's order perturbations (Yuksekgonul et al., 2023, §3: COCO-Order and Flickr30k-Order), drawn from a seed.

    tagger = spacy_tagger()                                   # spaCy en_core_web_sm, as ARO (optional install)
    texts = order_texts("A man riding a red horse.", tagger, random.Random(0))   # [true, 4 perturbations]

An order item is one image against five texts: the caption and its four perturbations, each passed through ARO's
`pre_caption` (lower-cased, the punctuation .!"()*#:;~ made spaces, at most 30 words): shuffle the nouns and the
adjectives among themselves, shuffle everything but the nouns and adjectives, shuffle within each trigram, shuffle the
trigrams. ARO draws with numpy's and Python's global generators; here every draw comes from one `random.Random` seeded
per item, so the same seed gives the same texts, and a draw equal to the caption is drawn again. A tagger is any
function text -> [(token, Penn tag)]: spaCy's by default, another injected (the tests' own, the shapes world's). ARO
tokenizes the trigram shuffles with nltk.word_tokenize; here the tagger's tokens are used for all four (one tokenizer,
no second optional install).
"""
import re

from common import InputError

PERTURBATIONS = ("shuffle_nouns_and_adj", "shuffle_allbut_nouns_and_adj", "shuffle_within_trigrams",
                 "shuffle_trigrams")
NOUN_TAGS = ("NN", "NNS", "NNP", "NNPS")
ADJ_TAGS = ("JJ", "JJR", "JJS")
SPACY_MISSING = ("the order perturbations need spaCy's English tagger, as ARO uses: pip install spacy && "
                 "python -m spacy download en_core_web_sm")
MAX_WORDS = 30


def spacy_tagger(model="en_core_web_sm"):
    """spaCy's tagger as a function text -> [(token, tag)]; absent spaCy or model: one InputError naming the install."""
    try:
        import spacy
        nlp = spacy.load(model)
    except (ImportError, OSError):
        raise InputError(SPACY_MISSING) from None
    return lambda text: [(t.text, t.tag_) for t in nlp(text)]


def pre_caption(caption, max_words=MAX_WORDS):
    """ARO's (BLIP's) caption cleaning: lower case, .!"()*#:;~ -> space, runs of spaces -> one, first max_words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def _shuffled(tokens, idx, rng):
    out, vals = list(tokens), [tokens[i] for i in idx]
    rng.shuffle(vals)
    for i, v in zip(idx, vals):
        out[i] = v
    return out


def trigrams(tokens):
    return [tokens[i:i + 3] for i in range(0, len(tokens), 3)]


def perturb(kind, tagged, rng):
    """One of ARO's four perturbations of a tagged sentence [(token, tag)] -> the perturbed text."""
    tokens = [t for t, _ in tagged]
    if kind == "shuffle_nouns_and_adj":
        for tags in (NOUN_TAGS, ADJ_TAGS):
            tokens = _shuffled(tokens, [i for i, (_, g) in enumerate(tagged) if g in tags], rng)
    elif kind == "shuffle_allbut_nouns_and_adj":
        tokens = _shuffled(tokens, [i for i, (_, g) in enumerate(tagged) if g not in NOUN_TAGS + ADJ_TAGS], rng)
    elif kind == "shuffle_within_trigrams":
        tokens = [t for tri in trigrams(tokens) for t in rng.sample(tri, len(tri))]
    elif kind == "shuffle_trigrams":
        tris = trigrams(tokens)
        rng.shuffle(tris)
        tokens = [t for tri in tris for t in tri]
    else:
        raise ValueError(f"unknown perturbation {kind!r}")
    return " ".join(tokens)


def order_texts(caption, tagger, rng, kinds=PERTURBATIONS, tries=50):
    """[the cleaned caption, its len(kinds) perturbations, each cleaned], drawn from `rng`. A draw that gives the
    caption back is drawn again (up to `tries` times): a perturbation differs from the caption wherever the words
    allow (ARO keeps such draws; with two distinct words to move, 50 tries all failing has odds 2^-50)."""
    tagged, true = tagger(caption), pre_caption(caption)
    out = [true]
    for k in kinds:
        for _ in range(tries):
            text = pre_caption(perturb(k, tagged, rng))
            if text != true:
                break
        out.append(text)
    return out
