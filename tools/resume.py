"""Resume, one concept for both scripts: evaluation's partial files and training's checkpoint.

- evaluate.py: every scored item is appended to OUTPUT's partial files (results.json -> results.items/part-N.jsonl)
  under a fingerprint of the run (model, checkpoint, options, item ids); `--resume` keeps the records whose item
  digest (its id, texts and image bytes) still matches, so an edited sentence or image is scored again and the resumed
  result equals a fresh run's.
- train.py: checkpoint.pt (torch.save of tensors and plain data, read with weights_only=True) holds the step, the
  trained tensors, the optimizer, the RNG states and the history; `--resume` refuses options that define the run when
  they differ and records the optimisation settings that changed (RESUME_FIXED / RESUME_APPLIED).
"""
import hashlib
import json
import os
import pathlib
import re
import shutil

import torch
from accelerate import PartialState

from common import InputError, atomic_write, default_device, file_hash, resolve_dtype
from tools.cli import write_json


def partial_root(output):
    """The folder of OUTPUT's partial files: results.json -> results.items (removed once OUTPUT is written)."""
    return os.path.splitext(output)[0] + ".items"


def check_owner(output):
    """OUTPUT's partial folder belongs to OUTPUT: results.json and results.txt share results.items, so the folder
    names its output (owner.json) and another output's run may neither resume nor delete the scores there."""
    root = partial_root(output)
    try:
        owner = json.loads(pathlib.Path(root, "owner.json").read_text()).get("output")
    except (OSError, ValueError, AttributeError):
        return                                                     # no folder yet, or one that names no output
    if owner != os.path.basename(output):
        other = os.path.join(os.path.dirname(output), str(owner))
        raise InputError(f"--output {output}: {root} holds the partial scores of another output, {other} (a run "
                         f"that stopped before its end; resume it with --output {other} --resume); choose another "
                         f"--output, or remove {root}")


def claim_owner(output):
    """Name OUTPUT as the owner of its partial folder (check_owner)."""
    root = partial_root(output)
    os.makedirs(root, exist_ok=True)
    write_json(os.path.join(root, "owner.json"), {"output": os.path.basename(output)})


def partial_folder(output, label, name):
    """Where one run's per-item records go while it is scored: results.json -> results.items/<data set>/<label>/."""
    return os.path.join(partial_root(output), name, re.sub(r"[^\w.-]+", "-", label))


def fingerprint(args, method, checkpoint, model, name, root, split, items):
    """What a partial file's scores depend on, flat {what: value} so that a difference can be named: the method, the
    checkpoint's content, precision and device, the scorer's options (model.config), the data set and its items."""
    ids = hashlib.sha256(json.dumps([it.id for it in items]).encode()).hexdigest()[:16]
    fp = dict(getattr(model, "config", {}), method=method, checkpoint=checkpoint and file_hash(checkpoint)[:16],
              device=default_device(args.device), pairs_per_call=args.pairs_per_call,
              precision=str(resolve_dtype(args.precision, default_device(args.device))).replace("torch.", ""),
              dataset=name, data_root=os.path.abspath(root), split=split,
              items=f"{len(items)}, ids {ids}")
    return json.loads(json.dumps(fp, default=str))


def read_fingerprint(path):
    """A partial folder's fingerprint.json; a truncated or garbled one is an InputError naming it (its scores cannot
    be matched to a run, so they are not kept)."""
    try:
        fp = json.loads(pathlib.Path(path).read_bytes())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        fp = e
    if not isinstance(fp, dict):
        raise InputError(f"--resume: {path} is not a fingerprint (cut short or overwritten?): the scores beside it "
                         "cannot be matched to this run; rerun without --resume to start over")
    return fp


def parse_record(line):
    """One line of a partial file -> its record, or None for a line that is not one (a power cut can leave a line
    that is complete but garbled): that item is scored again."""
    try:
        r = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(r, dict) and type(r.get("k")) is int and r["k"] >= 0 and isinstance(r.get("content"), str) and (
        isinstance(r.get("error"), str) or isinstance(r.get("scores"), list))
    return r if ok else None


def item_digest(item, hashes):
    """What an item's scores depend on besides the run's options: its id, texts, and its images' bytes (and a
    --mask-object box, an ARO crop). `hashes`: {path: file hash} memo, one read per image file."""
    def image(path):
        key = str(path)
        if key not in hashes:
            try:
                hashes[key] = file_hash(key)[:32]
            except OSError as e:
                hashes[key] = f"unreadable {type(e).__name__}"
        return [hashes[key], getattr(path, "box", None)] + ([path.crop] if getattr(path, "crop", None) else [])
    content = [item.id, list(item.texts), [image(p) for p in item.images]]
    return hashlib.sha256(json.dumps(content, default=str).encode()).hexdigest()[:32]


