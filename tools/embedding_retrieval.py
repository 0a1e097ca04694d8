r"""App. E, Table 4: retrieval by the models' embeddings alone ("Discffusion-embedding" vs "CLIP-embedding").

No attention map and no attention score: each image and each text becomes one vector, and a pair's score is their
cosine similarity, on the held-out items of train.py and in the table layout of evaluate.py.

Discffusion-embedding (the paper: "after fine-tuning Discffusion ... we use the latent space features after the VAE
to do the retrieval ... cosine similarity to match these features with corresponding text embeddings"):
    text   t(y) = the text encoder's pooled embedding: the final-layer-normed hidden state at the caption's own EOS
                  (its last real token; D = cross_attention_dim), what CLIPTextModel's pooler_output means. Read from
                  the attention mask, not from pooler_output's first-EOS search, which picks a padding token when the
                  pad token is EOS and padding is on the left (the committed tiny model's tokenizer). SD's text
                  encoder is a plain CLIPTextModel: no text_projection exists, none is applied.
    image  e(x) = mean over noise levels l and cross-attention layers i of  normalize( mean_n q_n^i (W_i^k + p_i^k) )
                  q^i = W_i^q r_x (B, N_img, inner): the layer's query features of the image tokens, from one UNet pass
                  on z_t = add_noise(E(x), eps_l, t_l) conditioned on the empty prompt (so e(x) depends on the image
                  alone); (W^k + p^k) (inner, D), the fine-tuned key projection of eq. 5, pulls the queries back into
                  the text encoder's space (q . W^k r_y = (q W^k) . r_y).
    score  cos(e(x), t(y))
So fine-tuning enters through p^k (the only way "after fine-tuning" can change a feature: VAE and text encoder are
frozen), and e(x) . t(y) is, up to the per-layer normalisation, the mean over image tokens of the pre-softmax
attention logit against the pooled text token, summed over heads: an embedding match, not the pooled attention
probabilities of eq. 3-4. Noise levels and eps are the scorer's own (Discffusion.levels / level_noise).

Items: the held-out test split of `train.py` (datasets.split_items with the checkpoint's --shots and --seed), for
every data set.

CLIP-embedding: clip_baselines.ClipMatcher's cosine of its projected image and text embeddings (with --clip-checkpoint,
the fine-tuned projections of `train.py --method clip_ft`: the paper's CLIP-embedding row equals its CLIP
fine-tuning row of Table 1).

    python -m tools.embedding_retrieval                                  # the shapes world, into docs/
    python -m tools.embedding_retrieval --dataset comvg --checkpoint runs/comvg/prompt_deltas.safetensors \
        --clip-checkpoint runs/comvg_clip/clip_ft.safetensors --output results_table4.json
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

import methods
from common import InputError, check_writable, layer_key, pair_index, split_scores
from tools.cli import ArgumentParser, needs_unet, positive_int, run_cli, write_json
from datasets import REGISTRY, add_data_args, default_root, load_items, loader_options, split_items
from evaluate import evaluate_items
from tools.processes import processes
from tools.runs import SHAPES_RUN
from tools.tables import format_table, summary_line

DEFAULT_DELTAS = os.path.join(SHAPES_RUN, "prompt_deltas.safetensors")
DEFAULT_OUTPUT = os.path.join("runs", "table4_embedding.json")  # docs/paper_results.md: --output docs/...


class DiscffusionEmbedding:
    """A Discffusion model's image and text embeddings (module docstring); `score_items` as every method has it."""

    def __init__(self, model):
        self.model = model
        self.feats = {}
        for name in model.capture.layers:
            model.unet.get_submodule(name).to_q.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def keep(module, inputs, q):                                          # q (b, N_img, inner)
            W = self.key_weight(name)                                         # (inner, D)
            self.feats[name] = F.normalize(q.float().mean(1) @ W, dim=-1)     # (b, D)
        return keep

    def key_weight(self, name):
        """W^k + p^k of one layer (eq. 5; W^k alone before the deltas are loaded), (inner, D)."""
        W = self.model.unet.get_submodule(name).to_k.weight.float()          # (inner, D)
        deltas = self.model.capture.deltas
        return W if deltas is None else W + deltas.k[layer_key(name)].float()

    @property
    def config(self):
        return dict(self.model.config, score="embedding cosine", image_embedding="mean over levels and layers of "
                    "normalize(mean over image tokens of W^q r_x (W^k + p^k)), empty-prompt UNet pass",
                    text_embedding="text encoder final hidden state at the caption's EOS, no projection")

    def prepare_image(self, image):
        """What the image cache keeps of a decoded image: the model's (`Discffusion.prepare_image`)."""
        return self.model.prepare_image(image)

    @torch.no_grad()
    def text_embeddings(self, texts):
        """texts -> (M, D) L2-normalised pooled text embeddings."""
        m = self.model
        tok = m.tokenize(m.tokenizer, texts)                                  # the scorer's own tokenization
        hidden = m.text_encoder(tok.input_ids.to(m.device)).last_hidden_state  # (M, L, D) after final layer norm
        L = tok.attention_mask.shape[1]
        eos = L - 1 - tok.attention_mask.flip(1).argmax(1)                     # (M,) the caption's last real token
        pooled = hidden[torch.arange(len(eos)), eos.to(hidden.device)]       # (M, D)
        return F.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def image_embeddings(self, images):
        """PIL images (or prepared ones) -> (N, D) L2-normalised UNet image embeddings."""
        m = self.model
        latents = m.encode_images(images)                                     # (N, 4, h, w)
        empty, _ = m.encode_texts([""])                                       # (1, L, D)
        noise = m.level_noise(latents.shape[1:])                              # (n_levels, 4, h, w)
        out = []
        for chunk in latents.split(m.pairs_per_call):
            b, total = chunk.shape[0], 0.0
            for level, eps in zip(m.levels, noise):
                z_t, ts = m.add_noise(chunk, eps, m.timestep(level))
                self.feats = {}
                with m.capture:                                               # eq. 5's deltas in every attn2
                    m.unet(z_t, ts, encoder_hidden_states=empty.expand(b, -1, -1))
                total = total + torch.stack([self.feats[n] for n in m.capture.layers]).mean(0)  # (b, D)
            out.append(F.normalize(total / len(m.levels), dim=-1).cpu())
        return torch.cat(out)                                                 # (N, D)

    def score_items(self, items, train=False, generator=None, spent=None):
        """[(images, texts), ...] -> [cosine matrix (len(images), len(texts)), ...]."""
        if train:
            raise InputError("embedding retrieval has nothing to train; train the deltas with train.py")
        img = self.image_embeddings([im for ims, _ in items for im in ims])   # (sum n_img, D)
        txt = self.text_embeddings([t for _, ts in items for t in ts]).cpu()  # (sum n_txt, D)
        shapes = [(len(ims), len(ts)) for ims, ts in items]
        i, j = map(torch.tensor, pair_index(shapes))
        return split_scores((img[i] * txt[j]).sum(-1), shapes)               # (P,) -> per item


