"""The shapes world in every suite task's published format: offline instances of GDBench and the compositional suite.

Each writer draws scenes of benchmarks/shapes.py (two coloured shapes in a spatial relation) and writes them exactly
as a publisher ships its task, so the task's own loader reads them: retrieval over 10 images and over 10 captions
(DiffusionITM's top-10 JSON), 2-way region captions (ARO's VG files), 5-way order sets with the four perturbations
(the Karpathy JSON, tagged by the world's own lexicon: no spaCy needed), near-identical image sets (ImageCoDe),
subject / verb / object negatives (SVO-Probes' CSV), binding / recognition / spatial subtasks (CLEVR's caption
files), N-way classification by file name (Oxford Pets), two image groups against two phrase lists (MMBias),
add / replace / swap negatives (SugarCrepe), swapped-word pairs (Winoground), attribute / object / relation
negatives (VL-CheckList), subject / object / relation negatives (ComVG). A writer returns the loader options
its instance needs (e.g. the lexicon tagger); `write(writer, out)` writes on first use only.

    options = write(top10_images, "data/embedded_gdbench/flickr30k")     # then flickr30k.load(that folder, **options)
"""
import csv
import json
import os
import random

from benchmarks import shapes
from common import InputError, atomic_write

SIZE = 32
LEXICON = {**{c: "JJ" for c in shapes.COLORS}, **{s: "NN" for s in shapes.SHAPES}, "a": "DT", "of": "IN",
           "left": "RB", "right": "RB", "above": "IN", "below": "IN", "and": "CC"}


def tag(text):
    """The world's part-of-speech tagger (text -> [(token, Penn tag)]): colours JJ, shapes NN, as spaCy tags them."""
    return [(w, LEXICON.get(w.lower(), "NN")) for w in text.replace(".", " .").split()]


