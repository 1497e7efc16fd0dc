"""Collections: GLDv2 CSVs and layout, folder-per-landmark trees, query folders and lists, subsets and splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from conftest import make_image
from landmarks.data.collection import (
    ImageRecord,
    decode_id,
    encode_id,
    gldv2_image_path,
    id_to_relpath,
    landmark_counts,
    load_collection,
    load_folder_collection,
    load_gldv2_csv,
    load_image_folder,
    load_images,
    load_list_file,
    select_fraction,
    select_min_images,
    select_top_landmarks,
    stratified_split,
)
from landmarks.errors import DataFormatError, LandmarksError

# --- GLDv2 ------------------------------------------------------------------------------------------

TRAIN = {
    "0a1b2c3d4e5f6a7b": "12",
    "1b2c3d4e5f6a7b8c": "12",
    "2c3d4e5f6a7b8c9d": "7",
    "3d4e5f6a7b8c9d0e": "150",
}


def _write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def test_gldv2_image_path() -> None:
    p = gldv2_image_path("/data", "train", "abcdef0123456789")
    assert p == Path("/data/train/a/b/c/abcdef0123456789.jpg")
    with pytest.raises(DataFormatError):
        gldv2_image_path("/data", "train", "ab")


def test_train_csv(tmp_path: Path) -> None:
    rows = "".join(f"{i},http://x/{i}.jpg,{lm}\n" for i, lm in TRAIN.items())
    csv_path = _write(tmp_path / "train.csv", "id,url,landmark_id\n" + rows + "\n")  # blank line skipped
    recs = load_gldv2_csv(csv_path)
    assert [r.id for r in recs] == list(TRAIN)
    assert [r.landmark for r in recs] == list(TRAIN.values())
    assert recs[0].path == tmp_path / "train" / "0" / "a" / "1" / "0a1b2c3d4e5f6a7b.jpg"
    assert landmark_counts(recs) == Counter({"12": 2, "7": 1, "150": 1})
    other = load_gldv2_csv(csv_path, image_dir=tmp_path / "elsewhere")
    assert other[0].path == tmp_path / "elsewhere" / "0" / "a" / "1" / "0a1b2c3d4e5f6a7b.jpg"
    assert load_collection(csv_path) == recs


def test_train_clean_csv(tmp_path: Path) -> None:
    by_lm: dict[str, list[str]] = {}
    for i, lm in TRAIN.items():
        by_lm.setdefault(lm, []).append(i)
    text = "landmark_id,images\n" + "".join(f"{lm},{' '.join(ids)}\n" for lm, ids in by_lm.items())
    recs = load_gldv2_csv(_write(tmp_path / "train_clean.csv", text))
    assert {(r.id, r.landmark) for r in recs} == set(TRAIN.items())
    assert all(r.path.parent.parent.parent.parent.name == "train" for r in recs)  # train_clean -> train/


@pytest.mark.parametrize("name,split", [("index.csv", "index"), ("test.csv", "test")])
def test_index_and_test_csv_are_unlabelled(tmp_path: Path, name: str, split: str) -> None:
    recs = load_gldv2_csv(_write(tmp_path / name, "id\nabc0000000000001\nfff0000000000002\n"))
    assert [r.landmark for r in recs] == [None, None]
    assert recs[1].path == tmp_path / split / "f" / "f" / "f" / "fff0000000000002.jpg"
    with_url = load_gldv2_csv(_write(tmp_path / "x" / name, "id,url\nabc0000000000001,http://u\n"))
    assert with_url[0].id == "abc0000000000001" and with_url[0].landmark is None
    assert load_images([tmp_path / name]) == recs


@pytest.mark.parametrize(
    "text,words",
    [
        ("id,url,landmark_id\nabc1,u,1\nabc1,u,2\n", ["abc1", "twice", ":3"]),
        ("id,url,landmark_id\nabc1,u,1 2\n", ["landmark id", ":2"]),
        ("id,url,landmark_id\nabc1,u\n", ["expected 3 columns", ":2"]),
        ("landmark_id,images\n5,abc1 abc1\n", ["twice"]),
        ("foo,bar\n1,2\n", ["neither"]),
        ("", ["empty"]),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path: Path, text: str, words: list[str]) -> None:
    p = _write(tmp_path / "train.csv", text)
    with pytest.raises(DataFormatError) as e:
        load_gldv2_csv(p)
    msg = str(e.value)
    assert str(p) in msg
    for w in words:
        assert w in msg


def test_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(LandmarksError, match="no such CSV"):
        load_gldv2_csv(tmp_path / "train.csv")


# --- folders ----------------------------------------------------------------------------------------


def test_folder_collection_ids_landmarks_and_encoding(tmp_path: Path) -> None:
    root = tmp_path / "coll"
    make_image(root / "tower" / "a.jpg")
    make_image(root / "tower" / "day 2" / "b.jpg")  # sub-folder, space in the name
    make_image(root / "old bridge" / "c,1%.png", kind="png")
    make_image(root / "loose.jpg")  # directly in the root: no landmark, ignored
    make_image(root / "tower" / ".hidden.jpg")
    make_image(root / ".cache" / "d.jpg")
    _write(root / "tower" / "notes.txt", "not an image")
    recs = load_folder_collection(root)
    by_id = {r.id: r for r in recs}
    assert set(by_id) == {"tower/a", "tower/day%202/b", "old%20bridge/c%2C1%25"}
    assert by_id["tower/a"].landmark == "tower"
    assert by_id["old%20bridge/c%2C1%25"].landmark == "old%20bridge"
    for r in recs:
        assert not any(c.isspace() or c == "," for c in r.id)
        assert (root / id_to_relpath(r.id)).with_suffix(r.path.suffix) == r.path  # reversible
    assert decode_id(encode_id("a b/c,d%e")) == "a b/c,d%e"
    assert load_collection(root) == recs


def test_folder_collection_duplicate_stems_keep_extension(tmp_path: Path) -> None:
    root = tmp_path / "coll"
    make_image(root / "lm" / "img.jpg")
    make_image(root / "lm" / "img.png", kind="png")
    make_image(root / "lm" / "other.jpg")
    ids = sorted(r.id for r in load_folder_collection(root))
    assert ids == ["lm/img.jpg", "lm/img.png", "lm/other"]
    assert len(set(ids)) == 3


def test_folder_collection_without_landmark_folders(tmp_path: Path) -> None:
    make_image(tmp_path / "flat" / "a.jpg")
    with pytest.raises(LandmarksError, match="no images found"):
        load_folder_collection(tmp_path / "flat")
    with pytest.raises(LandmarksError, match="no such folder"):
        load_folder_collection(tmp_path / "nope")


def test_query_folder_ids_are_stems_unless_they_clash(tmp_path: Path) -> None:
    q = tmp_path / "queries"
    make_image(q / "one.jpg")
    make_image(q / "sub" / "two photo.jpg")
    assert sorted(r.id for r in load_image_folder(q)) == ["one", "two%20photo"]
    assert all(r.landmark is None for r in load_image_folder(q))
    make_image(q / "sub" / "one.png", kind="png")  # clashes with one.jpg: relative paths are used
    assert sorted(r.id for r in load_image_folder(q)) == ["one", "sub/one", "sub/two%20photo"]


def test_list_file(tmp_path: Path) -> None:
    make_image(tmp_path / "imgs" / "a.jpg")
    make_image(tmp_path / "imgs" / "b.jpg")
    make_image(tmp_path / "other" / "a.jpg")
    lst = _write(tmp_path / "list.txt", "# queries\nimgs/a.jpg\n\nimgs/b.jpg\tlm7\nother/a.jpg\n")
    recs = load_list_file(lst)
    assert [r.id for r in recs] == ["a", "b", "a~1"]
    assert [r.landmark for r in recs] == [None, "lm7", None]
    assert recs[1].path == tmp_path / "imgs" / "b.jpg"
    assert load_collection(lst) == recs


def test_load_images_mixes_sources_and_refuses_clashes(tmp_path: Path) -> None:
    make_image(tmp_path / "q" / "x.jpg")
    single = make_image(tmp_path / "single.jpg")
    recs = load_images([tmp_path / "q", single])
    assert [r.id for r in recs] == ["x", "single"]
    with pytest.raises(LandmarksError, match="duplicate image ids"):
        load_images([tmp_path / "q", tmp_path / "q"])
    with pytest.raises(LandmarksError, match="no such file"):
        load_images([tmp_path / "missing.jpg"])
    with pytest.raises(LandmarksError, match="expected a GLDv2 CSV"):
        load_collection(single)


# --- subsets and splits -----------------------------------------------------------------------------


def _records(counts: dict[str, int]) -> list[ImageRecord]:
    return [ImageRecord(f"{lm}_{k}", Path(f"{lm}/{k}.jpg"), lm) for lm, n in counts.items() for k in range(n)]


def test_select_min_and_top() -> None:
    recs = _records({"a": 5, "b": 1, "c": 3, "d": 3})
    assert {r.landmark for r in select_min_images(recs, 3)} == {"a", "c", "d"}
    assert select_min_images(recs, 1) == recs
    top = select_top_landmarks(recs, 2)
    assert {r.landmark for r in top} == {"a", "c"}  # c and d tie at 3: the smaller id wins
    assert [r.id for r in top] == [r.id for r in recs if r.landmark in ("a", "c")]  # order kept


def test_select_fraction_is_seeded_and_keeps_order() -> None:
    recs = _records({"a": 30, "b": 10})
    s1 = select_fraction(recs, 0.25, seed=3)
    assert len(s1) == 10 and s1 == select_fraction(recs, 0.25, seed=3)
    assert s1 != select_fraction(recs, 0.25, seed=4)
    order = {r.id: i for i, r in enumerate(recs)}
    assert [order[r.id] for r in s1] == sorted(order[r.id] for r in s1)
    assert select_fraction(recs, 1.0) == recs
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(LandmarksError):
            select_fraction(recs, bad)


def test_stratified_split() -> None:
    counts = {"big": 40, "mid": 10, "two": 2, "one": 1}
    recs = _records(counts) + [ImageRecord("unlabelled", Path("u.jpg"), None)]
    train, val = stratified_split(recs, 0.2, seed=0)
    assert stratified_split(recs, 0.2, seed=0) == (train, val)
    assert stratified_split(recs, 0.2, seed=1) != (train, val)
    assert {r.id for r in train} | {r.id for r in val} == {r.id for r in recs}
    assert not {r.id for r in train} & {r.id for r in val}
    n_train, n_val = landmark_counts(train), landmark_counts(val)
    assert all(n_train[lm] >= 1 for lm in counts)  # every landmark keeps a training image
    assert n_val["big"] == 8 and n_val["mid"] == 2 and n_val["one"] == 0
    assert n_val["two"] <= 1
    assert any(r.id == "unlabelled" for r in train)
    index = {r.id: i for i, r in enumerate(recs)}
    assert [index[r.id] for r in val] == sorted(index[r.id] for r in val)  # input order kept
    # a large fraction still leaves min_train images in train
    train9, _ = stratified_split(recs, 0.9, seed=0, min_train=2)
    assert all(landmark_counts(train9)[lm] >= min(2, counts[lm]) for lm in counts)


def test_non_ascii_names_encode_reversibly(tmp_path: Path) -> None:
    make_image(tmp_path / "c" / "café du pont" / "über 1.jpg")
    (rec,) = load_folder_collection(tmp_path / "c")
    assert rec.landmark == "caf%C3%A9%20du%20pont"
    assert id_to_relpath(rec.id) == "café du pont/über 1"


def test_crlf_line_endings(tmp_path: Path) -> None:
    p = tmp_path / "train.csv"
    p.write_bytes(b"id,url,landmark_id\r\nabc1,u,1\r\nabc2,u,2\r\n")
    assert [(r.id, r.landmark) for r in load_gldv2_csv(p)] == [("abc1", "1"), ("abc2", "2")]


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    p = tmp_path / "train.csv"
    p.write_text("id,url,landmark_id\nabc1,u,1\n", encoding="utf-8-sig")
    assert [r.id for r in load_gldv2_csv(p)] == ["abc1"]
