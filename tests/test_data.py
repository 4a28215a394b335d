"""CIFAR-10 ingest: find/fetch sources, safe readers, stratified prepare, verified loading."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers_data as h
from matekd.data import fetch as fetching
from matekd.data import prepared, sources
from matekd.data.prepare import stratified_split
from matekd.errors import DataError, ParamsError
from matekd.stages.prepare import run_prepare
from matekd.storage import sha256_array

torch.set_num_threads(1)

MIRROR = Path("/work/shared/data/cifar10-jpeg.tar.gz")


@pytest.fixture
def skip_md5(monkeypatch):
    monkeypatch.setenv("MATEKD_SKIP_MD5", "1")


@pytest.fixture(autouse=True)
def _no_env_source(monkeypatch):
    monkeypatch.delenv("MATEKD_CIFAR10", raising=False)


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporary entries a failed or finished stage must not leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------
# Readers


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_canonical_archive_reads_exact_images_and_labels(tmp_path, skip_md5, style):
    archive = tmp_path / "cifar-10-python.tar.gz"
    train_x, train_y, test_x, test_y = h.write_canonical(archive, 3, 2, style=style)
    assert sources.find_source(tmp_path) == ("cifar10-python", archive)
    raw = sources.read_source(*sources.find_source(tmp_path))
    assert raw.train_images.shape == (30, 32, 32, 3) and raw.train_images.dtype == np.uint8
    assert raw.test_images.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(raw.train_images, train_x)
    np.testing.assert_array_equal(raw.train_labels, train_y)
    np.testing.assert_array_equal(raw.test_images, test_x)
    np.testing.assert_array_equal(raw.test_labels, test_y)
    # The class code in the pixels agrees with the labels: channel order survived.
    np.testing.assert_array_equal(h.label_from_image(raw.train_images), raw.train_labels)


def test_canonical_folder_and_renamed_archive(tmp_path, skip_md5):
    folder = tmp_path / "a" / "cifar-10-batches-py"
    truth = h.write_canonical(folder, 2, 1, as_dir=True)
    assert sources.find_source(folder.parent) == ("cifar10-python", folder)
    raw = sources.read_source(*sources.find_source(folder.parent))
    np.testing.assert_array_equal(raw.train_images, truth[0])
    np.testing.assert_array_equal(raw.test_labels, truth[3])
    renamed = tmp_path / "b" / "my-cifar.tgz"
    renamed.parent.mkdir()
    h.write_canonical(renamed, 2, 1)
    assert sources.find_source(renamed.parent) == ("cifar10-python", renamed)
    np.testing.assert_array_equal(sources.read_source("cifar10-python", renamed).train_labels, truth[1])


def test_canonical_md5_mismatch_names_file_and_both_hashes(tmp_path, monkeypatch):
    monkeypatch.delenv("MATEKD_SKIP_MD5", raising=False)
    archive = tmp_path / "cifar-10-python.tar.gz"
    h.write_canonical(archive, 1, 1)
    actual = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="md5 mismatch") as err:
        sources.read_source("cifar10-python", archive)
    message = str(err.value)
    assert str(archive) in message and "c58f30108f718f92721af3b95e74349a" in message and actual in message


def test_canonical_folder_batches_checked_against_published_md5(tmp_path, monkeypatch):
    monkeypatch.delenv("MATEKD_SKIP_MD5", raising=False)
    folder = tmp_path / "cifar-10-batches-py"
    h.write_canonical(folder, 1, 1, as_dir=True)
    with pytest.raises(DataError, match="md5 mismatch.*data_batch_1.*c99cafc152244af753f735de768cd75f"):
        sources.read_source("cifar10-python", folder)


@pytest.mark.parametrize("fmt,top", [("jpg", None), ("png", "cifar10")])
def test_image_folder_archive(tmp_path, fmt, top):
    archive = tmp_path / "mirror.tar.gz"
    train_x, train_y, test_x, test_y = h.write_image_folder(archive, 3, 2, fmt=fmt, top=top,
                                                            extra={"README.txt": b"not an image"})
    assert sources.find_source(tmp_path) == ("image-folder", archive)
    raw = sources.read_source("image-folder", archive)
    assert raw.train_images.shape == (30, 32, 32, 3) and raw.test_images.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(raw.train_labels, train_y)
    np.testing.assert_array_equal(raw.test_labels, test_y)
    if fmt == "png":  # lossless: exact
        np.testing.assert_array_equal(raw.train_images, train_x)
        np.testing.assert_array_equal(raw.test_images, test_x)
        assert not raw.lossy
    else:
        diff = np.abs(raw.train_images.astype(int) - train_x).max()
        assert diff <= h.JPEG_TOLERANCE
        assert np.abs(raw.test_images.astype(int) - test_x).max() <= h.JPEG_TOLERANCE
        assert raw.lossy


def test_image_folder_directory_and_plain_tar(tmp_path):
    folder = tmp_path / "d"
    truth = h.write_image_folder(folder, 2, 1, fmt="png", as_dir=True)
    assert sources.find_source(folder) == ("image-folder", folder)
    raw = sources.read_source("image-folder", folder)
    np.testing.assert_array_equal(raw.train_images, truth[0])
    np.testing.assert_array_equal(raw.test_labels, truth[3])
    plain = tmp_path / "t" / "cifar.tar"
    plain.parent.mkdir()
    h.write_image_folder(plain, 2, 1, fmt="png")
    np.testing.assert_array_equal(sources.read_source(*sources.find_source(plain.parent)).train_images, truth[0])


def test_image_folder_order_is_deterministic_not_archive_order(tmp_path):
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    h.write_image_folder(a, 2, 1, fmt="png", shuffle_members=True)
    h.write_image_folder(b, 2, 1, fmt="png", shuffle_members=False)
    ra, rb = sources.read_source("image-folder", a), sources.read_source("image-folder", b)
    np.testing.assert_array_equal(ra.train_images, rb.train_images)
    np.testing.assert_array_equal(ra.test_images, rb.test_images)


# ----------------------------------------------------------------------------------------
# Bad inputs


def test_no_source_lists_places_and_remedies(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError) as err:
        sources.find_source(tmp_path / "data")
    message = str(err.value)
    for place in ("cifar-10-python.tar.gz", "cifar-10-batches-py", "*.tar.gz", "*.tgz", "*.tar", "train/", "test/"):
        assert place in message
    assert "MATEKD_CIFAR10=" in message and "--download" in message and "dvc add data" in message
    with pytest.raises(DataError, match="no CIFAR-10 source found"):
        sources.find_source(tmp_path / "missing")


@pytest.mark.parametrize("kind", ["canonical", "folder"])
def test_truncated_archive_fails_cleanly(tmp_path, monkeypatch, skip_md5, kind):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    if kind == "canonical":
        archive = tmp_path / "data" / "cifar-10-python.tar.gz"
        h.write_canonical(archive, 2, 1)
    else:
        archive = tmp_path / "data" / "mirror.tar.gz"
        h.write_image_folder(archive, 2, 1, fmt="png")
    h.truncate_half(archive)
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        run_prepare(h.make_params())
    assert str(Path("data") / archive.name) in str(err.value)
    assert not (tmp_path / "prepared").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("cut", [0.5, 0.37, 0.81, 0.999])
def test_truncated_plain_tar_detected(tmp_path, cut):
    plain = tmp_path / "cifar.tar"
    h.write_image_folder(plain, 2, 1, fmt="png")
    import tarfile

    with tarfile.open(plain) as tar:
        last = tar.getmembers()[-1]
    content_end = last.offset_data + last.size  # beyond it only the zero end-of-archive padding
    blob = plain.read_bytes()
    plain.write_bytes(blob[:int(content_end * cut)])  # at a header, in a header, in member data
    with pytest.raises(DataError, match="is truncated") as err:
        sources.read_source("image-folder", plain)
    assert str(plain) in str(err.value)


def test_missing_class_folder_is_named(tmp_path):
    archive = tmp_path / "m.tar.gz"
    h.write_image_folder(archive, 2, 1, drop=("test/horse/",))
    with pytest.raises(DataError, match="missing class folder.*test/horse"):
        sources.read_source("image-folder", archive)


def test_unknown_class_folder_refused(tmp_path):
    archive = tmp_path / "m.tar.gz"
    png = h.encode_image(np.zeros((32, 32, 3), np.uint8), "png")
    h.write_image_folder(archive, 1, 1, fmt="png", extra={"train/unicorn/0000.png": png})
    with pytest.raises(DataError, match="unexpected class folder train/unicorn"):
        sources.read_source("image-folder", archive)


@pytest.mark.parametrize("name,blob,pattern", [
    ("train/cat/big.png", h.encode_image(np.zeros((33, 32, 3), np.uint8), "png"), "32x33"),
    ("train/cat/big.jpg", h.encode_image(np.zeros((32, 64, 3), np.uint8), "jpg"), "64x32"),
    ("train/cat/alpha.png", h.encode_image(np.zeros((32, 32, 3), np.uint8), "png", mode="RGBA"), "RGBA"),
    ("test/dog/gray.jpg", h.encode_image(np.zeros((32, 32, 3), np.uint8), "jpg", mode="L"), "grayscale"),
    ("test/dog/gray.png", h.encode_image(np.zeros((32, 32, 3), np.uint8), "png", mode="L"), " L;"),
    ("test/dog/broken.jpg", h.encode_image(np.full((32, 32, 3), 9, np.uint8), "jpg")[:200], "cannot be decoded"),
    ("test/dog/notes.jpg", b"hello", "neither a JPEG nor a PNG"),
])
def test_bad_images_are_named(tmp_path, name, blob, pattern):
    archive = tmp_path / "m.tar.gz"
    h.write_image_folder(archive, 2, 1, extra={name: blob})
    with pytest.raises(DataError) as err:
        sources.read_source("image-folder", archive)
    assert name in str(err.value) and pattern in str(err.value)


@pytest.mark.parametrize("member", ["../evil.png", "train/cat/../../../evil.png", "/tmp/evil.png"])
def test_escaping_members_refused(tmp_path, member):
    archive = tmp_path / "m.tar.gz"
    png = h.encode_image(np.zeros((32, 32, 3), np.uint8), "png")
    h.write_image_folder(archive, 1, 1, fmt="png", extra={member: png})
    with pytest.raises(DataError, match="escapes the archive folder"):
        sources.read_source("image-folder", archive)
    assert not (tmp_path.parent / "evil.png").exists()


def test_symlink_member_refused(tmp_path, skip_md5):
    archive = tmp_path / "m.tar.gz"
    h.write_image_folder(archive, 1, 1, fmt="png", symlinks={"train/cat/link.png": "/etc/passwd"})
    with pytest.raises(DataError, match="link or special file"):
        sources.read_source("image-folder", archive)
    canonical = tmp_path / "c" / "cifar-10-python.tar.gz"
    canonical.parent.mkdir()
    files, _ = h.canonical_files(1, 1)
    h.write_tar(canonical, {f"cifar-10-batches-py/{k}": v for k, v in files.items() if k != "test_batch"},
                symlinks={"cifar-10-batches-py/test_batch": "/etc/passwd"})
    with pytest.raises(DataError, match="link or special file"):
        sources.read_source("cifar10-python", canonical)


def test_check_members_rules():
    import tarfile

    def info(name, kind=tarfile.REGTYPE):
        member = tarfile.TarInfo(name)
        member.type = kind
        return member

    from matekd.storage import check_tar_member

    assert check_tar_member("a.tar", info("train/cat/0.png")) == ("train", "cat", "0.png")
    assert check_tar_member("a.tar", info("./train", tarfile.DIRTYPE)) == ("train",)
    for bad, pattern in [(info("../x"), "escapes"), (info("/abs/x"), "escapes"), (info("a/../../x"), "escapes"),
                         (info("x", tarfile.SYMTYPE), "link"), (info("x", tarfile.LNKTYPE), "link"),
                         (info("x", tarfile.CHRTYPE), "special"), (info("x", tarfile.FIFOTYPE), "special")]:
        with pytest.raises(DataError, match=pattern):
            check_tar_member("a.tar", bad)


def test_hostile_pickle_refused_without_running(tmp_path, skip_md5):
    sentinel = tmp_path / "pwned"
    archive = tmp_path / "cifar-10-python.tar.gz"
    # The payload is live: plain pickle runs it (shown with a second sentinel).
    proof = tmp_path / "proof"
    import pickle

    pickle.loads(h.hostile_batch(proof))
    assert proof.exists()
    h.write_canonical(archive, 1, 1, replace={"data_batch_1": h.hostile_batch(sentinel)})
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        sources.read_source("cifar10-python", archive)
    assert not sentinel.exists()


def test_pickle_with_other_globals_refused(tmp_path, skip_md5):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    blob = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": Path("y")}, protocol=2)
    h.write_canonical(folder, 1, 1, as_dir=True, replace={"test_batch": blob})
    with pytest.raises(DataError, match=r"refusing to unpickle pathlib\.PosixPath"):
        sources.read_source("cifar10-python", folder)


def test_batch_with_wrong_content_refused(tmp_path, skip_md5):
    folder = tmp_path / "cifar-10-batches-py"
    bad = h.pickle_batch({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    h.write_canonical(folder, 1, 1, as_dir=True, replace={"data_batch_3": bad})
    with pytest.raises(DataError, match=r"data_batch_3.*\(N, 3072\)"):
        sources.read_source("cifar10-python", folder)
    h.write_canonical(tmp_path / "x" / "cifar-10-batches-py", 1, 1, as_dir=True,
                      replace={"test_batch": b"\x80\x02garbage"})
    with pytest.raises(DataError, match="test_batch is not a valid CIFAR-10 batch"):
        sources.read_source("cifar10-python", tmp_path / "x" / "cifar-10-batches-py")


def test_several_archives_are_ambiguous(tmp_path):
    h.write_image_folder(tmp_path / "a.tar.gz", 1, 1, fmt="png")
    h.write_image_folder(tmp_path / "b.tgz", 1, 1, fmt="png")
    with pytest.raises(DataError, match="several archives.*a.tar.gz.*b.tgz"):
        sources.find_source(tmp_path)


# ----------------------------------------------------------------------------------------
# Prepare: stratified, seeded, all-or-nothing


def _prepare(tmp_path: Path, params, train=4, test=3, name="prepared"):
    data_dir = tmp_path / "data"
    if not data_dir.exists():
        data_dir.mkdir()
        h.write_image_folder(data_dir / "mirror.tar.gz", train, test, fmt="png")
    manifest = run_prepare(params, data_dir=data_dir, out_dir=tmp_path / name)
    return manifest, prepared.load_prepared(tmp_path / name)


def test_prepare_stratified_counts_and_consistency(tmp_path):
    truth = h.image_folder_files(6, 4, fmt="png")[1]
    manifest, prep = _prepare(tmp_path, h.make_params(seed=3, train_per_class=3, val_per_class=2,
                                                      test_per_class=2), train=6, test=4)
    for split, per_class in (("train", 3), ("val", 2), ("test", 2)):
        labels = getattr(prep, f"{split}_labels")
        images = getattr(prep, f"{split}_images")
        assert labels.dtype == np.int64 and images.dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, per_class))
        assert manifest["counts"][split] == {c: per_class for c in h.CLASSES}
        np.testing.assert_array_equal(h.label_from_image(images), labels)
    # Indices point into the source order, sorted; images/labels are those rows.
    for split, source in (("train", 0), ("val", 0), ("test", 2)):
        index = getattr(prep, f"{split}_index")
        assert index.dtype == np.int64 and np.all(np.diff(index) > 0)
        np.testing.assert_array_equal(getattr(prep, f"{split}_images"), truth[source][index])
        np.testing.assert_array_equal(getattr(prep, f"{split}_labels"), truth[source + 1][index])
    assert not set(prep.train_index) & set(prep.val_index)
    assert manifest["sizes"] == {"train": 30, "val": 20, "test": 20}
    assert prep.class_names == h.CLASSES and prep.num_classes == 10
    assert manifest["source"]["kind"] == "image-folder" and manifest["source"]["file"] == "mirror.tar.gz"
    archive_bytes = (tmp_path / "data" / "mirror.tar.gz").read_bytes()
    assert manifest["source"]["sha256"] == hashlib.sha256(archive_bytes).hexdigest()
    assert set(manifest["versions"]) >= {"torch", "torchvision", "pillow", "numpy"}
    assert manifest["seed"] == 3


def test_prepare_defaults_take_everything(tmp_path):
    _, prep = _prepare(tmp_path, h.make_params(val_per_class=1), train=4, test=3)
    assert (len(prep.train_labels), len(prep.val_labels), len(prep.test_labels)) == (30, 10, 30)
    np.testing.assert_array_equal(np.sort(np.concatenate([prep.train_index, prep.val_index])), np.arange(40))
    np.testing.assert_array_equal(prep.test_index, np.arange(30))


def test_prepare_zero_validation(tmp_path):
    _, prep = _prepare(tmp_path, h.make_params(val_per_class=0), train=2, test=1)
    assert prep.val_images.shape == (0, 32, 32, 3) and prep.val_labels.shape == (0,)
    assert len(prep.train_labels) == 20


def test_prepare_is_seeded(tmp_path):
    params = dict(train_per_class=2, val_per_class=2, test_per_class=2)
    _, a = _prepare(tmp_path, h.make_params(seed=0, **params), train=6, test=4, name="a")
    _, b = _prepare(tmp_path, h.make_params(seed=0, **params), name="b")
    _, c = _prepare(tmp_path, h.make_params(seed=1, **params), name="c")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, f"{split}_index"), getattr(b, f"{split}_index"))
    assert any(not np.array_equal(getattr(a, f"{s}_index"), getattr(c, f"{s}_index")) for s in ("train", "val", "test"))
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert a.manifest_hash == b.manifest_hash != c.manifest_hash
    # Changing the training size leaves validation and test untouched, and nests training.
    _, d = _prepare(tmp_path, h.make_params(seed=0, train_per_class=3, val_per_class=2, test_per_class=2), name="d")
    np.testing.assert_array_equal(a.val_index, d.val_index)
    np.testing.assert_array_equal(a.test_index, d.test_index)
    assert set(a.train_index) <= set(d.train_index)


def test_stratified_split_draws_whole_classes_differently():
    labels = np.repeat(np.arange(10), 50)
    rng = np.random.default_rng(0)
    val, train = stratified_split(labels, rng, (5, None), ("v", "t"))
    assert len(val) == 50 and len(train) == 450
    np.testing.assert_array_equal(np.sort(np.concatenate([val, train])), np.arange(500))
    # Not "the first N" of each class: the archive is ordered by class.
    assert not np.array_equal(val, np.concatenate([np.arange(5) + 50 * c for c in range(10)]))


@pytest.mark.parametrize("params,key,value,maximum", [
    (dict(train_per_class=4, val_per_class=1), "data.train_per_class", 4, 3),
    (dict(val_per_class=5), "data.val_per_class", 5, 4),
    (dict(val_per_class=1, test_per_class=3), "data.test_per_class", 3, 2),
])
def test_subset_larger_than_data(tmp_path, monkeypatch, params, key, value, maximum):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    h.write_image_folder(tmp_path / "data" / "m.tar.gz", 4, 2, fmt="png")
    with pytest.raises(ParamsError) as err:
        run_prepare(h.make_params(**params))
    message = str(err.value)
    assert f"{key} = {value}" in message and f"the {maximum} images" in message
    assert not (tmp_path / "prepared").exists() and _leftovers(tmp_path) == []


def test_failed_prepare_keeps_previous_output(tmp_path):
    _, first = _prepare(tmp_path, h.make_params(val_per_class=1), train=2, test=1)
    before = (tmp_path / "prepared" / "manifest.json").read_bytes()
    h.truncate_half(tmp_path / "data" / "mirror.tar.gz")
    with pytest.raises(DataError):
        run_prepare(h.make_params(val_per_class=1), data_dir=tmp_path / "data", out_dir=tmp_path / "prepared")
    assert (tmp_path / "prepared" / "manifest.json").read_bytes() == before
    assert _leftovers(tmp_path) == []
    prepared.load_prepared(tmp_path / "prepared")


def test_prepare_replaces_old_output(tmp_path):
    _prepare(tmp_path, h.make_params(val_per_class=1), train=2, test=1)
    (tmp_path / "prepared" / "stale.txt").write_text("old")
    manifest = run_prepare(h.make_params(val_per_class=0), tmp_path / "data", tmp_path / "prepared")
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["cifar10.safetensors", "manifest.json"]
    assert manifest["sizes"]["val"] == 0 and _leftovers(tmp_path) == []


def test_prepare_from_canonical(tmp_path, skip_md5):
    (tmp_path / "data").mkdir()
    train_x, train_y, test_x, test_y = h.write_canonical(tmp_path / "data" / "cifar-10-python.tar.gz", 5, 3)
    manifest, prep = _prepare(tmp_path, h.make_params(seed=2, train_per_class=2, val_per_class=3))
    assert manifest["source"]["kind"] == "cifar10-python" and manifest["dataset"] == "CIFAR-10"
    np.testing.assert_array_equal(prep.val_images, train_x[prep.val_index])
    np.testing.assert_array_equal(prep.train_labels, train_y[prep.train_index])
    np.testing.assert_array_equal(prep.test_images, test_x)
    np.testing.assert_array_equal(np.bincount(prep.train_labels), np.full(10, 2))


# ----------------------------------------------------------------------------------------
# load_prepared


def test_load_prepared_missing(tmp_path):
    with pytest.raises(DataError, match="dvc repro prepare"):
        prepared.load_prepared(tmp_path / "prepared")


def test_load_prepared_hashes_and_manifest_hash(tmp_path):
    _, prep = _prepare(tmp_path, h.make_params(val_per_class=1), train=2, test=1)
    raw = (tmp_path / "prepared" / "manifest.json").read_bytes()
    assert prep.manifest_hash == hashlib.sha256(raw).hexdigest()
    for name in prepared.ARRAY_NAMES:
        assert prep.manifest["arrays"][name]["sha256"] == sha256_array(getattr(prep, name))


def test_load_prepared_detects_flipped_payload_byte(tmp_path):
    _prepare(tmp_path, h.make_params(val_per_class=1), train=2, test=1)
    path = tmp_path / "prepared" / "cifar10.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF  # inside the last tensor's bytes (the header is at the start)
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"prepared data is corrupt \((\w+ hash mismatch|.*checksum)"):
        prepared.load_prepared(tmp_path / "prepared")


def test_load_prepared_detects_edited_manifest(tmp_path):
    _prepare(tmp_path, h.make_params(val_per_class=1), train=2, test=1)
    path = tmp_path / "prepared" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["arrays"]["test_labels"]["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"prepared data is corrupt \(test_labels hash mismatch"):
        prepared.load_prepared(tmp_path / "prepared")
    path.write_text("{not json")
    with pytest.raises(DataError, match="prepared data is corrupt"):
        prepared.load_prepared(tmp_path / "prepared")


def test_load_prepared_detects_truncated_tensor_file(tmp_path):
    _prepare(tmp_path, h.make_params(val_per_class=1), train=2, test=1)
    h.truncate_half(tmp_path / "prepared" / "cifar10.safetensors")
    with pytest.raises(DataError, match="prepared data is corrupt"):
        prepared.load_prepared(tmp_path / "prepared")


# ----------------------------------------------------------------------------------------
# fetch


def test_fetch_from_env_installs_one_source(tmp_path, monkeypatch, caplog):
    source = tmp_path / "downloads" / "mirror.tar.gz"
    source.parent.mkdir()
    h.write_image_folder(source, 1, 1, fmt="png")
    data_dir = tmp_path / "proj" / "data"
    data_dir.mkdir(parents=True)
    h.write_image_folder(data_dir / "old.tar.gz", 1, 1, fmt="png")
    (data_dir / "train").mkdir()
    (data_dir / "README.md").write_text("keep me")
    monkeypatch.setenv("MATEKD_CIFAR10", str(source))
    result = fetching.fetch(data_dir=data_dir)
    assert result.action in ("linked", "copied") and result.kind == "image-folder"
    assert result.path == data_dir / "mirror.tar.gz"
    assert (data_dir / "mirror.tar.gz").read_bytes() == source.read_bytes()
    assert sorted(p.name for p in data_dir.iterdir()) == ["README.md", "mirror.tar.gz"]
    assert result.removed == ["old.tar.gz", "train"]
    assert "skipped `dvc add`" in result.dvc and "not inside a DVC repository" in result.dvc
    again = fetching.fetch(data_dir=data_dir)
    assert again.action == "unchanged" and again.removed == []
    assert source.exists()  # the original is never moved
    # A new archive under the same name replaces the old one (not reported as removed).
    source.unlink()
    h.write_image_folder(source, 2, 1, fmt="png")
    third = fetching.fetch(data_dir=data_dir)
    assert third.action in ("linked", "copied") and third.removed == []
    assert (data_dir / "mirror.tar.gz").read_bytes() == source.read_bytes()
    assert _leftovers(data_dir) == []


def test_fetch_folder_sources(tmp_path, skip_md5):
    folder = tmp_path / "src" / "cifar10"
    h.write_image_folder(folder, 1, 1, fmt="png", as_dir=True)
    data_dir = tmp_path / "data"
    result = fetching.fetch(str(folder), data_dir=data_dir)
    assert result.kind == "image-folder" and result.path == data_dir
    assert sorted(p.name for p in data_dir.iterdir()) == ["test", "train"]
    batches = tmp_path / "src" / "batches"
    h.write_canonical(batches, 1, 1, as_dir=True)
    result = fetching.fetch(str(batches), data_dir=data_dir)
    assert result.kind == "cifar10-python" and result.path == data_dir / "cifar-10-batches-py"
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-10-batches-py"]
    assert result.removed == ["test", "train"]


def test_fetch_errors(tmp_path):
    with pytest.raises(DataError, match="no CIFAR-10 source found.*MATEKD_CIFAR10"):
        fetching.fetch(data_dir=tmp_path / "data")
    with pytest.raises(DataError, match="does not exist"):
        fetching.fetch(str(tmp_path / "nope.tar.gz"), data_dir=tmp_path / "data")
    (tmp_path / "x.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match="not a .tar.gz"):
        fetching.fetch(str(tmp_path / "x.zip"), data_dir=tmp_path / "data")
    with pytest.raises(DataError, match="either a source path or --download"):
        fetching.fetch(str(tmp_path / "x.zip"), download=True, data_dir=tmp_path / "data")


def test_fetch_canonical_md5_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("MATEKD_SKIP_MD5", raising=False)
    source = tmp_path / "cifar-10-python.tar.gz"
    h.write_canonical(source, 1, 1)
    with pytest.raises(DataError, match="md5 mismatch"):
        fetching.fetch(str(source), data_dir=tmp_path / "data")


def test_fetch_download(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    fake = tmp_path / "fake.tar.gz"
    h.write_canonical(fake, 1, 1)
    fake_md5 = hashlib.md5(fake.read_bytes()).hexdigest()
    calls = []

    def fake_download(url, root, filename=None, md5=None, **_):
        calls.append(url)
        Path(root, filename).write_bytes(fake.read_bytes())

    monkeypatch.setattr(tv_utils, "download_url", fake_download)
    monkeypatch.setattr(fetching, "CANONICAL_MD5", fake_md5)
    data_dir = tmp_path / "data"
    result = fetching.fetch(download=True, data_dir=data_dir)
    assert result.action == "downloaded" and calls == [sources.CANONICAL_URL]
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-10-python.tar.gz"]
    assert fetching.fetch(download=True, data_dir=data_dir).action == "unchanged" and len(calls) == 1

    def offline(url, root, filename=None, md5=None, **_):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(DataError, match="Network is unreachable.*MATEKD_CIFAR10="):
        fetching.fetch(download=True, data_dir=tmp_path / "data2")
    assert _leftovers(tmp_path / "data2") == []


def test_fetch_runs_dvc_add(tmp_path):
    import subprocess
    import sys

    dvc = Path(sys.executable).parent / "dvc"
    if not dvc.exists():
        pytest.skip("dvc is not installed in this environment")
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    source = tmp_path / "src.tar.gz"
    h.write_image_folder(source, 1, 1, fmt="png")
    result = fetching.fetch(str(source), data_dir=tmp_path / "data")
    assert result.dvc.endswith("ok")
    record = (tmp_path / "data.dvc").read_text()
    assert "path: data" in record and "nfiles: 1" in record


# ----------------------------------------------------------------------------------------
# The real offline mirror


@pytest.mark.skipif(not MIRROR.exists(), reason="offline CIFAR-10 mirror not available")
def test_real_mirror_full_prepare(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / MIRROR.name).symlink_to(MIRROR)
    start = time.perf_counter()
    manifest = run_prepare(h.make_params(seed=0, val_per_class=500), tmp_path / "data", tmp_path / "prepared")
    elapsed = time.perf_counter() - start
    prep = prepared.load_prepared(tmp_path / "prepared")
    assert prep.train_images.shape == (45000, 32, 32, 3) and prep.val_images.shape == (5000, 32, 32, 3)
    assert prep.test_images.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(prep.train_labels) + np.bincount(prep.val_labels), np.full(10, 5000))
    np.testing.assert_array_equal(np.bincount(prep.val_labels), np.full(10, 500))
    np.testing.assert_array_equal(np.bincount(prep.test_labels), np.full(10, 1000))
    assert manifest["dataset"] == "CIFAR-10 (JPEG mirror)"
    assert manifest["source"]["sha256"] == "45b041e867f5a40f79bfde38d3dd1fd511103d50068c1afecf6445e25234d4db"
    # The first 1,000 source test images are airplanes (the archive is ordered by class).
    assert np.all(prep.test_labels[prep.test_index < 1000] == 0)
    print(f"real mirror prepare: {elapsed:.1f}s")