def kept(record, item, digest):
    """A partial record still true for `item`: the same content digest and a finite score matrix of its shape."""
    if record["content"] != digest:
        return False
    if "error" in record:
        return True
    s = record["scores"]
    try:
        return torch.isfinite(torch.tensor(s, dtype=torch.float64)).all().item() and \
            list(torch.tensor(s).shape) == [len(item.images), len(item.texts)]
    except (TypeError, ValueError, RuntimeError):
        return False


def open_partial(folder, fp, resume, items):
    """({item position: record} already scored in `folder`, this process's file to append records to).

    Without --resume, or without a fingerprint there, `folder` starts empty. With --resume its fingerprint must be
    `fp` (else an InputError names what differs); a line cut short by a kill, or garbled, is dropped; a record is
    kept only if its content digest is that of items[k] now (same id, texts and image bytes): an item edited since
    is scored again. Every process runs this."""
    state = PartialState()
    fp_file = os.path.join(folder, "fingerprint.json")
    old = read_fingerprint(fp_file) if resume and os.path.exists(fp_file) else None
    if old is not None and old != fp:
        diff = [k for k in dict.fromkeys([*fp, *old]) if old.get(k) != fp.get(k)]
        raise InputError(f"--resume: {folder} holds scores made with another " + "; another ".join(
            f"{k} ({old.get(k)} there, {fp.get(k)} now)" for k in diff[:3]) + "; rerun without --resume to start over")
    parts = lambda: sorted(f for f in os.listdir(folder) if f.startswith("part-"))  # noqa: E731
    state.wait_for_everyone()
    if state.is_main_process:
        if old is None:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            write_json(fp_file, fp)
        for part in parts():
            with open(os.path.join(folder, part), "rb+") as f:
                f.truncate(f.read().rfind(b"\n") + 1)
    state.wait_for_everyone()
    done = {}
    for part in parts():
        with open(os.path.join(folder, part), "rb") as f:
            done.update((r["k"], r) for r in map(parse_record, f) if r)
    hashes = {}
    done = {k: r for k, r in done.items() if k < len(items) and kept(r, items[k], item_digest(items[k], hashes))}
    state.wait_for_everyone()                                      # all have read before anyone appends
    return done, open(os.path.join(folder, f"part-{state.process_index}.jsonl"), "a")


def partial_store(args, label, method, checkpoint, model, name, root, split, items):
    """The partial file of one (run, data set) (`open_partial`), or None without --output."""
    if not args.output:
        return None
    folder = partial_folder(args.output, label, name)
    check_owner(args.output)
    if PartialState().is_main_process:
        claim_owner(args.output)
    store = open_partial(folder, fingerprint(args, method, checkpoint, model, name, root, split, items), args.resume,
                         items)
    if store[0] and PartialState().is_main_process:
        print(f"{label} {name}: {len(store[0])} of {len(items)} items already scored in {folder}")
    return store


# ---- train.py's checkpoint (--resume) --------------------------------------------------------------------------------
# --resume and the options: those that define the trained tensors, the data order or the score are refused when they
# differ from the checkpoint's; the optimisation settings below apply from the resumed step on (the restored
# optimizer state takes the command line's --lr and --weight-decay), and each change is recorded in args.changes
# (results.json's args and the trained file's training_args), with the step it took effect from.
RESUME_FIXED = ("method", "dataset", "shots", "seed", "batch_size", "grad_accum", "lam", "pooling", "layers", "levels",
                "preset", "resolution", "resize_via", "itm_variant", "itm_timesteps", "uncond_attention", "split_by",
                "ref_negatives", "mask_object", "vlc_max_per_file", "precision", "lora", "guidance_scale", "reading",
                "max_sequence_length")


RESUME_APPLIED = ("lr", "weight_decay", "grad_clip", "margin", "negatives", "loss", "steps", "epochs")


STATE_KEYS = ("step", "params", "optimizer", "rng", "history", "args")


