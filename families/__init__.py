"""Model families: what differs between SD 1.x / 2.x, LCM and SDXL, one file each, told apart by the UNet's config.

    fam = family_of(unet.config)                 # families.sdxl, .lcm or .sd: the first whose `matches` holds
    hidden = fam.encode_texts(model, ids, texts)  # (M, L, D) text conditioning, rows indexed like the texts
    kw = fam.unet_kwargs(model, hidden)           # the UNet's keyword arguments for those rows

The core (discffusion.py) asks its family for these two and nothing else; loading (families/loading.py) asks it which
components to read (`components`) and which pipeline's LoRA loader fits (`LORA_PIPELINE`). A new family is one file
here with NAME, matches, components, encode_texts, unet_kwargs, config, LORA_PIPELINE, and one entry in FAMILIES.
"""
from families import lcm, sd, sdxl

FAMILIES = (sdxl, lcm, sd)  # checked in order; sd matches every UNet


def family_of(config):
    """The family module of a UNet config (a dict or a diffusers FrozenDict)."""
    return next(f for f in FAMILIES if f.matches(config))
