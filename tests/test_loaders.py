"""Loaders of the published formats, the preprocessing filters and their input errors.

Every file is written by the test in the publisher's format; the expected users, items and
interactions are worked out by hand in the comments. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from fedshare.data import load_dataset
from fedshare.data.download import extract_zip, fetch
from fedshare.data.preprocess import deduplicate, filter_users, to_implicit
from fedshare.errors import FedShareError

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


pytestmark = pytest.mark.usefixtures("offline")


def triples(dataset) -> list[tuple[int, int, int]]:
    frame = dataset.interactions.frame
    return sorted(zip(frame["user"].tolist(), frame["item"].tolist(),
                      frame["timestamp"].tolist(), strict=True))


def u_item_line(item: int, title: str, genres: list[str]) -> str:
    flags = ["1" if g in genres else "0" for g in ML100K_GENRES]
    return "|".join([str(item), title, "01-Jan-1995", "", "http://us.imdb.com/M/x", *flags])


# Raw (user, item, rating, timestamp) rows shared by the MovieLens formats. Users 2 < 7 < 10 and
# items 4 < 5 < 30 < 100 in numeric order (string order would put 10 before 2 and 100 before 30).
# (2, 5) appears twice: the earliest (timestamp 50) is kept.
ML_ROWS = [(10, 100, 4, 300), (10, 5, 3, 100), (2, 30, 5, 200), (2, 5, 1, 50), (7, 4, 2, 10),
           (7, 100, 5, 20), (7, 30, 4, 5), (2, 5, 2, 400)]
# users 2, 7, 10 -> 0, 1, 2; items 4, 5, 30, 100 -> 0, 1, 2, 3
ML_EXPECTED = sorted([(0, 1, 50), (0, 2, 200), (1, 2, 5), (1, 0, 10), (1, 3, 20), (2, 1, 100),
                      (2, 3, 300)])


def check_ml_rows(ds) -> None:
    assert ds.num_users == 3
    assert ds.num_items == 4
    assert len(ds.interactions) == 7
    assert list(ds.user_ids) == [2, 7, 10]
    assert list(ds.item_ids) == [4, 5, 30, 100]
    assert triples(ds) == ML_EXPECTED


# ----------------------------------------------------------------------------- ML-100K GroupLens
@pytest.fixture
def grouplens_100k(tmp_path) -> Path:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ML_ROWS))
    lines = [u_item_line(100, "Café Society (1995)", ["Comedy", "Romance"]),
             u_item_line(4, "Get Shorty (1995)", ["Action", "Comedy", "Drama"]),
             u_item_line(5, "Copycat (1995)", ["Crime", "Drama", "Thriller"]),
             u_item_line(30, "Belle de jour (1967)", ["Drama"]),
             u_item_line(999, "Never Rated (1990)", ["unknown"])]
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder


def test_grouplens_ml100k_folder(grouplens_100k):
    ds = load_dataset("ml-100k", grouplens_100k, min_user_interactions=0)
    assert ds.name == "ml-100k"
    check_ml_rows(ds)
    # metadata is indexed by contiguous item id (4, 5, 30, 100); item 999 was never rated
    assert ds.items is not None
    assert len(ds.items) == 4
    assert ds.items["title"].tolist() == ["Get Shorty (1995)", "Copycat (1995)",
                                          "Belle de jour (1967)", "Café Society (1995)"]
    assert ds.items["genres"].tolist() == ["Action|Comedy|Drama", "Crime|Drama|Thriller",
                                           "Drama", "Comedy|Romance"]


def test_grouplens_ml100k_file_given_directly_finds_metadata(grouplens_100k):
    ds = load_dataset("ml-100k", grouplens_100k / "u.data", min_user_interactions=0)
    check_ml_rows(ds)
    assert ds.items["title"].iloc[3] == "Café Society (1995)"


def test_ml100k_without_metadata_has_no_items(grouplens_100k):
    (grouplens_100k / "u.item").unlink()
    ds = load_dataset("ml-100k", grouplens_100k, min_user_interactions=0)
    check_ml_rows(ds)
    assert ds.items is None


def test_ml100k_item_missing_from_metadata_gets_no_title(grouplens_100k):
    text = (grouplens_100k / "u.item").read_bytes().decode("latin-1")
    kept = [line for line in text.splitlines() if not line.startswith("30|")]
    (grouplens_100k / "u.item").write_bytes(("\n".join(kept) + "\n").encode("latin-1"))
    ds = load_dataset("ml-100k", grouplens_100k, min_user_interactions=0)
    assert ds.items["title"].isna().tolist() == [False, False, True, False]


# ----------------------------------------------------------------------------- ML-100K RecBole
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"


@pytest.fixture
def recbole_100k(tmp_path) -> Path:
    folder = tmp_path / "recbole"
    folder.mkdir()
    body = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ML_ROWS)
    (folder / "ml-100k.inter").write_text(INTER_HEADER + body)
    (folder / "ml-100k.item").write_text(
        ITEM_HEADER + "4\tGet Shorty\t1995\tAction Comedy Drama\n"
        "5\tCopycat\t1995\tCrime Drama Thriller\n30\tBelle de jour\t1967\tDrama\n"
        "100\tCafe Society\t1995\tComedy Romance\n")
    return folder


def test_recbole_atomic_ml100k(recbole_100k):
    for where in (recbole_100k, recbole_100k / "ml-100k.inter"):
        ds = load_dataset("ml-100k", where, min_user_interactions=0)
        check_ml_rows(ds)
        assert ds.items["title"].tolist() == ["Get Shorty", "Copycat", "Belle de jour",
                                              "Cafe Society"]
        assert ds.items["genres"].tolist() == ["Action|Comedy|Drama", "Crime|Drama|Thriller",
                                               "Drama", "Comedy|Romance"]


def test_recbole_wrong_header(tmp_path):
    path = tmp_path / "ml-100k.inter"
    path.write_text("user_id:token\titem_id:token\trating:float\n1\t2\t3\n")
    with pytest.raises(FedShareError, match="header"):
        load_dataset("ml-100k", path)


def test_recbole_header_only_holds_no_interactions(tmp_path):
    path = tmp_path / "ml-100k.inter"
    path.write_text(INTER_HEADER)
    with pytest.raises(FedShareError, match="no interactions"):
        load_dataset("ml-100k", path)


# ----------------------------------------------------------------------------- ML-1M
@pytest.fixture
def ml1m(tmp_path) -> Path:
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text(
        "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ML_ROWS))
    (folder / "movies.dat").write_bytes(
        "4::Waiting to Exhale (1995)::Comedy|Drama\n5::Father of the Bride Part II (1995)::Comedy\n"
        "30::Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)::Drama\n"
        "100::City Hall (1996)::Drama|Thriller\n1::Toy Story (1995)::Animation\n"
        .encode("latin-1"))
    return folder


def test_ml1m_ratings_and_movies(ml1m):
    for where in (ml1m, ml1m / "ratings.dat"):
        ds = load_dataset("ml-1m", where, min_user_interactions=0)
        check_ml_rows(ds)
        assert ds.items["title"].tolist() == [
            "Waiting to Exhale (1995)", "Father of the Bride Part II (1995)",
            "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)", "City Hall (1996)"]
        assert ds.items["genres"].tolist() == ["Comedy|Drama", "Comedy", "Drama",
                                               "Drama|Thriller"]


def test_ml1m_non_numeric_timestamp_names_column_and_row(ml1m):
    (ml1m / "ratings.dat").write_text("1::2::3::100\n1::3::4::yesterday\n")
    with pytest.raises(FedShareError, match=r"timestamp in data row 2") as info:
        load_dataset("ml-1m", ml1m)
    assert "ratings.dat" in str(info.value)


def test_ml1m_default_filter_is_20(tmp_path):
    # user 1 has 20 interactions, user 2 has 19 (its item 500 is touched by nobody else)
    rows = [(1, i, 4, 1000 + i) for i in range(1, 21)] + [(2, i, 3, 2000 + i) for i in range(1, 19)]
    rows.append((2, 500, 5, 3000))
    (tmp_path / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    ds = load_dataset("ml-1m", tmp_path)
    assert list(ds.user_ids) == [1]
    assert list(ds.item_ids) == list(range(1, 21))
    assert len(ds.interactions) == 20
    kept = load_dataset("ml-1m", tmp_path, min_user_interactions=19)
    assert list(kept.user_ids) == [1, 2]
    assert kept.num_items == 21


def test_ml1m_default_location_is_the_cache(tmp_path):
    cached = tmp_path / "cache" / "ml-1m"
    cached.mkdir(parents=True)
    (cached / "ratings.dat").write_text("".join(f"5::{i}::3::{i}\n" for i in range(25)))
    ds = load_dataset("ml-1m")
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (1, 25, 25)


# ----------------------------------------------------------------------------- Amazon 2018
def write_amazon(path: Path, rows: list[tuple[str, str, float, int]]) -> Path:
    path.write_text("".join(f"{i},{u},{r},{t}\n" for i, u, r, t in rows))
    return path


AMAZON_ROWS = [("B000123", "A2XKL", 5.0, 1400000300), ("0000031852", "A1BQ", 4.0, 1400000100),
               ("31852", "A1BQ", 3.0, 1400000200), ("B000123", "A1BQ", 2.0, 1400000000),
               ("B000123", "A1BQ", 1.0, 1300000000)]
# users "A1BQ" < "A2XKL"; items "0000031852" < "31852" < "B000123" (string ids, zeros kept)
AMAZON_EXPECTED = sorted([(0, 0, 1400000100), (0, 1, 1400000200), (0, 2, 1300000000),
                          (1, 2, 1400000300)])


@pytest.mark.parametrize(("name", "file_name"), [("fashion", "AMAZON_FASHION.csv"),
                                                 ("video-games", "Video_Games.csv")])
def test_amazon_ratings_csv(tmp_path, name, file_name):
    write_amazon(tmp_path / file_name, AMAZON_ROWS)
    by_folder = load_dataset(name, tmp_path, min_user_interactions=0)
    by_file = load_dataset(name, tmp_path / file_name, min_user_interactions=0)
    for ds in (by_folder, by_file):
        assert (ds.num_users, ds.num_items, len(ds.interactions)) == (2, 3, 4)
        assert list(ds.user_ids) == ["A1BQ", "A2XKL"]
        assert list(ds.item_ids) == ["0000031852", "31852", "B000123"]
        assert triples(ds) == AMAZON_EXPECTED
        assert ds.items is None


def test_amazon_file_with_any_name_given_directly(tmp_path):
    path = write_amazon(tmp_path / "my_fashion_copy.csv", AMAZON_ROWS)
    ds = load_dataset("fashion", path, min_user_interactions=0)
    assert triples(ds) == AMAZON_EXPECTED


def test_amazon_folder_without_the_category_file(tmp_path):
    write_amazon(tmp_path / "AMAZON_FASHION.csv", AMAZON_ROWS)
    with pytest.raises(FedShareError, match=r"not found.*Video_Games\.csv"):
        load_dataset("video-games", tmp_path)


@pytest.fixture
def amazon_filter_rows() -> list[tuple[str, str, float, int]]:
    """U20: 20 items; U15: 15 items (one only it touched); U9: 9 items (one only it touched);
    UDUP: 21 rows but only 19 distinct items (two repeats)."""
    rows = [(f"BCOMMON{k:02d}", "U20", 5.0, 100 + k) for k in range(20)]
    rows += [(f"BCOMMON{k:02d}", "U15", 4.0, 200 + k) for k in range(14)]
    rows.append(("BONLY15", "U15", 4.0, 300))
    rows += [(f"BCOMMON{k:02d}", "U9", 3.0, 400 + k) for k in range(8)]
    rows.append(("BONLY9", "U9", 3.0, 500))
    rows += [(f"BCOMMON{k:02d}", "UDUP", 2.0, 600 + k) for k in range(19)]
    rows += [("BCOMMON00", "UDUP", 2.0, 700), ("BCOMMON01", "UDUP", 2.0, 701)]
    return rows


def test_video_games_keeps_a_15_interaction_user_fashion_does_not(tmp_path, amazon_filter_rows):
    write_amazon(tmp_path / "Video_Games.csv", amazon_filter_rows)
    write_amazon(tmp_path / "AMAZON_FASHION.csv", amazon_filter_rows)

    games = load_dataset("video-games", tmp_path)  # default filter: 10
    assert list(games.user_ids) == ["U15", "U20", "UDUP"]
    assert "BONLY15" in set(games.item_ids)
    assert "BONLY9" not in set(games.item_ids)
    assert games.num_items == 21
    assert len(games.interactions) == 15 + 20 + 19
    assert games.interactions.user_degrees().tolist() == [15, 20, 19]

    fashion = load_dataset("fashion", tmp_path)  # default filter: 20, after deduplication
    assert list(fashion.user_ids) == ["U20"]
    assert list(fashion.item_ids) == [f"BCOMMON{k:02d}" for k in range(20)]
    assert len(fashion.interactions) == 20


# ----------------------------------------------------------------------------- preprocessing
def test_deduplicate_keeps_earliest_timestamp():
    raw = pd.DataFrame({"user": [1, 1, 1, 2, 1], "item": [7, 7, 8, 7, 7],
                        "rating": [1.0, 2.0, 3.0, 4.0, 5.0],
                        "timestamp": [300, 100, 50, 999, 200]})
    out = deduplicate(raw)
    got = sorted(zip(out["user"], out["item"], out["timestamp"], out["rating"], strict=True))
    assert got == [(1, 7, 100, 2.0), (1, 8, 50, 3.0), (2, 7, 999, 4.0)]


def test_filter_users_drops_exactly_those_below_threshold():
    degrees = {10: 3, 11: 4, 12: 5, 13: 1}
    users = [u for u, n in degrees.items() for _ in range(n)]
    raw = pd.DataFrame({"user": users, "item": range(len(users)), "rating": 1.0,
                        "timestamp": 0})
    for k, survivors in [(0, {10, 11, 12, 13}), (1, {10, 11, 12, 13}), (4, {11, 12}),
                         (5, {12}), (6, set())]:
        assert set(filter_users(raw, k)["user"]) == survivors


def test_filter_users_rejects_negative_threshold():
    raw = pd.DataFrame({"user": [1], "item": [1], "rating": [1.0], "timestamp": [0]})
    with pytest.raises(FedShareError, match=">= 0"):
        filter_users(raw, -1)


def test_to_implicit_filters_after_dedup_and_drops_orphan_items():
    # user "a": items x, y, y(dup) -> 2 distinct; user "b": items y, z, w -> 3 distinct
    raw = pd.DataFrame({"user": ["a", "a", "a", "b", "b", "b"],
                        "item": ["x", "y", "y", "y", "z", "w"],
                        "rating": 1.0, "timestamp": [5, 9, 1, 2, 3, 4]})
    data, user_ids, item_ids = to_implicit(raw, 3)
    assert list(user_ids) == ["b"]
    assert list(item_ids) == ["w", "y", "z"]  # "x" was touched only by the dropped user "a"
    assert (data.num_users, data.num_items) == (1, 3)
    assert sorted(zip(data.users.tolist(), data.items.tolist(), strict=True)) == [
        (0, 0), (0, 1), (0, 2)]
    data2, _, items2 = to_implicit(raw, 2)
    assert list(items2) == ["w", "x", "y", "z"]
    # "a"'s (a, y) pair keeps its earliest timestamp, 1
    frame = data2.frame
    row = frame[(frame["user"] == 0) & (frame["item"] == 2)]
    assert row["timestamp"].tolist() == [1]


def test_everything_filtered_out(grouplens_100k):
    with pytest.raises(FedShareError, match="no interactions are left after filtering"):
        load_dataset("ml-100k", grouplens_100k)  # default filter 20, every user has <= 3


# ----------------------------------------------------------------------------- input errors
def test_missing_path(tmp_path):
    with pytest.raises(FedShareError, match="not found") as info:
        load_dataset("ml-100k", tmp_path / "nowhere")
    assert "nowhere" in str(info.value)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(FedShareError, match=r"unknown dataset 'netflix'.*ml-100k"):
        load_dataset("netflix", tmp_path)


def test_folder_without_ml100k_files(tmp_path):
    with pytest.raises(FedShareError, match=r"neither u\.data nor ml-100k\.inter"):
        load_dataset("ml-100k", tmp_path)


def test_non_numeric_rating(grouplens_100k):
    (grouplens_100k / "u.data").write_text("1\t2\t3\t100\n1\t3\tfive\t101\n")
    with pytest.raises(FedShareError, match=r"non-numeric or missing rating in data row 2"):
        load_dataset("ml-100k", grouplens_100k, min_user_interactions=0)


def test_missing_timestamp_column(grouplens_100k):
    (grouplens_100k / "u.data").write_text("1\t2\t3\n1\t3\t4\n")
    with pytest.raises(FedShareError, match="timestamp"):
        load_dataset("ml-100k", grouplens_100k, min_user_interactions=0)


def test_extra_column_is_rejected_not_shifted(grouplens_100k):
    # Five tab-separated fields are not the u.data format; they must not be silently read with
    # the first field as an index (which would make user=item, item=rating, ...).
    (grouplens_100k / "u.item").unlink()
    (grouplens_100k / "u.data").write_text("".join(f"1\t{i}\t3\t4\t{100 + i}\n" for i in range(5)))
    with pytest.raises(FedShareError):
        load_dataset("ml-100k", grouplens_100k, min_user_interactions=0)


def test_empty_file(tmp_path):
    (tmp_path / "u.data").write_text("")
    with pytest.raises(FedShareError, match="no interactions") as info:
        load_dataset("ml-100k", tmp_path)
    assert "u.data" in str(info.value)


def test_empty_amazon_file(tmp_path):
    (tmp_path / "AMAZON_FASHION.csv").write_text("")
    with pytest.raises(FedShareError, match=r"AMAZON_FASHION\.csv"):
        load_dataset("fashion", tmp_path)


# ----------------------------------------------------------------------------- bundled ML-100K
def test_bundled_ml100k():
    ds = load_dataset("ml-100k")
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (943, 1682, 100000)
    assert list(ds.user_ids) == list(range(1, 944))
    assert list(ds.item_ids) == list(range(1, 1683))
    assert ds.interactions.user_degrees().min() >= 20
    assert ds.items["title"].iloc[0] == "Toy Story"
    assert ds.items["genres"].iloc[0] == "Animation|Children's|Comedy"
    # ML-100K already guarantees 20 interactions per user: the filter removes nothing
    unfiltered = load_dataset("ml-100k", min_user_interactions=0)
    assert len(unfiltered.interactions) == 100000


def test_ml100k_cache_is_preferred_over_bundled_copy(tmp_path):
    cached = tmp_path / "cache" / "ml-100k"
    cached.mkdir(parents=True)
    (cached / "u.data").write_text("".join(f"3\t{i}\t4\t{i}\n" for i in range(1, 21)))
    ds = load_dataset("ml-100k")
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (1, 20, 20)


# ----------------------------------------------------------------------------- download helpers
def test_fetch_cached_file_with_wrong_md5(tmp_path):
    target = tmp_path / "x.zip"
    target.write_bytes(b"not what was published")
    with pytest.raises(FedShareError, match="checksum"):
        fetch("https://example.invalid/x.zip", target, md5="0" * 32)
    good = hashlib.md5(b"not what was published").hexdigest()
    assert fetch("https://example.invalid/x.zip", target, md5=good) == target


def test_fetch_cached_file_with_changed_recorded_sha256(tmp_path):
    target = tmp_path / "AMAZON_FASHION.csv"
    target.write_text("B1,A1,5.0,1\n")
    (tmp_path / "AMAZON_FASHION.csv.sha256").write_text("0" * 64)
    with pytest.raises(FedShareError, match="checksum"):
        fetch("https://example.invalid/AMAZON_FASHION.csv", target)


def test_extract_zip(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK nonsense")
    with pytest.raises(FedShareError, match="not a valid zip"):
        extract_zip(bad, tmp_path / "out")
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("ml-100k/u.data", "1\t2\t3\t4\n")
    extract_zip(good, tmp_path / "out")
    assert (tmp_path / "out" / "ml-100k" / "u.data").read_text() == "1\t2\t3\t4\n"
