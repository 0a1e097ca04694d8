"""§5.3 Baselines: CLIP few-shot learners for image-text matching (Tables 1, 2, 5).

`clip` is CLIP zero-shot: the plain cosine of the pretrained model, nothing trained (the CLIP row of every GDBench and
compositional task). Two methods, trained on the same few-shot splits with the same margin loss (eq. 6) as Discffusion,
images at the CLIP processor's size (224x224 for OpenAI CLIP):
  clip_ft     - "fine-tuning CLIP, with the last layer being the only component subject to tuning": the projection
                heads (visual_projection, text_projection) train, both encoders stay frozen.
  clip_prompt - CoCoOp (Zhou et al. 2022, "Conditional Prompt Learning"): n_ctx learnable context vectors v_1..v_M
                placed after BOS, plus a meta-network h = Linear-ReLU-Linear (hidden = dim/16) of the normalised image
                feature, added to every context vector; both encoders frozen:
                    t(x, y) = [BOS, v_1 + h(x), ..., v_M + h(x), tokens(y), EOS]
                The context depends on the image, so the text feature is computed once per (image, text) pair.

score(x, y) = cos(image feature, text feature): plain cosine, not CLIP's logit scale times it. The scale is a frozen
positive constant, so rankings are identical; plain cosine keeps the margin of eq. 6 in the same units for every
CLIP checkpoint (0.1 = 0.1 of cosine, where CLIP's exp(logit_scale) = 100 would shrink it to 0.001).

    m = ClipMatcher.from_pretrained("openai/clip-vit-base-patch32", method="clip_prompt")   # or a local folder
    scores = m.score(images, texts)                                                         # (len(images), len(texts))
"""
import contextlib
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer
from transformers.masking_utils import create_causal_mask

from common import (InputError, check_tensors, copy_tensors, cut_text, default_device, pair_index, read_checkpoint,
                    resolve_dtype, save_tensors, split_scores)
from discffusion import to_rgb
from families.loading import LOAD_ERRORS, check_hub, load_failure, warn_pickles

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
METHODS = ("clip", "clip_ft", "clip_prompt")   # clip: zero-shot, nothing trained (GDBench's CLIP rows)
CTX_INIT = "a photo of a"  # CoCoOp's default context; used when it tokenizes to exactly n_ctx tokens


