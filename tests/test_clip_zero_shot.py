"""The `clip` method: CLIP zero-shot, the plain cosine of the pretrained model, nothing trained (GDBench's CLIP
rows)."""
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
import methods
from tools.sd_configs import make_random_clip


def test_clip_zero_shot_is_the_stock_cosine_and_trains_nothing(tmp_path):
    folder = make_random_clip(str(tmp_path / "clip"), seed=0)
    args = evaluate.build_parser().parse_args(["--methods", "clip", "--clip-model", folder, "--device", "cpu"])
    m = methods.build("clip", args)
    assert m.trainable_parameters() == [] and m.trained_state() == {} and m.config["trainable"] == 0
    images = [Image.new("RGB", (32, 32), c) for c in ((200, 30, 30), (30, 30, 200))]
    texts = ["a red circle", "a blue square", "a"]
    s = m.score(images, texts)                                                   # (2, 3)
    pixels = m.image_processor(images, return_tensors="pt").pixel_values
    tok = m.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = F.normalize(m.clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)     # (2, P)
        txt = F.normalize(m.clip.get_text_features(input_ids=tok.input_ids,
                                                   attention_mask=tok.attention_mask).pooler_output, dim=-1)  # (3, P)
    assert torch.allclose(s, img @ txt.T, atol=1e-5)
    assert "clip" in methods.METHODS
