"""Readers for the published formats of the paper's datasets, and where to find them.

Each reader returns a raw frame with columns ``user``, ``item`` (publisher ids), ``rating`` and
``timestamp``; :func:`fedshare.data.dataset.load_dataset` turns it into contiguous implicit
interactions. Every parse failure becomes one :class:`FedShareError` naming the file.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedshare.data.download import cache_dir, extract_zip, fetch
from fedshare.errors import FedShareError

RAW_COLUMNS = ["user", "item", "rating", "timestamp"]
GROUPLENS = "https://files.grouplens.org/datasets/movielens"
AMAZON_2018 = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/categoryFilesSmall"


def _read_table(path: Path, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` with every failure turned into one line naming the file."""
    if not path.is_file():
        raise FedShareError(f"dataset file not found: {path}")
    try:
        frame = pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise FedShareError(f"{path} holds no interactions") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedShareError(f"cannot parse {path}: {first}") from None
    if frame.empty:
        raise FedShareError(f"{path} holds no interactions")
    return frame


def _read_fields(path: Path, names: list[str], **kwargs) -> pd.DataFrame:
    """A headerless table that must have exactly ``len(names)`` fields on every row."""
    frame = _read_table(path, header=None, dtype=str, **kwargs)
    if frame.shape[1] != len(names):
        raise FedShareError(f"{path}: expected {len(names)} fields per row, found "
                            f"{frame.shape[1]}")
    frame.columns = names
    return frame


def _validated(frame: pd.DataFrame, path: Path, numeric_ids: bool) -> pd.DataFrame:
    """Check the four raw columns: no missing values, numeric rating and timestamp."""
    if list(frame.columns) != RAW_COLUMNS:
        raise FedShareError(f"{path} does not have the columns {RAW_COLUMNS}")
    numeric = ["rating", "timestamp"] + (["user", "item"] if numeric_ids else [])
    for column in numeric:
        converted = pd.to_numeric(frame[column], errors="coerce")
        if converted.isna().any():
            row = int(converted.isna().to_numpy().argmax()) + 1
            raise FedShareError(f"{path}: non-numeric or missing {column} in data row {row}")
        frame[column] = converted
    if frame[["user", "item"]].isna().any().any():
        raise FedShareError(f"{path}: missing user or item id")
    frame["timestamp"] = frame["timestamp"].astype("int64")
    return frame


# ----------------------------------------------------------------------------- MovieLens-100K
def read_ml100k(path: Path) -> pd.DataFrame:
    """MovieLens-100K from a GroupLens folder (``u.data``), RecBole's atomic ``ml-100k.inter``,
    or either file given directly."""
    path = Path(path)
    if path.is_dir():
        for name in ("u.data", "ml-100k.inter"):
            if (path / name).is_file():
                return read_ml100k(path / name)
        raise FedShareError(f"{path} holds neither u.data nor ml-100k.inter")
    if path.suffix == ".inter":
        frame = _read_table(path, sep="\t", dtype=str)
        expected = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
        if list(frame.columns) != expected:
            raise FedShareError(f"{path}: header is not RecBole's {expected}")
        frame.columns = RAW_COLUMNS
    else:
        frame = _read_fields(path, RAW_COLUMNS, sep="\t")
    return _validated(frame, path, numeric_ids=True)


def read_ml100k_items(path: Path) -> pd.DataFrame:
    """Item metadata (``item``, ``title``, ``genres``) from ``u.item`` or ``ml-100k.item``."""
    path = Path(path)
    if path.is_dir():
        for name in ("u.item", "ml-100k.item"):
            if (path / name).is_file():
                return read_ml100k_items(path / name)
        raise FedShareError(f"{path} holds neither u.item nor ml-100k.item")
    if path.name != "u.item" and path.suffix == ".item":  # RecBole atomic file
        frame = _read_table(path, sep="\t", dtype=str, encoding="latin-1").fillna("")
        return pd.DataFrame({"item": frame.iloc[:, 0], "title": frame.iloc[:, 1],
                             "genres": frame.iloc[:, -1].str.replace(" ", "|")})
    frame = _read_table(path, sep="|", header=None, dtype=str, encoding="latin-1")
    genre_names = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                   "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                   "Romance", "Sci-Fi", "Thriller", "War", "Western"]
    if frame.shape[1] != 5 + len(genre_names):
        raise FedShareError(f"{path}: expected {5 + len(genre_names)} '|'-separated fields")
    flags = frame.iloc[:, 5:].to_numpy() == "1"
    genres = ["|".join(g for g, f in zip(genre_names, row, strict=True) if f) for row in flags]
    return pd.DataFrame({"item": frame[0], "title": frame[1], "genres": genres})


