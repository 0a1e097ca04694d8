"""ARO's four order perturbations (benchmarks/perturbations.py) with an injected tagger; spaCy's absence."""
import random
import sys

import pytest

from benchmarks import perturbations as P
from common import InputError
from support import tagger


def test_pre_caption_is_aros():
    assert P.pre_caption('A Man (riding)  a "horse".') == "a man riding a horse"
    assert P.pre_caption(" ".join(map(str, range(40)))).split() == [str(i) for i in range(30)]


def test_each_perturbation_keeps_the_words_and_moves_what_it_says():
    caption = "A man riding a red horse in the green field."
    true = P.pre_caption(caption)
    tagged = tagger(caption)
    rng = random.Random(0)
    for kind in P.PERTURBATIONS:
        out = P.perturb(kind, tagged, rng)
        assert sorted(out.split()) == sorted(t for t, _ in tagged), kind    # a permutation of the tokens
    nouns_adj = P.perturb("shuffle_nouns_and_adj", tagged, random.Random(3)).split()
    fixed = [i for i, (_, g) in enumerate(tagged) if g not in P.NOUN_TAGS + P.ADJ_TAGS]
    assert [nouns_adj[i] for i in fixed] == [tagged[i][0] for i in fixed]          # the others stay in place
    for i, (_, g) in enumerate(tagged):                                            # nouns stay on noun slots
        if g in P.NOUN_TAGS:
            assert dict(tagged)[nouns_adj[i]] in P.NOUN_TAGS
    rest = P.perturb("shuffle_allbut_nouns_and_adj", tagged, random.Random(3)).split()
    kept = [i for i, (_, g) in enumerate(tagged) if g in P.NOUN_TAGS + P.ADJ_TAGS]
    assert [rest[i] for i in kept] == [tagged[i][0] for i in kept]
    tagged = tagger("a man riding a red horse in the field")                      # 9 tokens: three trigrams
    within = P.perturb("shuffle_within_trigrams", tagged, random.Random(1)).split()
    tokens = [t for t, _ in tagged]
    assert [sorted(within[i:i + 3]) for i in range(0, len(tokens), 3)] == [sorted(tokens[i:i + 3])
                                                                           for i in range(0, len(tokens), 3)]
    tri = P.perturb("shuffle_trigrams", tagged, random.Random(1)).split()
    assert sorted(tuple(tri[i:i + 3]) for i in range(0, 9, 3)) == sorted(tuple(g) for g in P.trigrams(tokens))
    assert true == "a man riding a red horse in the green field"


def test_every_perturbation_differs_where_the_words_allow_and_same_seed_same_texts():
    for caption in ("A man riding a red horse.", "Two green dogs and a red cat.", "a red horse in a green field"):
        for seed in range(20):
            texts = P.order_texts(caption, tagger, random.Random(seed))
            assert len(texts) == 5 and all(t != texts[0] for t in texts[1:]), (caption, seed, texts)
            assert texts == P.order_texts(caption, tagger, random.Random(seed))
    # one word: no perturbation can change it (kept, as ARO keeps it)
    assert P.order_texts("horse", tagger, random.Random(0)) == ["horse"] * 5


def test_missing_spacy_is_one_error_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)              # import spacy -> ImportError
    with pytest.raises(InputError, match="pip install spacy && python -m spacy download en_core_web_sm"):
        P.spacy_tagger()