class ClipMatcher(nn.Module):

    def __init__(self, clip, tokenizer, image_processor, method="clip_ft", n_ctx=4, seed=0, name=DEFAULT_MODEL,
                 pairs_per_call=256):
        super().__init__()
        if method not in METHODS:
            raise InputError(f"method {method!r}: choose from {', '.join(METHODS)}")
        self.clip, self.tokenizer, self.image_processor = clip, tokenizer, image_processor
        self.method, self.name, self.pairs_per_call = method, name, pairs_per_call
        self.n_ctx = n_ctx if method == "clip_prompt" else 0
        self.clip.requires_grad_(False)
        self.clip.eval()
        if method == "clip_ft":
            self.clip.visual_projection.requires_grad_(True)
            self.clip.text_projection.requires_grad_(True)
        elif method == "clip_prompt":
            dim = clip.config.text_config.hidden_size    # ctx_dim: the token embedding width
            vis = clip.config.projection_dim              # the image feature fed to the meta-net
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.ctx = nn.Parameter(self._init_ctx(n_ctx, dim))                                  # (n_ctx, D)
                self.meta_net = nn.Sequential(nn.Linear(vis, max(1, vis // 16)), nn.ReLU(),
                                              nn.Linear(max(1, vis // 16), dim))
            self.to(clip.device, clip.dtype)

    def _init_ctx(self, n_ctx, dim):
        ids = self.tokenizer(CTX_INIT, add_special_tokens=False).input_ids
        if len(ids) == n_ctx:
            with torch.no_grad():
                return self.clip.text_model.embeddings.token_embedding.weight[ids].detach().clone().float().cpu()
        return torch.randn(n_ctx, dim) * 0.02

    @classmethod
    def from_pretrained(cls, path_or_id=DEFAULT_MODEL, method="clip_ft", device=None, dtype=None, n_ctx=4, seed=0,
                        **options):
        """A hub id or a local folder holding a CLIPModel, its CLIPTokenizer and CLIPImageProcessor."""
        device = default_device(device)
        dtype = resolve_dtype(dtype or torch.float32, device)
        online = not os.path.isdir(path_or_id) and check_hub(str(path_or_id), "CLIP model", "config.json",
                                                              "--clip-model PATH for a local CLIP folder")
        local = dict(local_files_only=not online)  # one hub request above, not the client's retry loop
        if os.path.isdir(path_or_id):
            warn_pickles(path_or_id, "CLIP model")
        try:
            clip = CLIPModel.from_pretrained(path_or_id, dtype=dtype, **local).to(device)
            tokenizer = CLIPTokenizer.from_pretrained(path_or_id, **local)
            image_processor = AutoImageProcessor.from_pretrained(path_or_id, **local)  # CLIP's (torchvision's if there)
        except LOAD_ERRORS as e:
            raise InputError(f"could not load CLIP model {path_or_id!r}: {load_failure(e)}") from None
        return cls(clip, tokenizer, image_processor, method=method, n_ctx=n_ctx, seed=seed, name=str(path_or_id),
                   **options)

    @property
    def device(self):
        return self.clip.device

    @property
    def dtype(self):
        return self.clip.dtype

    @property
    def config(self):
        size = self.image_processor.crop_size
        return dict(model=self.name, method=self.method, n_ctx=self.n_ctx, score="cosine",
                    image_size=[size["height"], size["width"]], projection_dim=self.clip.config.projection_dim,
                    text_hidden_size=self.clip.config.text_config.hidden_size,
                    trainable=sum(p.numel() for p in self.trainable_parameters()))

    capture = contextlib.nullcontext()  # no attention capture: `with model.capture:` does nothing, as train.py needs

    def add_trainable(self):
        """The trainable tensors (they exist from construction: nothing to attach)."""
        return self.trainable_parameters()

    def trainable_parameters(self):
        if self.method == "clip":
            return []
        if self.method == "clip_ft":
            return [self.clip.visual_projection.weight, self.clip.text_projection.weight]
        return [self.ctx, *self.meta_net.parameters()]

    def trained_state(self):
        """The method's own tensors by name: what save_trained writes."""
        if self.method == "clip":
            return {}
        if self.method == "clip_ft":
            return {"visual_projection.weight": self.clip.visual_projection.weight,
                    "text_projection.weight": self.clip.text_projection.weight}
        return {"ctx": self.ctx, **{f"meta_net.{k}": v for k, v in self.meta_net.named_parameters()}}

    # ---- encoders ----

    def prepare_image(self, image):
        """A decoded PIL image -> its processed pixels (3, 224, 224), what the image cache keeps (bounded by CLIP's
        input, not the file's); a tensor is already prepared and passes as it is. Each image is processed alone, so
        its pixels never depend on its batch-mates."""
        if isinstance(image, torch.Tensor):
            return image
        return self.image_processor([to_rgb(image)], return_tensors="pt").pixel_values[0]

    def image_features(self, images):
        """PIL images (or prepared ones) -> L2-normalised CLIP image features (N, P); the vision tower is frozen in
        both methods."""
        pixels = torch.stack([self.prepare_image(im) for im in images])
        pixels = pixels.to(self.device, self.clip.dtype)                                      # (N, 3, 224, 224)
        with torch.no_grad():
            pooled = self.clip.vision_model(pixel_values=pixels).pooler_output                # (N, Dv)
        return F.normalize(self.clip.visual_projection(pooled), dim=-1)                       # (N, P)

    def tokenize(self, texts):
        """Captions -> ids, mask (M, L); truncated so that BOS + n_ctx + caption + EOS fits the position table."""
        max_len = min(self.tokenizer.model_max_length, self.clip.config.text_config.max_position_embeddings)
        tok = self.tokenizer([cut_text(t, max_len) for t in texts], padding=True, truncation=True,
                             max_length=max_len - self.n_ctx,
                             return_tensors="pt")
        return tok.input_ids.to(self.device), tok.attention_mask.to(self.device)

    def text_features_plain(self, texts):
        """Captions -> L2-normalised CLIP text features (M, P) through the stock text model (clip_ft)."""
        ids, mask = self.tokenize(texts)
        with torch.no_grad():
            pooled = self.clip.text_model(input_ids=ids, attention_mask=mask).pooler_output   # (M, Dt)
        return F.normalize(self.clip.text_projection(pooled), dim=-1)                         # (M, P)

    def encode_embeds(self, embeds, mask):
        """CLIPTextModel.forward from token embeddings (B, L, D) instead of ids, then text_projection -> (B, P).

        Same stock submodules and order: + position embeddings -> causal (and padding) mask -> encoder ->
        final_layer_norm -> the hidden state at EOS, the last real token (mask.sum - 1, so any pad id works)."""
        text = self.clip.text_model
        hidden = text.embeddings(inputs_embeds=embeds)                                        # (B, L, D)
        # the cache (None) goes by position: its keyword is past_key_values up to transformers 5.2x, cache after
        attn = create_causal_mask(text.config, hidden, mask, None)
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=attn, is_causal=True).last_hidden_state
        hidden = text.final_layer_norm(hidden)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(-1) - 1]  # (B, D)
        return self.clip.text_projection(pooled)                                              # (B, P)

    def prompt_text_features(self, img_feats, ids, mask):
        """CoCoOp: one text feature per pair. img_feats (B, P), ids/mask (B, L) -> L2-normalised (B, P)."""
        tokens = self.clip.text_model.embeddings.token_embedding(ids)                         # (B, L, D)
        ctx = self.ctx + self.meta_net(img_feats).unsqueeze(1)                                # (B, n_ctx, D)
        embeds = torch.cat([tokens[:, :1], ctx, tokens[:, 1:]], dim=1)                        # (B, L + n_ctx, D)
        mask = torch.cat([mask[:, :1].expand(-1, self.n_ctx), mask], dim=1)                   # (B, L + n_ctx)
        return F.normalize(self.encode_embeds(embeds, mask), dim=-1)

    # ---- scores ----

    def similarities(self, items):
        """items [(images, texts), ...] -> [Tensor (n_img, n_txt), ...], cosine similarities, graph kept."""
        img = self.image_features([im for ims, _ in items for im in ims])                    # (sum n_img, P)
        texts = [t for _, ts in items for t in ts]
        shapes = [(len(ims), len(ts)) for ims, ts in items]
        img_idx, txt_idx = map(torch.tensor, pair_index(shapes))
        if self.method in ("clip", "clip_ft"):
            txt = self.text_features_plain(texts)                                             # (sum n_txt, P)
            return split_scores((img[img_idx] * txt[txt_idx]).sum(-1), shapes)                # (P,) cosines
        ids, mask = self.tokenize(texts)
        flat, bs = [], self.pairs_per_call
        for s in range(0, len(img_idx), bs):
            i, j = img_idx[s:s + bs], txt_idx[s:s + bs]
            txt = self.prompt_text_features(img[i], ids[j], mask[j])                          # (chunk, P)
            flat.append((img[i] * txt).sum(-1))                                               # (chunk,)
        return split_scores(torch.cat(flat), shapes)

    def score_items(self, items, train=False, generator=None, spent=None):
        """[(images, texts), ...] -> [Tensor (len(images), len(texts)), ...]; images[0] is the true image of texts[0].

        train=True: gradients reach trainable_parameters() and tensors stay on the model's device; otherwise CPU
        float tensors without a graph. `generator` and `spent` are unused (no randomness, no UNet rows here), kept for
        the common interface."""
        self.train(train)
        self.clip.eval()  # frozen encoders (CLIP has no dropout by default; keep them deterministic anyway)
        if train:
            return self.similarities(items)
        with torch.inference_mode():
            return [s.float().cpu() for s in self.similarities(items)]

    def score(self, images, texts):
        """Scores (len(images), len(texts)), higher = better match; a pair's score ignores its batch-mates."""
        return self.score_items([(list(images), list(texts))])[0]

    # ---- trained tensors on disk ----

    def save_trained(self, path, training_args=None):
        """One safetensors file with the method's tensors and metadata."""
        save_tensors(path, self.trained_state(), dict(
            model=self.name, method=self.method, n_ctx=self.n_ctx, training_args=training_args or {}))

    def load_trained(self, path):
        """Load save_trained's file; a missing or unreadable file, another method or a tensor shape that differs is
        an InputError naming it.

        A different base model with matching shapes only warns (a hub id and its local copy are the same model).
        Returns the file's metadata."""
        meta, tensors = read_checkpoint(path)
        if meta.get("method") != self.method:
            raise InputError(f"{path}: trained with method {meta.get('method')!r}, this model is {self.method!r}")
        own = self.trained_state()
        check_tensors(path, tensors, own, f" (trained on {meta.get('model')!r}, n_ctx={meta.get('n_ctx')}; this is "
                                          f"{self.name!r}, n_ctx={self.n_ctx})")
        if meta.get("model") != self.name:
            warnings.warn(f"{path}: trained on {meta.get('model')!r}, loading onto {self.name!r} (shapes match)")
        copy_tensors(tensors, own)
        return meta