def recbole_ml100k_dir() -> Path | None:
    """The ML-100K copy inside the installed ``recbole`` wheel, found without importing it."""
    try:
        dist = importlib.metadata.distribution("recbole")
    except importlib.metadata.PackageNotFoundError:
        return None
    folder = Path(str(dist.locate_file("recbole/dataset_example/ml-100k")))
    return folder if (folder / "ml-100k.inter").is_file() else None


def default_ml100k() -> Path:
    cached = cache_dir() / "ml-100k"
    if (cached / "u.data").is_file():
        return cached
    if (bundled := recbole_ml100k_dir()) is not None:
        return bundled
    archive = fetch(f"{GROUPLENS}/ml-100k.zip", cache_dir() / "ml-100k.zip",
                    md5="0e33842e24a9c977be4e0107933c0723")
    extract_zip(archive, cache_dir())
    return cached


# ----------------------------------------------------------------------------- MovieLens-1M
def read_ml1m(path: Path) -> pd.DataFrame:
    """MovieLens-1M ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) or its folder."""
    path = Path(path)
    if path.is_dir():
        return read_ml1m(path / "ratings.dat")
    frame = _read_fields(path, RAW_COLUMNS, sep="::", engine="python")
    return _validated(frame, path, numeric_ids=True)


def read_ml1m_items(path: Path) -> pd.DataFrame:
    """``movies.dat`` (``MovieID::Title::Genres``) as ``item``, ``title``, ``genres``."""
    path = Path(path)
    if path.is_dir():
        path = path / "movies.dat"
    frame = _read_table(path, sep="::", header=None, names=["item", "title", "genres"],
                        dtype=str, engine="python", encoding="latin-1")
    return frame


def default_ml1m() -> Path:
    cached = cache_dir() / "ml-1m"
    if not (cached / "ratings.dat").is_file():
        archive = fetch(f"{GROUPLENS}/ml-1m.zip", cache_dir() / "ml-1m.zip",
                        md5="c4d9eecfca2ab87c1945afe126590906")
        extract_zip(archive, cache_dir())
    return cached


# ----------------------------------------------------------------------------- Amazon 2018
AMAZON_FILES = {"fashion": "AMAZON_FASHION.csv", "video-games": "Video_Games.csv"}


def read_amazon(path: Path, category: str) -> pd.DataFrame:
    """Amazon Review Data (2018) ratings-only CSV: ``item,user,rating,timestamp``, no header.

    ``path`` is the CSV itself or a folder holding the category's published file name.
    """
    path = Path(path)
    if path.is_dir():
        path = path / AMAZON_FILES[category]
    frame = _read_fields(path, ["item", "user", "rating", "timestamp"])
    return _validated(frame[RAW_COLUMNS].copy(), path, numeric_ids=False)


def default_amazon(category: str) -> Path:
    name = AMAZON_FILES[category]
    return fetch(f"{AMAZON_2018}/{name}", cache_dir() / "amazon-2018" / name)


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class DatasetSource:
    """How to read one dataset and where its files are by default.

    ``min_user_interactions`` is the paper's filter (Sec. V-A): 20 for ML-1M and Fashion, 10 for
    Video Games; ML-100K already guarantees 20 per user, so its filter removes nothing.
    """

    name: str
    read: Callable[[Path], pd.DataFrame]
    default_path: Callable[[], Path]
    min_user_interactions: int
    read_items: Callable[[Path], pd.DataFrame] | None = None


SOURCES: dict[str, DatasetSource] = {
    "ml-100k": DatasetSource("ml-100k", read_ml100k, default_ml100k, 20, read_ml100k_items),
    "ml-1m": DatasetSource("ml-1m", read_ml1m, default_ml1m, 20, read_ml1m_items),
    "fashion": DatasetSource("fashion", lambda p: read_amazon(p, "fashion"),
                             lambda: default_amazon("fashion"), 20),
    "video-games": DatasetSource("video-games", lambda p: read_amazon(p, "video-games"),
                                 lambda: default_amazon("video-games"), 10),
}


def source(name: str) -> DatasetSource:
    if name not in SOURCES:
        raise FedShareError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[name]