def rows_to_run(args):
    """[(row label, method, checkpoint)] of Table 4."""
    deltas = args.checkpoint
    if deltas is None and args.dataset == "shapes" and os.path.exists(DEFAULT_DELTAS):
        deltas = DEFAULT_DELTAS
    clip = "CLIP-embedding" + ("" if args.clip_checkpoint else " (zero-shot)")
    runs = [(clip, "clip_ft", args.clip_checkpoint)] if not args.no_clip else []
    runs.append(("Discffusion-embedding (zero-shot)", "discffusion", None))
    if deltas:
        runs.append(("Discffusion-embedding", "discffusion", deltas))
    return runs


def held_out(args, checkpoint):
    """(root, items, report): train.py's held-out test split (datasets.split_items with the checkpoint's --shots and
    the seed), the first --limit of them."""
    root = args.data_root or default_root(args.dataset)
    items, report = load_items(args.dataset, root, args.annotations, seed=args.seed,
                               **loader_options(args, args.dataset))
    shots = methods.option(args, "shots", methods.recorded_options(checkpoint))
    test = split_items(items, shots, args.seed, args.eval_split)[1]
    return root, test[:args.limit] if args.limit else test, report


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter, prog="python -m tools.embedding_retrieval")
    p.add_argument("--dataset", choices=sorted(REGISTRY), default="shapes",
                   help="data set (default shapes: the embedded world's held-out split)")
    p.add_argument("--data-root", help="the data set's folder (default data/NAME)")
    p.add_argument("--annotations", help="the annotation file, instead of looking in the folder")
    p.add_argument("--eval-split", default="val", help="data sets that ship splits: the test split "
                                                         "(default val), as train.py's")
    p.add_argument("--shots", help="the training shots whose held-out split is used, as train.py's --shots (default "
                                   "the checkpoint's, else the data set's: 0.05, shapes 60)")
    p.add_argument("--checkpoint", help=f"Discffusion's learned p^k, p^v (train.py); shapes default {DEFAULT_DELTAS} "
                                        "when present. A zero-shot row is always added")
    p.add_argument("--clip-checkpoint", help="train.py --method clip_ft's projections for the CLIP-embedding row "
                                             "(default: CLIP zero-shot)")
    p.add_argument("--no-clip", action="store_true", help="leave out the CLIP row (no CLIP weights at hand)")
    p.add_argument("--limit", type=positive_int, help="the first N items (a quick look)")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help=f"JSON (default {DEFAULT_OUTPUT})")
    methods.add_model_args(p)
    add_data_args(p)
    return p


