"""The papers' published numbers (simulations/paper_numbers.toml): counts, cells checked by hand
against the paper text, the claims, and a malformed file refused with one line."""

from __future__ import annotations

import pytest

from fedshare.errors import FedShareError
from simulations.reproduce.paper import (
    COLUMNS,
    load_claims,
    load_paper_numbers,
    paper_value,
)

NUMBERS = load_paper_numbers()

# (paper, table, phase, method, dataset, backbone, metric) -> the cell as printed
BY_HAND = [
    (("fedshare", "III", "learning", "fedshare-fedavg", "ml-1m", "", "hr@20"), 0.4656),
    (("fedshare", "III", "learning", "cdcgnnfed", "fashion", "", "ndcg@20"), 0.0069),
    (("fedshare", "III", "unlearning", "fedshare", "video-games", "", "ndcg@20"), 0.0172),
    (("fedshare", "IV", "learning", "fedshare", "ml-1m", "", "hr@20"), 0.4773),
    (("fedshare", "IV", "learning", "wo-bpr", "video-games", "", "ndcg@20"), 0.018),
    (("fedshare", "IV", "unlearning", "wo-remaining-fl", "video-games", "", "ndcg@20"), 0.0166),
    (("cau", "1", "", "original", "beauty", "gru4rec", "ndcg@10"), 0.0317),
    (("cau", "1", "", "retrain", "video-games", "gru4rec", "recall@10"), 0.0110),
    (("cau", "1", "", "cau-embedding-soft", "ml-1m", "bert4rec", "recall@20"), 0.2946),
    (("cau", "2", "", "original", "beauty", "gru4rec", "hit_u@1"), 0.6961),
    (("cau", "2", "", "sru", "ml-1m", "bert4rec", "hit_u@1"), 0.0042),
    (("cau", "2", "", "cau-embedding-soft", "ml-1m", "bert4rec", "u_score"), 0.6793),
    (("cau", "3", "", "retrain", "video-games", "gru4rec", "minutes"), 30.72),
    (("cau", "3", "", "cau", "video-games", "bert4rec", "minutes"), 2.24),
    (("cau", "4", "", "wo-ps", "beauty", "sasrec", "ndcg@10"), 0.0236),
    (("cau", "4", "", "ga", "video-games", "sasrec", "hit_u@1"), 0.0030),
    # the shifted CAU rows, under their true dataset
    (("cau", "4", "", "cau-embedding-soft", "beauty", "sasrec", "hit_u@1"), 0.0848),
    (("cau", "4", "", "cau-embedding-soft", "video-games", "sasrec", "recall@10"), 0.0974),
    (("cau", "4", "", "cau-gradient-hard", "ml-1m", "sasrec", "u_score"), 0.6616),
]

CLAIMS = [
    "shared-data-helps", "fedshare-learning-best", "fedshare-unlearning-beats-fru-cufru",
    "retrain-upper-bound", "fedshare-time", "fedshare-storage", "ablation-wo-cl",
    "ablation-wo-bpr", "ablation-wo-forgotten-graph", "ablation-wo-remaining-fl",
    "sweep-user-ratio", "sweep-lambda1", "sweep-snapshots", "sweep-gamma", "cau-keeps-recall",
    "cau-forgets-more-than-retrain", "cau-best-u-score", "cau-soft-beats-hard", "cau-time",
    "cau-wo-rl-collapses", "cau-ps-cu-help",
]


def _value(key: tuple[str, ...]) -> float | None:
    paper, table, phase, method, dataset, backbone, metric = key
    return paper_value(NUMBERS, paper=paper, table=table, phase=phase, method=method,
                       dataset=dataset, backbone=backbone, metric=metric)


def test_every_printed_cell_is_there_once():
    assert tuple(NUMBERS.columns) == COLUMNS
    counts = NUMBERS.groupby(["paper", "table"]).size().to_dict()
    assert counts == {("fedshare", "III"): 8 * 3 * 2, ("fedshare", "IV"): 6 * 3 * 2,
                      ("cau", "1"): 8 * 3 * 3 * 4, ("cau", "2"): 8 * 3 * 3 * 3,
                      ("cau", "3"): 4 * 3, ("cau", "4"): 4 * 3 * 4}
    assert len(NUMBERS) == 648


@pytest.mark.parametrize(("key", "printed"), BY_HAND, ids=lambda x: "/".join(x)
                         if isinstance(x, tuple) else None)
def test_cells_checked_by_hand(key, printed):
    assert _value(key) == printed


