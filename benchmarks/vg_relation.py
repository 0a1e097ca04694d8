"""ARO's VG-Relation (Yuksekgonul et al., 2023, §3): a Visual Genome region, its relation caption and the caption with
subject and object swapped (I->T, 2 texts; accuracy, and the macro accuracy over relations as ARO reports it).

    visual_genome_relation.json   [{image_id, image_path, bbox_x, bbox_y, bbox_w, bbox_h, true_caption,
                                    false_caption, relation_name}, ...]
    images/<image_path>

23,937 records; the image is cropped to the box, as ARO's loader does (benchmarks/aro.py `read_vg`).
Both files and the image zip are on Google Drive (ARO's gdown ids); not fetched here.
"""
from benchmarks.aro import ARO_FILES, read_vg

LAYOUT = "visual_genome_relation.json + images/<image_path>"
HINT = f"gdown, by hand (not fetched by tools.download): {ARO_FILES}; into data/vg_relation/ (or data/aro/)"


def load(root, annotations=None, split=None, seed=0):
    """visual_genome_relation.json -> Items [region] x [true, false], category = relation_name. No split; `seed`
    unused."""
    return read_vg(root, annotations, "visual_genome_relation.json", "VG-Relation",
                   lambda rec: str(rec.get("relation_name", "")))
