"""ARO's VG-Attribution (Yuksekgonul et al., 2023, §3): a Visual Genome region, its two-attribute caption and the
caption with the attributes swapped (I->T, 2 texts; accuracy).

    visual_genome_attribution.json   [{image_id, image_path, bbox_x, bbox_y, bbox_w, bbox_h, true_caption,
                                       false_caption, attributes: [a, b]}, ...]
    images/<image_path>

28,748 records; the image is cropped to the box (benchmarks/aro.py `read_vg`); category "a_b" as ARO's
per-attribute records. Google Drive files, not fetched here (see HINT).
"""
from benchmarks.aro import ARO_FILES, read_vg

LAYOUT = "visual_genome_attribution.json + images/<image_path>"
HINT = f"gdown, by hand (not fetched by tools.download): {ARO_FILES}; into data/vg_attribution/ (or data/aro/)"


def attributes(rec):
    a = rec.get("attributes")
    return "_".join(map(str, a)) if isinstance(a, list) else str(a or "")


def load(root, annotations=None, split=None, seed=0):
    """visual_genome_attribution.json -> Items [region] x [true, false], category = the attribute pair. No split;
    `seed` unused."""
    return read_vg(root, annotations, "visual_genome_attribution.json", "VG-Attribution", attributes)