def test_a_cell_the_paper_does_not_print_is_none():
    assert _value(("fedshare", "III", "", "fedshare", "ml-1m", "", "hr@20")) is None
    assert _value(("cau", "1", "", "fru", "beauty", "sasrec", "ndcg@10")) is None


def test_the_games_retrain_typo_is_kept_and_noted():
    row = NUMBERS[(NUMBERS.table == "1") & (NUMBERS.method == "retrain")
                  & (NUMBERS.dataset == "video-games") & (NUMBERS.backbone == "gru4rec")
                  & (NUMBERS.metric == "recall@10")].iloc[0]
    assert row.value == 0.0110 and "0.1100" in row.note


def test_table_4_cau_rows_equal_their_tables_1_2_cells_and_say_why():
    cau = NUMBERS[(NUMBERS.table == "4") & (NUMBERS.row == "CAU")]
    assert sorted(set(zip(cau.dataset, cau.method, strict=True))) == [
        ("beauty", "cau-embedding-soft"), ("ml-1m", "cau-gradient-hard"),
        ("video-games", "cau-embedding-soft")]
    for cell in cau.itertuples():
        table = "1" if cell.metric == "ndcg@10" or cell.metric.startswith("recall") else "2"
        assert _value(("cau", table, "", cell.method, cell.dataset, "sasrec",
                       cell.metric)) == cell.value
        assert "Tables 1-2" in cell.note


def test_table_iv_fedshare_rows_repeat_table_iii():
    for phase in ("learning", "unlearning"):
        for dataset in ("ml-1m", "fashion", "video-games"):
            for metric in ("hr@20", "ndcg@20"):
                key = ("fedshare", "III", phase, "fedshare", dataset, "", metric)
                assert _value(key) == _value(("fedshare", "IV", *key[2:]))


def test_every_claim_is_listed():
    claims = load_claims()
    assert [c["id"] for c in claims] == CLAIMS
    assert all(set(c) == {"id", "paper", "where", "text"} for c in claims)


GOOD = ('paper = "cau", table = "1", row = "SISA", phase = "", method = "sisa", '
        'dataset = "beauty", backbone = "sasrec", metric = "ndcg@10", value = 0.0055')


def _file(tmp_path, *numbers: str, claims: str = "") -> str:
    path = tmp_path / "numbers.toml"
    path.write_text("number = [\n" + "".join(f"  {{{n}}},\n" for n in numbers) + "]\n" + claims)
    return str(path)


def test_a_good_file_loads(tmp_path):
    numbers = load_paper_numbers(_file(tmp_path, GOOD))
    assert numbers.iloc[0].to_dict()["value"] == 0.0055 and numbers.iloc[0].note == ""


@pytest.mark.parametrize(("entry", "message"), [
    (GOOD.replace('"ndcg@10"', '"ndcg@5"'), "metric 'ndcg@5'"),
    (GOOD.replace('"beauty"', '"yelp"'), "dataset 'yelp'"),
    (GOOD.replace(', backbone = "sasrec"', ""), "missing ['backbone']"),
    (GOOD.replace("0.0055", "1"), "not a float"),
    (GOOD.replace('table = "1"', 'table = "III"'), "no table 'III'"),
    (GOOD + ', metrc = "x"', "unknown ['metrc']"),
])
def test_a_malformed_number_is_refused_naming_it(tmp_path, entry, message):
    with pytest.raises(FedShareError, match="number #2") as e:
        load_paper_numbers(_file(tmp_path, GOOD.replace("beauty", "ml-1m"), entry))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_duplicate_key_is_refused(tmp_path):
    with pytest.raises(FedShareError, match="share the key cau, 1, , sisa, beauty"):
        load_paper_numbers(_file(tmp_path, GOOD, GOOD.replace('"SISA"', '"SISA (again)"')))


def test_unreadable_files_and_bad_claims_are_refused(tmp_path):
    with pytest.raises(FedShareError, match="paper numbers"):
        load_paper_numbers(tmp_path / "absent.toml")
    (tmp_path / "broken.toml").write_text("number = [\n")
    with pytest.raises(FedShareError, match="paper numbers"):
        load_paper_numbers(tmp_path / "broken.toml")
    claim = '[[claim]]\nid = "x"\npaper = "cau"\nwhere = "Sec. 1"\ntext = "A claim."\n'
    with pytest.raises(FedShareError, match=r"claim #2 \(x\): id given twice"):
        load_claims(_file(tmp_path, claims=claim + claim))
    with pytest.raises(FedShareError, match="claim #1"):
        load_claims(_file(tmp_path, claims=claim.replace('text = "A claim."\n', "")))
