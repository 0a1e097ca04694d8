"""The tooling around the method, not the method: each module runs from the repository root as `python -m tools.X`
(`--help` lists its options), and imports the paper's top-level files by plain name. Every tool writes under runs/ by
default; the committed figures and models (docs/, models/) are rewritten only by naming them (`--out docs`). `python
-m tools.download NAME` fetches a data set into the layout its loader in benchmarks/ reads (docs/data.md); `python -m
tools.benchmark` measures speed and memory against the official code's per-pair loop (App. B, §5.5;
docs/benchmark.md); `python -m tools.curve` draws accuracy against UNet rows per item (levels, draws, adaptive
elimination, level weights; docs/budget.md); `python -m tools.figures` draws Fig. 7, 8 and 10 (docs/figures.md); `python -m tools.ablations`
runs the ablation sweeps of §5.6 and App. F (docs/ablations.md); `python -m tools.shapes` writes the embedded shapes
world in the ComVG format; `python -m tools.pretrain_shapes` pretrains the committed tiny Stable Diffusion on it
(models/tiny-shapes-sd; `--family sd3`: a tiny SD3, docs/models.md), `python -m tools.distill_lcm` distils that
into a latent consistency model (models/tiny-shapes-lcm, Table 3); the paper results with no file of their own
(docs/paper_results.md): `python -m tools.embedding_retrieval` (Table 4), `python -m tools.generation` (App. G: Fig.
9, Table 12), `python -m tools.failures` (Fig. 11).

The run machinery of train.py and evaluate.py (no commands), one concept a module: cli.py (exit codes, argparse types,
signals, output checks), processes.py (accelerate's processes, each one's share, the gathering), resume.py
(evaluation's partial files and training's checkpoint), intervals.py (bootstrap intervals), tables.py (the printed
tables), runs.py (which rows and data sets evaluate.py evaluates, the suites and their embedded instances),
prefilter.py (evaluate.py --prefilter-k: CLIP's top K re-ranked) and training.py (what train.py needs around Alg. 1);
`python -m tools.sd_configs PRESET` builds a Stable Diffusion architecture from its config with random weights (for
the tests and the benchmark; make_random_clip the CLIP's), `python -m tools.mmdit_configs PRESET` the same for SD3,
SD3.5, Flux and PixArt-Sigma.
"""
import logging

# transformers' once-per-run notice that an image processor falls back to PIL without torchvision (diffusers'
# pipelines import CLIPImageProcessor): not something a user of these tools can act on, so not printed before --help
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())
