r"""Segment any image with a dissected layer's units: each pixel painted with the labels of
the units that fire there (and, with --concept_vectors, with the concept vectors' masks).

  python experiments/segment.py --flagfile=experiments/configs/segment_demo.flags --image=cat.png

Uses a finished dissection (--dissection, the output_dir of experiments/dissect.py) of this
model and layer: its thresholds, tie rule and activation dtype make each unit's mask on the
image (its map upsampled to the image), its labels name them; units that pass its IoU
threshold paint (jaxdissect/segment.py). Writes segment-<image>.png (the image, the overlay
and a legend) and segment-<image>.json (every region: label, units, pixels, box) to
--output_dir.
"""

from __future__ import annotations

import os
import pathlib
import time

from absl import flags

from jaxdissect import cli

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string(
        "image", None, "The image file to segment (any format PIL reads).", flag_values=fv
    )
    cli.define_finished_dissection_flags(fv)
    flags.DEFINE_string(
        "concept_vectors",
        None,
        "Output directory of experiments/concept_vectors.py for this layer: also paint the "
        "concept vectors whose held-out IoU passes the dissection's IoU threshold.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "max_side", 512, "Paint at most this many pixels along the longer side.", flag_values=fv
    )
    flags.DEFINE_string("output_dir", "runs/segment", "Where the PNG and JSON go.", flag_values=fv)


def run(fv: flags.FlagValues = FLAGS):
    """Segment the image as the flags say; returns the regions document."""
    started = time.perf_counter()
    from jaxdissect import finished

    if not fv.image:
        raise ValueError("--image is required: the image file to segment")
    if not os.path.isfile(fv.image):
        if os.path.isdir(fv.image):
            what = "a folder, not an image file"
        elif os.path.exists(fv.image):  # reading it could block or never end
            what = "not a regular file (a FIFO, socket or device)"
        else:
            what = "no such file"
        raise FileNotFoundError(f"--image={fv.image}: {what}")
    if fv.max_side < 8:
        raise ValueError(f"--max_side={fv.max_side}: must be >= 8")
    image = _read_image(fv.image, fv.max_side)
    finished.read_layer(fv.dissection, fv.layer)  # one line now when there is none
    vectors = _read_vectors(fv.concept_vectors, fv.layer) if fv.concept_vectors else None
    out = pathlib.Path(fv.output_dir)
    with cli.claim_output_dir(out):
        doc = _segment(fv, image, vectors, out)
    print(
        f"{fv.layer}: {doc['firing_units']} labelled units fire on {fv.image}; "
        f"{len(doc['regions'])} regions -> {doc['png']}"
    )
    cli.report_elapsed(started)
    return doc


def _read_image(path: str, max_side: int):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from jaxdissect.data import images

    try:
        with Image.open(path) as im:
            rgb = images.to_rgb8(im)
    except PermissionError as e:
        raise ValueError(
            f"--image={path}: cannot be opened ({e.strerror}); check that this user may read it"
        ) from None
    # SyntaxError: PIL's for some broken files; DecompressionBombError: a header claiming
    # more pixels than PIL decodes (a crafted or damaged file).
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"--image={path}: not an image PIL can read ({e})") from None
    except images.UnsupportedImageMode as e:
        raise ValueError(f"--image={path}: {e}") from None
    h, w = rgb.shape[:2]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    return rgb


# What segmenting reads of concept_vectors.json (`json_check` schemas).
_VECTORS_SETTINGS = {
    "layer": ("text", True),
    "tie_rule": ("text", False),
    "activation_dtype": ("text", False),
    "variant": ("text", False),
}
_VECTOR_CONCEPT = {
    "name": ("text", True),
    "category": ("text", True),
    "iou": ("number", True),
    "scored": ("true or false", True),
}


