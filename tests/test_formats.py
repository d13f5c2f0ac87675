"""The formats people hold: YOLO (Ultralytics' and Roboflow's layouts) and Pascal VOC folders, written here as
those tools write them from a synthetic COCO set, read with the same boxes and labels as the COCO original,
checked, converted to COCO (`detrax data convert`), trained and evaluated; bad labels named with file and line."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import PLAIN

from detrax import cli
from detrax.config import presets
from detrax.config.overrides import override
from detrax.data import sources
from detrax.data.coco import DataError, read_coco
from detrax.data.synthetic import write_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(str(root), num_images=12, seed=5, shape=presets.DEMO_SHAPE)
    return root


def _coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def write_yolo(synth: Path, out: Path, layout: str = "ultralytics") -> list[str]:
    """As Ultralytics' tools (`images/{split}`, `labels/{split}`, data.yaml) or Roboflow's YOLO export
    (`{split}/images`, `{split}/labels`, splits train / valid, data.yaml with nc) write it. Returns the names."""
    names = [c["name"] for c in sorted(_coco(synth, "train")["categories"], key=lambda c: c["id"])]
    for split in ("train", "val"):
        coco = _coco(synth, split)
        into = "valid" if split == "val" and layout == "roboflow" else split
        images, labels = ((out / "images" / into, out / "labels" / into) if layout == "ultralytics"
                          else (out / into / "images", out / into / "labels"))
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for im in coco["images"]:
            shutil.copy(synth / split / im["file_name"], images / im["file_name"])
            lines = []
            for a in coco["annotations"]:
                if a["image_id"] == im["id"]:
                    x, y, w, h = a["bbox"]
                    lines.append(f"{a['category_id'] - 1} {(x + w / 2) / im['width']:.6f} "
                                 f"{(y + h / 2) / im['height']:.6f} {w / im['width']:.6f} {h / im['height']:.6f}")
            if lines:  # an image without objects has no label file
                (labels / (Path(im["file_name"]).stem + ".txt")).write_text("\n".join(lines) + "\n")
    if layout == "ultralytics":
        (out / "data.yaml").write_text(f"path: {out}\ntrain: images/train\nval: images/val\nnames:\n"
                                       + "".join(f"  {i}: {n}\n" for i, n in enumerate(names)))
    else:
        (out / "data.yaml").write_text(f"train: ../train/images\nval: ../valid/images\nnc: {len(names)}\n"
                                       f"names: {json.dumps(names)}\n")
    return names


def write_voc(synth: Path, out: Path, difficult: int | None = None) -> None:
    """As LabelImg and the VOC devkit write it: integer 1-based corners, one XML per image. `difficult`: an
    annotation id marked difficult."""
    (out / "JPEGImages").mkdir(parents=True)
    (out / "Annotations").mkdir()
    (out / "ImageSets" / "Main").mkdir(parents=True)
    names = {c["id"]: c["name"] for c in _coco(synth, "train")["categories"]}
    for split in ("train", "val"):
        coco = _coco(synth, split)
        stems = []
        for im in coco["images"]:
            stem = Path(im["file_name"]).stem
            stems.append(stem)
            shutil.copy(synth / split / im["file_name"], out / "JPEGImages" / f"{stem}.jpg")
            objects = "".join(
                f"<object><name>{names[a['category_id']]}</name><pose>Unspecified</pose><truncated>0</truncated>"
                f"<difficult>{int(a['id'] == difficult)}</difficult><bndbox><xmin>{round(a['bbox'][0]) + 1}</xmin>"
                f"<ymin>{round(a['bbox'][1]) + 1}</ymin><xmax>{round(a['bbox'][0] + a['bbox'][2])}</xmax>"
                f"<ymax>{round(a['bbox'][1] + a['bbox'][3])}</ymax></bndbox></object>"
                for a in coco["annotations"] if a["image_id"] == im["id"])
            (out / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation><folder>VOC</folder><filename>{stem}.jpg</filename><size><width>{im['width']}"
                f"</width><height>{im['height']}</height><depth>3</depth></size><segmented>0</segmented>"
                f"{objects}</annotation>")
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")


def _same_objects(a, b, atol):
    """Two datasets of the same images (by file name): the same labels (through their names) and boxes."""
    stem = lambda r: os.path.splitext(os.path.basename(r["file"]))[0]
    by_name = {stem(r): r for r in b.records}
    assert len(a.records) == len(b.records) > 0
    for r in a.records:
        s = by_name[stem(r)]
        assert [a.names[k] for k in r["labels"]] == [b.names[k] for k in s["labels"]]
        np.testing.assert_allclose(r["boxes"], s["boxes"], atol=atol)


@pytest.mark.parametrize("layout", ["ultralytics", "roboflow"])
def test_a_yolo_folder_reads_as_its_coco_original_and_converts(synth, tmp_path, layout):
    yolo = tmp_path / "yolo"
    names = write_yolo(synth, yolo, layout)
    val = "val" if layout == "ultralytics" else "valid"
    assert sources.list_splits(str(yolo)) == sorted(["train", val])
    assert sources.resolve_split(str(yolo), "auto", "val") == val
    got = sources.read_split(str(yolo), val)
    assert got.names == dict(enumerate(names))  # the class indices are the category ids
    _same_objects(got, read_coco(str(synth), "val"), atol=2e-3)  # six decimals of a 160-pixel side
    assert cli.main(["data", "convert", str(yolo), str(tmp_path / "coco")]) == 0
    converted = read_coco(str(tmp_path / "coco"), val)
    _same_objects(got, converted, atol=1e-6)
    assert sources.ground_truth(got) == json.loads((tmp_path / "coco" / "annotations" /
                                                   f"instances_{val}.json").read_text())


def test_a_voc_folder_reads_as_its_coco_original_with_difficult_as_crowd(synth, tmp_path):
    voc = tmp_path / "voc"
    marked = _coco(synth, "val")["annotations"][0]
    write_voc(synth, voc, difficult=marked["id"])
    assert sources.list_splits(str(voc)) == ["train", "val"]
    got = sources.read_split(str(voc), "val")
    assert sorted(got.names.values()) == ["ellipse", "rectangle", "triangle"]  # not VOC's twenty: their names
    assert got.counts["crowd"] == 1  # the difficult object: no target, ignored by the evaluation
    want = read_coco(str(synth), "val")
    for r in want.records:
        if r["image_id"] == marked["image_id"]:
            keep = [not np.allclose(b, [marked["bbox"][0], marked["bbox"][1], marked["bbox"][0] + marked["bbox"][2],
                                        marked["bbox"][1] + marked["bbox"][3]]) for b in r["boxes"]]
            r["boxes"], r["labels"] = r["boxes"][keep], r["labels"][keep]
    _same_objects(got, want, atol=0.5)  # VOC's integer corners
    gt = sources.ground_truth(got)
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 1
    assert cli.main(["data", "convert", str(voc), str(tmp_path / "coco")]) == 0
    assert read_coco(str(tmp_path / "coco"), "val").counts == got.counts


def test_bad_labels_are_named_with_file_and_line_or_skipped_and_counted(synth, tmp_path, capsys):
    yolo = tmp_path / "yolo"
    write_yolo(synth, yolo)
    label = sorted((yolo / "labels" / "train").iterdir())[0]
    good = label.read_text().splitlines()
    for lines, message in [([good[0], "0 0.5 0.5 0.2"], r":2: 4 numbers; a YOLO line is 'class cx cy w h'"),
                           (["7 0.5 0.5 0.2 0.2"], r":1: class 7 is not one of the 3 classes \(0..2\)"),
                           (["1 0.5 x 0.2 0.2"], r":1: '1 0.5 x 0.2 0.2' is not numbers")]:
        label.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=f"{label}{message}"):
            sources.read_split(str(yolo), "train")
    skipped = sources.read_split(str(yolo), "train", skip_bad=True)
    assert [p["error"] for p in skipped.problems] == ["'1 0.5 x 0.2 0.2' is not numbers"]
    assert cli.main(["data", "check", str(yolo)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["train"]["problems"][0]["file"] == str(label)
    (yolo / "data.yaml").write_text("names: 3\n")
    with pytest.raises(DataError, match="data.yaml: 'names' must be a list of class names"):
        sources.read_split(str(yolo), "val")

    voc = tmp_path / "voc"
    write_voc(synth, voc)
    xml = sorted((voc / "Annotations").iterdir())[0]
    original = xml.read_text()
    xml.write_text(original.replace("<size>", "<sz>").replace("</size>", "</sz>"))
    split = "train" if xml.stem in (voc / "ImageSets" / "Main" / "train.txt").read_text() else "val"
    with pytest.raises(DataError, match=f"{xml}: no <size> with a positive <width> and <height>"):
        sources.read_split(str(voc), split)
    assert sources.read_split(str(voc), split, skip_bad=True).problems[0]["file"] == str(xml)
    xml.write_text(original)
    image = sorted((voc / "JPEGImages").iterdir())[-1]
    image.unlink()
    with pytest.raises(DataError, match=f"file {image} is missing"):
        for s in ("train", "val"):
            sources.read_split(str(voc), s)
    assert cli.main(["data", "convert", str(voc), str(tmp_path / "out"), "--to", "yolo"]) == 2
    assert "--to 'yolo': formats: coco" in capsys.readouterr().err


def test_a_yolo_folder_trains_and_evaluates_as_its_conversion(synth, tmp_path, capsys):
    """Two steps of the demo's model on the YOLO folder (91 classes: test_train's program, compiled once), one
    bad label line skipped (`data.skip_bad`, said), then `detrax eval` on the YOLO folder and on its COCO
    conversion: the same metrics."""
    from detrax.training.loop import Run, fit

    yolo = tmp_path / "yolo"
    write_yolo(synth, yolo)
    label = sorted((yolo / "labels" / "train").iterdir())[0]
    label.write_text(label.read_text() + "0 0.5 0.5\n")
    cfg = override(presets.get("demo"), ["train.steps=2", "train.log_every=1", "train.eval_every=0",
                                         "data.workers=0", "data.val_split=none", "model.num_classes=91",
                                         "data.skip_bad=true", *PLAIN])
    fit(cfg, Run(str(yolo), str(tmp_path / "run")))
    assert f"data.skip_bad: 1 bad labels or images of train skipped; the first: {label}" in capsys.readouterr().err
    assert cli.main(["data", "convert", str(yolo), str(tmp_path / "coco"), "--skip-bad"]) == 0
    metrics = []
    for data in (yolo, tmp_path / "coco"):
        out = tmp_path / f"eval_{data.name}"
        args = ["eval", str(tmp_path / "run"), "--data", str(data), "--split", "val", "--out", str(out)]
        assert cli.main(args) == 0, capsys.readouterr().err
        metrics.append(json.loads((out / "metrics.json").read_text()))
    assert metrics[0] == metrics[1] and "AP50" in metrics[0]
    # without --out, a run's evaluation goes to RUN/eval with its diagnostics, the per-class table on stderr; then
    # predict's --threshold auto reads the thresholds found there
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run"), "--data", str(yolo), "--split", "val"]) == 0
    assert "class" in capsys.readouterr().err
    from detrax.evaluation.diagnostics import FILES

    assert all((tmp_path / "run" / "eval" / f).is_file() for f in ("metrics.json", *FILES))
    image = next((yolo / "images" / "val").iterdir())
    assert cli.main(["predict", str(tmp_path / "run"), str(image), "--out", str(tmp_path / "pred"),
                     "--threshold", "auto"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["predict", str(tmp_path / "run"), str(image), "--threshold", "high"])
    assert "--threshold: 'high': a score (0.7) or auto" in capsys.readouterr().err
