"""Preprocessing and labelled-folder readers on real images and on folders the tests lay out."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.data.datasets import open_labelled
from serving.errors import RtqError
from serving.models.preprocessing import MAX_IMAGE_PIXELS, load_image, preprocess, resize_crop
from serving.models.zoo import IMAGENETTE_WNIDS, class_wnids, get_spec

PP = get_spec("efficientnet_lite0").preprocessing


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_preprocess_is_the_same_from_path_and_bytes(data_root: Path):
    path = sorted((data_root / "imagenet-val").glob("*.JPEG"))[0]
    a = preprocess(path, PP)
    b = preprocess(path.read_bytes(), PP)
    assert a.shape == (3, 224, 224) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    # Lite0 normalises (x - 127) / 128 on 0-255 pixels: values stay inside that range.
    assert a.min() >= -127 / 128 - 1e-6 and a.max() <= 128 / 128 + 1e-6


def test_resize_keeps_aspect_and_centre_crops():
    img = Image.new("RGB", (400, 200), (10, 20, 30))
    out = resize_crop(img, PP)
    assert out.shape == (3, 224, 224) and out.dtype == np.uint8
    assert tuple(out[:, 112, 112]) == (10, 20, 30)


def test_grayscale_and_cmyk_convert_but_16_bit_is_refused():
    assert load_image(_png(Image.new("L", (32, 32), 7))).mode == "RGB"
    buf = io.BytesIO()
    Image.new("CMYK", (32, 32)).save(buf, format="JPEG")
    assert load_image(buf.getvalue()).mode == "RGB"
    with pytest.raises(RtqError, match="pixel mode 'I;16'"):
        load_image(_png(Image.new("I;16", (32, 32))), name="depth.png")


def test_corrupt_empty_and_huge_images_are_refused():
    with pytest.raises(RtqError, match="cannot decode image"):
        load_image(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(RtqError, match="cannot decode image"):
        load_image(b"")
    side = int(MAX_IMAGE_PIXELS**0.5) + 100
    with pytest.raises(RtqError, match="at most"):
        load_image(_png(Image.new("1", (side, side))))


def _lay_out_csv_folder(root: Path, src: Path, n: int = 3) -> list[str]:
    root.mkdir()
    files = sorted(src.glob("*.JPEG"))[:n]
    rows = ["file,wnid,index"]
    for i, f in enumerate(files):
        shutil.copy(f, root / f.name)
        rows.append(f"{f.name},{class_wnids('imagenet-1k')[i]},{i}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return [f.name for f in files]


def test_three_layouts_are_read(tmp_path: Path, data_root: Path):
    names = _lay_out_csv_folder(tmp_path / "csv", data_root / "imagenet-val")
    s = open_labelled(tmp_path / "csv")
    assert [it.path.name for it in s.items] == names

    loc = tmp_path / "loc"
    loc.mkdir()
    for n in names:
        shutil.copy(tmp_path / "csv" / n, loc / n)
    (loc / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{Path(n).stem},n01440764 1 2 3 4\n" for n in names)
    )
    s = open_labelled(loc)
    assert len(s) == 3 and {it.wnid for it in s.items} == {"n01440764"}

    tree = open_labelled(data_root / "imagenette" / "val")
    assert {it.wnid for it in tree.items} == set(IMAGENETTE_WNIDS)


def test_labels_match_models_by_wnid(data_root: Path):
    val = open_labelled("imagenet-val", data_root)
    assert len(val) == 1300
    ten, labels = val.for_classes(IMAGENETTE_WNIDS)
    assert 0 < len(ten) < len(val)
    assert all(IMAGENETTE_WNIDS[lab] == it.wnid for lab, it in zip(labels, ten.items, strict=True))
    full, labels = val.for_classes(class_wnids("imagenet-1k"))
    assert len(full) == 1300 and labels.max() < 1000


def test_bad_folders_give_clear_errors(tmp_path: Path, data_root: Path):
    with pytest.raises(RtqError, match="not found.*RTQ_DATA_ROOT"):
        open_labelled(tmp_path / "nowhere", data_root)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "labels.csv").write_text("file,wnid,index\n")
    with pytest.raises(RtqError, match="holds no labelled images"):
        open_labelled(tmp_path / "empty")
    (tmp_path / "badcsv").mkdir()
    (tmp_path / "badcsv" / "labels.csv").write_text("name,label\na.jpg,3\n")
    with pytest.raises(RtqError, match="expected a header with file,wnid"):
        open_labelled(tmp_path / "badcsv")
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "labels.csv").write_text("file,wnid\nx.JPEG,n01440764\n")
    with pytest.raises(RtqError, match="1 images listed .* are missing"):
        open_labelled(tmp_path / "gone")
    with pytest.raises(RtqError, match="pass .*val instead"):
        open_labelled(data_root / "imagenette")
