"""Model families: what differs between SD 1.x / 2.x, LCM, SDXL, SD3 / SD3.5, Flux and PixArt-Sigma, one file each, told apart by the
denoiser's config (the UNet's, or the MMDiT transformer's).

    fam = family_of(unet.config)                 # families.sdxl, .lcm or .sd: the first whose `matches` holds
    hidden = fam.encode_texts(model, ids, texts)  # (M, L, D) text conditioning, rows indexed like the texts
    kw = fam.unet_kwargs(model, hidden)           # the UNet's keyword arguments for those rows
    pred = fam.denoise(model, z_t, ts, hidden, record)   # one denoiser call inside the capture

The core (discffusion.py) asks its family for these, the real-token mask over its text sequence (`text_mask`), the
denoiser call (`denoise`), the noise (`timestep`, `add_noise`, `target`: DDPM in sd.py, flow matching in sd3.py) and
the capture's layers and processor (`capture_kwargs`); loading (families/loading.py) asks it which components to read
(`components`) and which pipeline's LoRA loader fits (`LORA_PIPELINE`). A new family is one file here with those
names, NAME, PARTS, matches and config, and one entry in FAMILIES.
"""
from families import flux, lcm, pixart, sd, sd3, sdxl

FAMILIES = (flux, sd3, pixart, sdxl, lcm, sd)  # checked in order; sd matches every UNet


def family_of(config):
    """The family module of a UNet config (a dict or a diffusers FrozenDict)."""
    return next(f for f in FAMILIES if f.matches(config))
