"""SD 2.1's real CLIP BPE tokenizer (tests/fixtures/sd21_tokenizer, written by tests/fixtures/make_sd21_tokenizer.py
from open-clip-torch's BPE merges) and the real-token mask of Discffusion.encode_texts (eq. 4's "real tokens"):
ordinary captions, "!" (= the pad token, id 0), more than 77 tokens, a literal <|endoftext|>, empty captions, SD 1.5's
pad = EOS and left padding."""
import os
import warnings

import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from common import InputError
from discffusion import Discffusion
from tools.sd_configs import make_random_sd

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sd21_tokenizer")
SHAPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "tiny-shapes-sd")


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny SD 2.x model with SD 2.1's real tokenizer (vocabulary 49,408, 77 positions)."""
    folder = make_random_sd("tiny", str(tmp_path_factory.mktemp("sd21tok")), tokenizer=FIXTURE)
    return Discffusion.from_pretrained(folder, device="cpu")


def real_positions(mask):
    return mask.nonzero().flatten().tolist()


def test_the_fixture_is_sd21s_tokenizer(tok):
    assert len(tok) == 49408 and tok.model_max_length == 77 and tok.padding_side == "right"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (49406, 49407, "!", 0)
    # CLIP's own ids (openai/CLIP's tokenizer, the same merges)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [0] * 70


def test_mask_is_the_captions_tokens(model, tok):
    texts = ["a photo of a cat", "Two dogs, playing with a frisbee in the park."]
    hidden, mask = model.encode_texts(texts)
    assert hidden.shape[:2] == mask.shape == (2, 77)
    for text, m in zip(texts, mask):
        n = len(tok(text).input_ids)                                  # BOS + caption + EOS
        assert real_positions(m) == list(range(1, n - 1)), text


def test_a_real_exclamation_mark_counts_though_it_is_the_pad_id(model, tok):
    """SD 2.x pads with "!" (id 0), and transformers tokenizes a caption's "!" as that same id 0 (the pad token is a
    special token), as SD 2.x's own pipeline does; the mask tells them apart by the tokenizer's attention mask."""
    ids = tok("a cat!").input_ids
    assert ids == [49406, 320, 2368, 0, 49407]
    mask = model.encode_texts(["a cat!"])[1][0]
    assert real_positions(mask) == [1, 2, 3]                          # a, cat, ! - not the 73 pads of id 0
    # the "!" changes the score: it is attended to like any other word
    image = [Image.new("RGB", (16, 16), "red")]
    assert not torch.equal(model.score(image, ["a cat!"]), model.score(image, ["a cat"]))


def test_more_than_77_tokens_is_truncated_to_75_caption_tokens_with_one_warning(model):
    long = " ".join(["a red circle left of a blue square"] * 12)      # 96 caption tokens
    model._warned_truncation = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask = model.encode_texts([long, "a cat"])[1]
        model.encode_texts([long])
    assert real_positions(mask[0]) == list(range(1, 76)) and real_positions(mask[1]) == [1, 2]
    assert sum("truncated" in str(w.message) for w in caught) == 1


def test_a_literal_endoftext_is_not_a_real_token(model, tok):
    """A caption's literal "<|endoftext|>" is tokenized as the pipelines tokenize it (EOS, 49407); it is not a real
    token, and the words after it still are (the caption does not end there)."""
    text = "a cat <|endoftext|> on a table"
    ids = tok(text).input_ids
    assert ids.count(49407) == 2 and ids[3] == 49407
    mask = model.encode_texts([text])[1][0]
    assert real_positions(mask) == [1, 2, 4, 5, 6]
    assert real_positions(model.encode_texts(["<|endoftext|>"])[1][0]) == []


def test_an_empty_caption_is_an_error_naming_the_item(model):
    image = [Image.new("RGB", (16, 16), "red")]
    for empty in ("", "   ", "<|endoftext|>"):
        with pytest.raises(InputError, match=r"item 1 of this call, text 0: .* has no caption tokens"):
            model.score_items([(image, ["a cat"]), (image, [empty, "a dog"])])


def test_sd15_pad_is_eos_and_left_padding(tmp_path):
    """SD 1.5 pads with EOS (the mask must not end at the first pad); the shapes model's tokenizer pads on the left."""
    m = Discffusion.from_pretrained(make_random_sd("tiny-sd15", str(tmp_path / "sd15")), device="cpu")
    assert m.tokenizer.pad_token_id == m.tokenizer.eos_token_id
    n = len(m.tokenizer("a red circle").input_ids)
    assert real_positions(m.encode_texts(["a red circle"])[1][0]) == list(range(1, n - 1))
    shapes = Discffusion.from_pretrained(SHAPES, device="cpu")
    assert shapes.tokenizer.padding_side == "left"
    ids = shapes.tokenizer("a red circle").input_ids
    L, n = shapes.tokenizer.model_max_length, len(ids)
    assert real_positions(shapes.encode_texts(["a red circle"])[1][0]) == list(range(L - n + 1, L - 1))