def run(args):
    check_writable(args.output)
    t0 = time.time()
    processes(args.device)
    runs = rows_to_run(args)
    name = args.dataset
    root, items, report = held_out(args, next((c for _, m, c in runs if m == "discffusion" and c), None))
    split = f"held out ({args.eval_split if any(it.split for it in items) else 'split_items'})"
    results, rows, cis = {}, {}, {}
    skipped = {}
    for label, method, checkpoint in runs:
        try:
            model = methods.build(method, args, checkpoint)
        except InputError as e:
            if method != "clip_ft":
                raise
            skipped[label] = str(e)                                           # no CLIP weights here: say so
            print(f"{label}: skipped ({e}; give --clip-model a local CLIP folder or --no-clip)", file=sys.stderr)
            continue
        if method != "clip_ft":
            needs_unet(model, "tools.embedding_retrieval", "App. E's embedding: attn2's query and key projections and "
                       "a CLIP text encoder's pooled state in the cross-attention's key space")
        scorer = model if method == "clip_ft" else DiscffusionEmbedding(model)
        res = evaluate_items(scorer, name, items, args.pairs_per_call, desc=label)
        res.update(method=method, checkpoint=checkpoint, model=scorer.config)
        results[label], rows[label], cis[label] = res, res["metrics"], res["ci"]
        del model, scorer
    table = format_table(name, rows, cis).replace(": accuracy", ": Table 4, embedding retrieval, accuracy")
    print(table)
    print(summary_line(name, next(iter(results.values())), report))
    out = dict(table="Table 4", command=["python", "-m", "tools.embedding_retrieval"] + list(args.argv),
               dataset=name, root=root, split=split, n_items=len(items), rows=rows, skipped=skipped, text=table,
               seconds=round(time.time() - t0, 1), torch_threads=torch.get_num_threads(), results=results)
    write_json(args.output, out)
    print(f"written to {args.output}")
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)

    def cli(a):
        args = build_parser().parse_args(a)
        args.argv = a
        return run(args) and None
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
