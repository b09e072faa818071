"""Research data: the shapes dataset, data resolution and the same-images check."""

import hashlib
from pathlib import Path

import pytest
import yaml

from yolo_convplug.research import data as data_mod
from yolo_convplug.research.data import CLASSES, ShapesSpec, make_shapes, resolve_data, same_images

TINY = "shapes:train=16,val=8,imgsz=64"


def _digest(folder: Path) -> dict:
    """Relative path -> sha256 of every file, with the folder's own absolute path masked in data.yaml."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            content = f.read_bytes().replace(str(folder).encode(), b"<root>")
            out[str(f.relative_to(folder))] = hashlib.sha256(content).hexdigest()
    return out


def test_shapes_byte_identical_and_valid(tmp_path):
    a = make_shapes(TINY, root=tmp_path / "a")
    b = make_shapes(TINY, root=tmp_path / "b")
    da, db = _digest(a.parent), _digest(b.parent)
    assert len([k for k in da if k.endswith(".png")]) == 24
    assert da == db
    assert _digest(make_shapes(ShapesSpec(train=16, val=8, imgsz=64, seed=1), root=tmp_path / "a").parent) != da

    cfg = yaml.safe_load(a.read_text())
    assert Path(cfg["path"]) == a.parent and cfg["names"] == dict(enumerate(CLASSES))
    n_objects = 0
    for label in (a.parent / "labels").rglob("*.txt"):
        for line in label.read_text().splitlines():
            c, *box = line.split()
            assert 0 <= int(c) < len(CLASSES) and all(0 < float(v) <= 1 for v in box)
            n_objects += 1
    assert n_objects >= 24  # at least one object per image

    mtime = (a.parent / "images" / "train" / "00000.png").stat().st_mtime_ns
    make_shapes(TINY, root=tmp_path / "a")  # complete: reused, not regenerated
    assert (a.parent / "images" / "train" / "00000.png").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("bad", ["shape", "shapes:train=x", "shapes:foo=3", "shapes:imgsz=8"])
def test_shapes_spec_errors(bad):
    with pytest.raises(ValueError, match="shapes"):
        ShapesSpec.parse(bad)


def test_resolve_data_precedence(monkeypatch, tmp_path, capsys):
    local = tmp_path / "coco128.yaml"
    local.write_text("train: images\nval: images\nnames: {0: person}\n")
    made = []
    monkeypatch.setattr(data_mod, "make_shapes", lambda spec: made.append(spec) or tmp_path / "shapes.yaml")
    monkeypatch.setattr(data_mod, "_local_coco128", lambda: None)

    monkeypatch.setenv("CONVPLUG_COCO128", str(local))
    assert resolve_data("my.yaml") == "my.yaml"  # explicit beats the environment
    assert resolve_data() == str(local.resolve())  # environment beats the default
    monkeypatch.setenv("CONVPLUG_COCO128", str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match="CONVPLUG_COCO128"):
        resolve_data()

    monkeypatch.delenv("CONVPLUG_COCO128")
    monkeypatch.setattr(data_mod, "is_online", lambda: True)
    assert resolve_data() == "coco128.yaml"  # Ultralytics downloads it
    monkeypatch.setattr(data_mod, "is_online", lambda: False)
    assert resolve_data() == str(tmp_path / "shapes.yaml")
    assert made == ["shapes"]
    assert "offline" in capsys.readouterr().out
    assert resolve_data("shapes:train=4") == str(tmp_path / "shapes.yaml") and made[-1] == "shapes:train=4"


def test_same_images(tmp_path, coco128):
    assert same_images(coco128) is True  # COCO128's convention: val = train
    assert same_images(make_shapes(TINY, root=tmp_path)) is False  # shapes has its own validation images
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    lists = tmp_path / "lists.yaml"  # the same folder spelled two ways, and a list of folders
    lists.write_text(f"path: {tmp_path}\ntrain: [imgs/a, imgs/b]\nval: ./imgs/../imgs/a\nnames: {{0: x}}\n")
    assert same_images(lists) is True
    assert same_images(tmp_path / "missing.yaml") is None