def _read_vectors(directory: str, layer: str):
    """(concept_vectors.json, its arrays) in `directory`, checked as segmenting reads them."""
    import numpy as np

    from jaxdissect import json_check, store

    path = pathlib.Path(directory)
    if (
        not (path / "concept_vectors.json").is_file()
        or not (path / "concept_vectors.npz").is_file()
    ):
        raise FileNotFoundError(
            f"--concept_vectors={directory}: no concept_vectors.json/.npz there; run "
            "experiments/concept_vectors.py first"
        )
    fix = "run experiments/concept_vectors.py again"
    doc_path = path / "concept_vectors.json"
    doc = store.read_json_object(doc_path, fix, checked=True)
    json_check.check_fields(
        doc, {"settings": ("object", True), "concepts": ("list", True)}, "the file", doc_path, fix
    )
    json_check.check_fields(doc["settings"], _VECTORS_SETTINGS, "settings", doc_path, fix)
    for j, concept in enumerate(doc["concepts"]):
        json_check.check_fields(concept, _VECTOR_CONCEPT, f"concepts[{j}]", doc_path, fix)
    if doc["settings"]["layer"] != layer:
        raise ValueError(
            f"--concept_vectors={directory} holds vectors of layer {doc['settings']['layer']}, "
            f"not --layer={layer}"
        )
    arrays = store.load_arrays(path / "concept_vectors.npz")
    shapes = {k: np.shape(arrays.get(k)) for k in ("weights", "bias", "thresholds")}
    if shapes["weights"][:1] != (len(doc["concepts"]),) or shapes["bias"] != shapes["weights"][:1]:
        raise ValueError(
            f"{path / 'concept_vectors.npz'}: weights {shapes['weights']} and bias "
            f"{shapes['bias']} do not hold the {len(doc['concepts'])} concepts of "
            f"concept_vectors.json; {fix}"
        )
    # Weights over the units whose thresholds it holds (compared with the dissection's).
    if len(shapes["thresholds"]) != 1 or shapes["weights"][1:] != shapes["thresholds"]:
        raise ValueError(
            f"{path / 'concept_vectors.npz'}: weights {shapes['weights']} and thresholds "
            f"{shapes['thresholds']} are not a weight per unit and the units' thresholds; {fix}"
        )
    return doc, arrays


def _segment(fv, image, vectors, out):
    import numpy as np

    from jaxdissect import concept_vectors, finished, masks, segment, store

    loaded, layer = finished.load_dissected_layer(
        fv.model, fv.weights, fv.dissection, fv.layer, cli.model_options(fv)
    )
    acts = finished.layer_forward(loaded, layer)(image[None])
    size = image.shape[:2]
    labelled = [k for k, u in enumerate(layer.units) if u["interpretable"] and u["name"]]
    unit_masks = np.asarray(
        masks.unit_masks(acts[..., labelled], layer.thresholds[labelled], size, layer.tie_rule)
    )[0]
    painted, regions = segment.regions_of(
        unit_masks,
        [layer.units[k]["name"] for k in labelled],
        [layer.units[k]["category"] for k in labelled],
        [layer.units[k]["iou"] for k in labelled],
        units=labelled,
    )
    panels = [(f"units of {fv.layer}", painted, regions)]
    records = segment.region_records(regions, size[0] * size[1])
    if vectors is not None:
        doc, arrays = vectors
        trained = doc["settings"]
        if not np.array_equal(arrays["thresholds"], layer.thresholds):
            raise ValueError(
                f"--concept_vectors={fv.concept_vectors} was trained on other thresholds than "
                f"--dissection={fv.dissection}'s: train them on this dissection"
            )
        for name, mine in (
            ("tie_rule", layer.tie_rule),
            ("activation_dtype", layer.activation_dtype),
        ):
            if trained.get(name) != mine:
                raise ValueError(
                    f"--concept_vectors={fv.concept_vectors} was trained with {name} "
                    f"{trained.get(name)!r}, --dissection={fv.dissection} has {mine!r}: train "
                    "them on this dissection"
                )
        keep = [
            j
            for j, c in enumerate(doc["concepts"])
            if c["scored"] and c["iou"] > layer.iou_threshold
        ]
        predicted = concept_vectors.predict(
            acts,
            layer.thresholds,
            size,
            arrays["weights"][keep],
            arrays["bias"][keep],
            variant=trained.get("variant", "binary"),
            tie_rule=layer.tie_rule,
        )[0]
        v_painted, v_regions = segment.regions_of(
            np.asarray(predicted),
            [doc["concepts"][j]["name"] for j in keep],
            [doc["concepts"][j]["category"] for j in keep],
            [doc["concepts"][j]["iou"] for j in keep],
            source="vector",
        )
        panels.append((f"concept vectors of {fv.layer}", v_painted, v_regions))
        records += segment.region_records(v_regions, size[0] * size[1])
    stem = f"segment-{pathlib.Path(fv.image).stem}"
    png = out / f"{stem}.png"
    store.write_bytes(png, segment.figure_png(image, panels))
    result = {
        "image": fv.image,
        "size": list(size),
        "dissection": fv.dissection,
        "layer": layer.layer,
        "model": layer.model,
        "iou_threshold": layer.iou_threshold,
        "labelled_units": len(labelled),
        "firing_units": int(unit_masks.any((0, 1)).sum()),
        "concept_vectors": fv.concept_vectors,
        "png": str(png),
        "regions": records,
    }
    store.write_json(out / f"{stem}.json", result)
    return result


main = cli.script_main(run)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