def read_state(path):
    """checkpoint.pt -> its state dict, loaded with torch.load(weights_only=True): tensors and plain data only, so a
    crafted pickle is refused and never runs. An unreadable file or one that lacks the state's parts is an
    InputError naming it."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a truncated, empty or foreign file
        text = str(e).strip()
        why = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        raise InputError(f"--resume: {path} is not a checkpoint train.py wrote: " + (
            f"it names {why.group(1)}, which only a crafted file does (refused, not run)" if why else
            f"{type(e).__name__}{': ' + text.splitlines()[0][:120] if text else ''}")) from None
    lacking = [k for k in STATE_KEYS if k not in ck] if isinstance(ck, dict) else list(STATE_KEYS)
    if lacking or not isinstance(ck["args"], dict) or not isinstance(ck["params"], list):
        raise InputError(f"--resume: {path} is not a checkpoint train.py wrote (no {', '.join(lacking) or 'args'})")
    wrong = next((k for k, ok in FIELD_TYPES.items() if not ok(ck.get(k) if k in STATE_KEYS else ck["args"].get(k))),
                 None)
    if wrong:
        held = ck.get(wrong) if wrong in STATE_KEYS else ck["args"].get(wrong)
        raise InputError(f"--resume: {path} is not a checkpoint train.py wrote: its {wrong!r} is a "
                         f"{type(held).__name__} {str(held)[:40]!r}; rerun without --resume to start over")
    return ck


def _whole(x, low=0):
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


# what each field of the state (and of its args) must be before it is used (a step "3" or a batch size "2" would be
# repeated, not multiplied)
FIELD_TYPES = {
    "step": _whole, "optimizer": lambda x: isinstance(x, dict),
    "rng": lambda x: isinstance(x, torch.Tensor) and x.dtype == torch.uint8,
    "history": lambda x: isinstance(x, list) and all(isinstance(h, dict) for h in x),
    "batch_size": lambda x: _whole(x, 1), "processes": lambda x: x is None or _whole(x, 1),
    "changes": lambda x: x is None or isinstance(x, list),
}


def check_params(path, saved, params):
    """The checkpoint's trained tensors fit this model's, in number and shape (zip would silently cut them short)."""
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in saved]
    if shapes != [tuple(p.shape) for p in params]:
        raise InputError(f"--resume: {path} holds {len(shapes)} trained tensors that do not fit this model's "
                         f"{len(params)} (first shapes {shapes[:2]} there, {[tuple(p.shape) for p in params[:2]]} "
                         f"here): written with other --layers or --model? rerun without --resume to start over")


def restore(args, params, opt, scaler, log=print):
    """(first step, history): (0, []) unless --resume finds OUTPUT_DIR/checkpoint.pt, whose trained tensors,
    optimizer, grad scaler and RNG state are then restored; an option that defines the run must be the checkpoint's
    (RESUME_FIXED), a changed optimisation setting (RESUME_APPLIED) applies from here on and is recorded."""
    dist = PartialState()
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    if not (args.resume and os.path.exists(ckpt_path)):
        return 0, []
    ck = read_state(ckpt_path)
    was = dict(ck["args"], batch_size=ck["args"]["batch_size"] * ck["args"].get("processes", 1))
    if "score" in was:                                             # --preset's name before
        was.setdefault("preset", was["score"])
    for key in RESUME_FIXED:
        now, what = getattr(args, key, None), f"--{key.replace('_', '-')}"
        if key == "batch_size":
            now, what = now * dist.num_processes, "the global batch (--batch-size x processes)"
        if key in was and was[key] != now:
            shown = ["the default" if v is None else v for v in (was[key], now)]
            raise InputError(f"--resume: {ckpt_path} was written with {what} {shown[0]}, this run has "
                             f"{shown[1]}; rerun without --resume to start over")
    check_params(ckpt_path, ck["params"], params)
    try:
        with torch.no_grad():
            for p, saved in zip(params, ck["params"]):
                p.copy_(saved)
        opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):                                       # {} when no scaler ran (fp32, bf16)
            scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"--resume: {ckpt_path} does not fit this run ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    for group in opt.param_groups:                                 # the command line's, not the restored ones
        group.update(lr=args.lr, weight_decay=args.weight_decay)
    start, history = ck["step"], ck["history"]
    changed = [dict(option=f"--{k.replace('_', '-')}", was=was.get(k), now=getattr(args, k), from_step=start + 1)
               for k in RESUME_APPLIED if k in was and was[k] != getattr(args, k)]
    args.changes = list(was.get("changes") or []) + changed
    if dist.is_main_process:
        log(f"resumed from {ckpt_path} at step {start}" + "".join(
            f"; {c['option']} {c['was']} -> {c['now']} from step {c['from_step']}" for c in changed))
    return start, history


def save_state(args, done, params, opt, scaler, history):
    """OUTPUT_DIR/checkpoint.pt, written atomically by the main process: tensors and plain data only (read back with
    torch.load(weights_only=True))."""
    if PartialState().is_main_process:
        state = {"step": done, "params": [p.detach().cpu() for p in params], "optimizer": opt.state_dict(),
                 "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), "history": history, "args": vars(args)}
        atomic_write(os.path.join(args.output_dir, "checkpoint.pt"), lambda tmp: torch.save(state, tmp))