def write_text(path, text):
    """text -> path, atomically (a world cut short is written again on its next use)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write(writer, out, seed=0):
    """Write `writer`'s instance into `out` unless its marker says it is there; returns the loader options."""
    marker = os.path.join(out, ".embedded.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            return {k: tag if v == "tag" else v for k, v in json.load(f).items()}
    try:
        os.makedirs(out, exist_ok=True)
        options = writer(out, random.Random(seed)) or {}
    except OSError as e:
        raise InputError(f"cannot write the embedded world to {out}: {e.strerror or e}") from None
    write_text(marker, json.dumps({k: "tag" if v is tag else v for k, v in options.items()}))
    return options


# ---- drawing ----------------------------------------------------------------------------------------------------

def objs():
    return shapes.objects()


def scene(rng):
    return shapes.sample_scene(rng, objs())


def image(out, rel, sc, rng):
    """Render scene `sc` to out/rel (JPEG or PNG by extension); returns rel."""
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = shapes.render(sc, rng, SIZE)
    if rel.endswith(".png"):
        img.save(path)
    else:
        shapes.save_jpeg(img, path)
    return rel


def swapped(sc):
    """Subject and object exchanged: the same words in another order (Winoground's, ARO VG-Relation's negative)."""
    return (sc[2], sc[1], sc[0])


def colours_swapped(sc):
    (c1, s1), (c2, s2) = sc[0].split(), sc[2].split()
    return (f"{c2} {s1}", sc[1], f"{c1} {s2}")


def both(sc):
    return f"a {sc[0]} and a {sc[2]}"


# scenes whose objects differ in colour and in shape, a scene and its mirror counted once
MAX_SCENES = len(shapes.COLORS) * len(shapes.SHAPES) * (len(shapes.COLORS) - 1) * (len(shapes.SHAPES) - 1) * len(
    shapes.RELATIONS) // 2


def distinct_scenes(rng, n):
    """n scenes, no two the same picture (a scene and its mirror, 'a B right of a A', are one); the two objects of
    each differ in colour and in shape, so a colour or shape swap is always false. More than the world has (144) is
    an InputError."""
    if n > MAX_SCENES:
        raise InputError(f"the shapes world has {MAX_SCENES} distinct two-object scenes, {n} were asked for (10 per "
                         "Flickr30K image-retrieval item: at most 14 items)")
    out, seen = [], set()
    while len(out) < n:
        sc = scene(rng)
        (c1, s1), (c2, s2) = sc[0].split(), sc[2].split()
        if c1 == c2 or s1 == s2 or shapes.caption(sc) in seen:
            continue
        seen.update({shapes.caption(sc), shapes.caption((sc[2], shapes.INVERSE[sc[1]], sc[0]))})
        out.append(sc)
    return out


def dump(out, name, data):
    write_text(os.path.join(out, name), json.dumps(data, indent=1))


# ---- one writer per published format ------------------------------------------------------------------------------

def top10_images(out, rng, n=5):
    """DiffusionITM's val_top10_RN50x64.json: {caption: [10 image paths]}, the true image first."""
    data = {}
    for q, scenes in enumerate(distinct_scenes(rng, 10 * n)[k:k + 10] for k in range(0, 10 * n, 10)):
        data[shapes.caption(scenes[0])] = ["datasets/flickr30k/" + image(out, f"images/{q * 10 + j}.jpg", sc, rng)
                                           for j, sc in enumerate(scenes)]
    dump(out, "val_top10_RN50x64.json", data)
    return {"every": 1}


def top10_texts(out, rng, n=5):
    """DiffusionITM's val_top10_RN50x64_text.json: {image path: [10 captions]}, the true caption first."""
    data = {}
    for q in range(n):
        scenes = distinct_scenes(rng, 10)
        rel = image(out, f"images/{q}.jpg", scenes[0], rng)
        data["datasets/flickr30k/" + rel] = [shapes.caption(sc) for sc in scenes]
    dump(out, "val_top10_RN50x64_text.json", data)


def winoground_pairs(out, rng, n=6):
    """Winoground's examples.jsonl + images/<image>.png: caption_1 has caption_0's words with subject and object
    exchanged, image_1 shows it."""
    lines = []
    for k, sc in enumerate(distinct_scenes(rng, n)):
        for j, s in enumerate((sc, swapped(sc))):
            image(out, f"images/ex_{k}_img_{j}.png", s, rng)
        lines.append(json.dumps(dict(id=k, image_0=f"ex_{k}_img_0", image_1=f"ex_{k}_img_1",
                                     caption_0=shapes.caption(sc), caption_1=shapes.caption(swapped(sc)),
                                     tag="Noun", secondary_tag="", num_main_preds=1, collapsed_tag="Object")))
    write_text(os.path.join(out, "examples.jsonl"), "\n".join(lines) + "\n")


def _vg(out, rng, n, name, negative, extra):
    recs = []
    for k, sc in enumerate(distinct_scenes(rng, n)):
        rel = image(out, f"images/{k}.jpg", sc, rng)
        recs.append(dict(image_id=k, image_path=os.path.basename(rel), bbox_x=0, bbox_y=0, bbox_w=SIZE, bbox_h=SIZE,
                         **negative(sc), **extra(sc)))
    dump(out, name, recs)


def aro_relation(out, rng, n=8):
    """ARO's visual_genome_relation.json: the relation caption and its subject / object swap, box = whole image."""
    _vg(out, rng, n, "visual_genome_relation.json",
        lambda sc: dict(true_caption=shapes.caption(sc), false_caption=shapes.caption(swapped(sc))),
        lambda sc: dict(relation_name=sc[1]))


def aro_attribution(out, rng, n=8):
    """ARO's visual_genome_attribution.json: "a red circle and a blue square" against the colours swapped."""
    _vg(out, rng, n, "visual_genome_attribution.json",
        lambda sc: dict(true_caption=both(sc), false_caption=both(colours_swapped(sc))),
        lambda sc: dict(attributes=[sc[0].split()[0], sc[2].split()[0]]))


def _karpathy(out, rng, n, name, folder):
    recs = [dict(image=image(out, f"{folder}/{k}.jpg", sc, rng), caption=[shapes.caption(sc) + "."], image_id=k)
            for k, sc in enumerate(distinct_scenes(rng, n))]
    dump(out, name, recs)
    return {"tagger": tag}


def coco_karpathy(out, rng, n=6):
    """BLIP's coco_karpathy_test.json (ARO's COCO-Order): [{image: val2014/..., caption: [...]}]."""
    return _karpathy(out, rng, n, "coco_karpathy_test.json", "val2014")


def flickr_karpathy(out, rng, n=6):
    """BLIP's flickr30k_val.json (ARO's Flickr30k-Order): [{image: flickr30k-images/..., caption: [...]}]."""
    return _karpathy(out, rng, n, "flickr30k_val.json", "flickr30k-images")


def image_sets(out, rng, n=3):
    """ImageCoDe's valid_data.json {set: {target index: description}} + image-sets/<set>/img<k>.jpg: 10 scenes of
    the same two objects; the 9 others show another relation (never the target's, nor its mirror)."""
    data = {}
    for k, (subj, rel, obj) in enumerate(distinct_scenes(rng, n)):
        name, target = f"open-images-shapes_{k}", rng.randrange(10)
        others = [(subj, r, obj) for r in shapes.RELATIONS if r != rel] + \
                 [(obj, r, subj) for r in shapes.RELATIONS if r != shapes.INVERSE[rel]]
        for j in range(10):
            image(out, f"image-sets/{name}/img{j}.jpg", (subj, rel, obj) if j == target else rng.choice(others), rng)
        data[name] = {str(target): shapes.caption((subj, rel, obj))}
    dump(out, "valid_data.json", data)


def svo_csv(out, rng, n=4):
    """SVO-Probes' svo_probes.csv + images/<id>.jpg: the negative image changes the subject, the relation (verb) or
    the object."""
    rows, objects, nid = [], objs(), 0
    for slot, col in (("subject", "subj_neg"), ("verb", "verb_neg"), ("object", "obj_neg")):
        for _ in range(n):
            pos = scene(rng)
            neg = shapes.negative(pos, slot, rng, objects)
            for sc in (pos, neg):
                image(out, f"images/{nid}.jpg", sc, rng)
                nid += 1
            flags = {c: str(c == col) for c in ("subj_neg", "verb_neg", "obj_neg")}
            rows.append(dict(sentence=shapes.caption(pos), pos_triplet=",".join(pos), neg_triplet=",".join(neg),
                             **flags, pos_image_id=nid - 2, neg_image_id=nid - 1, pos_url="", neg_url=""))

    def write_rows(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    atomic_write(os.path.join(out, "svo_probes.csv"), write_rows)


def clevr_captions(out, rng, n=2):
    """CLEVR's captions/<subtask>.json {image: [[true, false], ...]} for the subtasks the world can draw: colour
    binding (pair_binding_color, binding_color_shape), recognition (colour, shape) and spatial."""
    colours, forms = list(shapes.COLORS), list(shapes.SHAPES)
    tasks = {
        "pair_binding_color": lambda sc: [both(sc), both(colours_swapped(sc))],
        "binding_color_shape": lambda sc: [f"a {sc[0]}", f"a {sc[2].split()[0]} {sc[0].split()[1]}"],
        "recognition_color": lambda sc: [f"a {sc[0]}", "a {} {}".format(
            next(c for c in colours if c not in (sc[0].split()[0], sc[2].split()[0])), sc[0].split()[1])],
        "recognition_shape": lambda sc: [f"a {sc[0]}", "a {} {}".format(sc[0].split()[0], next(
            f for f in forms if f not in (sc[0].split()[1], sc[2].split()[1])))],
        "spatial": lambda sc: [shapes.caption(sc), shapes.caption((sc[0], shapes.INVERSE[sc[1]], sc[2]))],
    }
    scenes = distinct_scenes(rng, n * len(tasks))
    os.makedirs(os.path.join(out, "captions"), exist_ok=True)
    for t, (task, pair) in enumerate(tasks.items()):
        data = {}
        for sc in scenes[t * n:(t + 1) * n]:
            data[image(out, f"images/{task}_{len(data)}.png", sc, rng).split("/", 1)[1]] = [pair(sc)]
        dump(out, f"captions/{task}.json", data)


def pets_folder(out, rng, n=1):
    """Oxford Pets' images/<Class_name>_<k>.jpg: six classes (two colours x three shapes), a lone shape each."""
    for c in ("red", "blue"):
        for s in shapes.SHAPES:
            for k in range(1, n + 1):
                other = rng.choice([o for o in objs() if o.split()[1] != s and o.split()[0] in ("green", "yellow")])
                image(out, f"images/{c}_{s}_{k}.jpg", (f"{c} {s}", rng.choice(shapes.RELATIONS), other), rng)
    return {"template": "a {}"}


def bias_groups(out, rng, n=4):
    """MMBias' Images/<Category>/<Group>/*.jpg + textual_phrases.txt: blue and red scenes against phrases naming
    blue ("pleasant") and red ("unpleasant") shapes: a scorer that sees colour gives Blue-Red a large positive d."""
    for group, colour in (("Blue", "blue"), ("Red", "red")):
        for k in range(n):
            s1, s2 = rng.sample(shapes.SHAPES, 2)
            image(out, f"Images/Colour/{group}/{k}.jpg", (f"{colour} {s1}", rng.choice(shapes.RELATIONS),
                                                          f"{colour} {s2}"), rng)
    phrases = {f"{kind}_phrases": [f"a {colour} {s}" for s in shapes.SHAPES]
               for kind, colour in (("pleasant", "blue"), ("unpleasant", "red"))}
    write_text(os.path.join(out, "textual_phrases.txt"), json.dumps(phrases))


def recolour(sc):
    """The scene (subject, relation, object) with the subject's colour replaced by one neither object has."""
    c, s = sc[0].split()
    return (f"{next(x for x in shapes.COLORS if x not in (c, sc[2].split()[0]))} {s}", sc[1], sc[2])


def reshape(sc):
    """The scene with the subject's shape replaced by one neither object has."""
    c, s = sc[0].split()
    return (f"{c} {next(x for x in shapes.SHAPES if x not in (s, sc[2].split()[1]))}", sc[1], sc[2])


def sugarcrepe_files(out, rng, n=3):
    """SugarCrepe's replace_* and swap_* files {key: {filename, caption, negative_caption}} + val2017/<filename>."""
    kinds = {"replace_att": recolour, "replace_obj": reshape,
             "replace_rel": lambda sc: (sc[0], shapes.INVERSE[sc[1]], sc[2]), "swap_att": colours_swapped,
             "swap_obj": swapped}
    for kind, neg in kinds.items():
        data = {}
        for k, sc in enumerate(distinct_scenes(rng, n)):
            name = image(out, f"val2017/{kind}_{k}.jpg", sc, rng).split("/", 1)[1]
            data[str(k)] = dict(filename=name, caption=shapes.caption(sc), negative_caption=shapes.caption(neg(sc)))
        dump(out, f"{kind}.json", data)


def checklist_files(out, rng, n=3):
    """VL-CheckList's data/{Attribute,Object,Relation}/vg/<file>.json [[image, {"POS": [...], "NEG": [...]}]] with
    the images under vg/: a colour, a shape and a relation replaced."""
    kinds = {"Attribute/vg/color": recolour, "Object/vg/shape": reshape,
             "Relation/vg/spatial": lambda sc: (sc[0], shapes.INVERSE[sc[1]], sc[2])}
    for kind, neg in kinds.items():
        recs = []
        for k, sc in enumerate(distinct_scenes(rng, n)):
            rel = image(out, f"vg/{kind.split('/')[0].lower()}_{k}.jpg", sc, rng).split("/", 1)[1]
            recs.append([rel, {"POS": [shapes.caption(sc)], "NEG": [shapes.caption(neg(sc))]}])
        dump(out, f"data/{kind}.json", recs)


def comvg_csv(out, rng, n=3):
    """ComVG's CSV, as the shapes data set writes it (benchmarks/shapes.py)."""
    shapes.write_comvg(out, n=n, seed=rng.randrange(1 << 30))
