"""The BoostLU paper's published numbers as data: complete, consistent, mapped onto our configurations."""
import math

import pytest

from orchestration.report import paper, paper_boostlu as pb
from wsml.config import LL_SCHEMES, MODES, SCHEMES

TABLES = [(pb.SINGLE_POSITIVE_ROWS, pb.SINGLE_POSITIVE, pb.DATASETS),
          (pb.OPENIMAGES_ROWS, pb.OPENIMAGES, pb.OPENIMAGES_GROUPS)]


@pytest.mark.parametrize("rows,values,columns", TABLES)
def test_every_row_has_every_column(rows, values, columns):
    assert set(values) == {(key, col) for key in rows for col in columns}
    assert all(isinstance(v, float) and 0 < v < 100 and math.isclose(v, round(v, 2)) for v in values.values())


@pytest.mark.parametrize("rows,values,columns", TABLES)
def test_rows_map_onto_our_configurations(rows, values, columns):
    ours = [(r.scheme, r.mode, r.boostlu) for r in rows.values() if r.scheme is not None]
    assert len(ours) == len(set(ours))                        # one row per configuration of ours
    assert all(s in SCHEMES and m in MODES for s, m, _ in ours)
    for key, row in rows.items():
        if row.scheme is not None:
            assert pb.row_key(row.scheme, row.mode, row.boostlu, rows) == key
    # BoostLU rows: exactly one per large-loss scheme, each right below its own row, and better than it
    keys = list(rows)
    boosted = [k for k, r in rows.items() if r.boostlu]
    assert [rows[k].scheme for k in boosted] == list(LL_SCHEMES)
    for key in boosted:
        base = rows[key].scheme
        assert keys.index(key) == keys.index(base) + 1 and not rows[base].boostlu
        assert key == f"{base} + BoostLU" and rows[base].mode == rows[key].mode == "end-to-end"
        assert all(values[(key, c)] > values[(base, c)] for c in columns)   # the paper's claim, as printed


def test_single_positive_rows_and_names():
    rows = pb.SINGLE_POSITIVE_ROWS
    assert {k for k, r in rows.items() if r.scheme is None} == {"ASL"}
    assert (rows["EM"].scheme, rows["EM + APL"].scheme) == ("EM", "EM+APL")     # wsml/schemes.py
    assert rows["LS"].scheme == "LSAN"
    assert (rows["ROLE + LinearInit"].scheme, rows["ROLE + LinearInit"].mode) == ("ROLE", "linear-init")
    assert pb.row_key("LL-R", "linear-init", False) is None   # the paper has no LinearInit LL rows
    assert set(pb.DATASETS) == set(paper.PAPER_DATASETS)
    assert all(pb.DATASET_LABELS[d] == paper.DATASET_LABELS[d] for d in pb.DATASETS)
    # full labels bound every column
    for ds in pb.DATASETS:
        assert pb.single_positive("full", ds) == max(pb.SINGLE_POSITIVE[(k, ds)] for k in rows)


def test_openimages_uses_the_groups_of_the_first_paper():
    assert pb.OPENIMAGES_GROUPS == paper.OPENIMAGES_GROUPS
    assert set(paper.OPENIMAGES_METRICS) == set(pb.OPENIMAGES_GROUPS)
    assert pb.openimages("LL-Cp + BoostLU", "All") == max(pb.OPENIMAGES[(k, "All")] for k in pb.OPENIMAGES_ROWS)
    assert pb.openimages("LL-R", "G6") is None and pb.single_positive("LL-R", "openimages") is None
