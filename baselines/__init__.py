"""The baselines of §5.3 that Discffusion is compared with, one file each: diffusion_itm.py, DiffusionITM (Krojer et
al. 2023: the normalised denoising error as the score; with the attention score it also makes the official code's
combined score, `--preset official`), and clip_baselines.py, the CLIP few-shot learners (fine-tuned CLIP, CLIP with
learned prompts) trained with the same margin loss (eq. 6). Both import only the top-level common.py and
discffusion.py; methods.py builds them from the `--method` option of train.py and evaluate.py.
"""
