"""Prices a user can find and use: where ``score`` put them, ``vggprice prices`` (one row
per image, superseded rows left out, the rejected files with their reasons), and the
CLI's small things (a store directory that is not there, ``score-new`` with nothing to
do, ``--help``, tables of metrics, the drop report)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from flows.cli import _human, build_parser, main
from tasks.reports import drop_markdown, plots_markdown
from tasks.scoring.ledger import ScoreOptions, pending, plan_work
from tasks.scoring.prices import Prices, current_prices, write_prices
from tasks.scoring.runner import locate_drop, score_drop
from tasks.scoring.shard import PRICED_SCHEMA, REJECTED_SCHEMA, score_shard
from tests.conftest import TinyLake, copy_lake
from tests.test_scoring import _save, bad_files, garment, put_drop


@pytest.fixture
def local_store(tiny_lake, tmp_path) -> TinyLake:
    return tiny_lake._replace(lake=copy_lake(tiny_lake.lake, str(tmp_path / "lake")))


def _images(n: int) -> dict[str, bytes]:
    """``n`` distinct garments (each its own price input)."""
    return {f"img-{i}.png": _save(Image.fromarray(garment((20 + 4 * i, 28))), "PNG")
            for i in range(n)}  # fmt: skip


def test_current_prices_one_row_per_image_while_repriced_and_after(local_store):
    """An image overwritten in place is priced again: before the drop is finished again
    its older row is still in its part and is left out; afterwards the finisher moved
    it to superseded.parquet. Either way one current row per image, the newer price."""
    lake, mv = local_store.lake, local_store.model_version
    good = _images(4)
    bad = {k: v for k, (v, _) in bad_files().items() if k in ("empty.png", "text.jpg")}
    put_drop(lake, "p1", good | bad)
    options = ScoreOptions(shard_size=2)
    score_drop(lake, "p1", options=options)
    first = current_prices(lake, "p1")
    assert first.finished and first.model_version == mv and first.superseded == 0
    assert sorted(first.prices["key"].to_pylist()) == sorted(good)
    reasons = dict(zip(*(first.rejected[c].to_pylist() for c in ("key", "reason")), strict=True))
    assert set(reasons) == set(bad) and "empty file" in reasons["empty.png"]
    assert first.uri == lake.score_run("p1", mv).uri() and first.uri.startswith(lake.uri)
    old = dict(zip(*(first.prices[c].to_pylist() for c in ("key", "price")), strict=True))

    # img-0 overwritten with another garment; its new plan priced, the drop not finished.
    put_drop(lake, "p1", {"img-0.png": _save(Image.fromarray(garment((60, 28))), "PNG")})
    run, source = lake.score_run("p1", mv), locate_drop(lake, "p1")
    plans = plan_work(run, source.listing()[0], options.shard_size)
    (shard, entries), = pending(run, plans).items()  # fmt: skip
    assert [key for key, _ in entries] == ["img-0.png"]
    score_shard(run, source, shard, entries, options, "test:1")
    new_price = run.part(shard)["price"].to_pylist()[0]
    assert new_price != pytest.approx(old["img-0.png"]), "the test needs a price that changed"
    during = current_prices(lake, "p1")
    assert not during.finished and during.superseded == 1
    keys = during.prices["key"].to_pylist()
    assert sorted(keys) == sorted(good) and len(keys) == len(set(keys)), "one row per image"
    now = dict(zip(*(during.prices[c].to_pylist() for c in ("key", "price")), strict=True))
    assert now["img-0.png"] == pytest.approx(new_price)
    assert all(now[k] == pytest.approx(old[k]) for k in good if k != "img-0.png")

    score_drop(lake, "p1", options=options)  # finishes: the older row moves out
    after = current_prices(lake, "p1")
    assert after.finished and run.superseded().num_rows == 1 and after.superseded == 1
    assert after.prices.sort_by("key").equals(during.prices.sort_by("key"))
    assert sorted(after.rejected["key"].to_pylist()) == sorted(bad)


def test_prices_files_read_back_and_bad_out(local_store, tmp_path):
    lake = local_store.lake
    put_drop(lake, "p2", _images(3) | {"empty.png": b""})
    score_drop(lake, "p2", options=ScoreOptions(shard_size=2))
    prices = current_prices(lake, "p2")
    for suffix, read in ((".csv", pd.read_csv), (".parquet", pd.read_parquet)):
        written = write_prices(prices, tmp_path / f"prices{suffix}")
        assert written["rejected"] == str(tmp_path / f"prices-rejected{suffix}")
        table, rejected = read(written["prices"]), read(written["rejected"])
        assert sorted(table["key"]) == sorted(_images(3)) and table["price"].notna().all()
        assert list(table.columns) == ["key", "object", "price", "model_version", "scored_at",
                                       "engine", "precision"]  # fmt: skip
        assert list(rejected["key"]) == ["empty.png"] and "empty file" in rejected["reason"][0]
    with pytest.raises(ValueError, match=r"prices\.txt: --out must end in \.csv or \.parquet"):
        write_prices(prices, tmp_path / "prices.txt")
    with pytest.raises(ValueError, match="no directory .*nowhere"):
        write_prices(prices, tmp_path / "nowhere" / "prices.csv")


def _priced(keys: list[str], prices: list[float]) -> Prices:
    """A drop's prices as ``current_prices`` returns them, for these keys."""
    now = datetime.datetime.now(datetime.UTC)
    n = len(keys)
    priced = pa.table({"key": keys, "object": keys, "price": prices, "model_version": ["m"] * n,
                       "scored_at": [now] * n, "engine": ["keras"] * n,
                       "precision": ["float32"] * n}, schema=PRICED_SCHEMA)  # fmt: skip
    rejected = pa.table({"key": ["-bad.png"], "object": ["-bad.png"], "reason": ["empty file"],
                         "model_version": ["m"], "scored_at": [now]}, schema=REJECTED_SCHEMA)  # fmt: skip
    return Prices("d", "m", "file:///lake/scores", True, priced, rejected, 0)


def test_csv_cells_a_spreadsheet_would_run_are_escaped_and_numbers_stay_numbers(tmp_path):
    keys = ['=HYPERLINK("http://x","y")', "@SUM(1)", "+1", "\tx", "plain.png", "a=b.png"]
    written = write_prices(_priced(keys, [1.5, -2.25, 3.0, 4.0, 5.0, 6.0]), tmp_path / "p.csv")
    table = pd.read_csv(written["prices"], keep_default_na=False)
    assert list(table["key"]) == ["'" + k for k in keys[:4]] + keys[4:]
    assert list(table["object"]) == list(table["key"])
    assert list(table["price"]) == [1.5, -2.25, 3.0, 4.0, 5.0, 6.0], "numbers stay numbers"
    assert list(pd.read_csv(written["rejected"])["key"]) == ["'-bad.png"]
    parquet = pd.read_parquet(
        write_prices(_priced(keys, [1.0] * 6), tmp_path / "p.parquet")["prices"]
    )
    assert list(parquet["key"]) == keys, "Parquet holds the keys as they are"


def test_a_failed_export_leaves_the_previous_file_whole(tmp_path):
    keys = ["a.png", "b.png"]
    for suffix in (".csv", ".parquet"):
        out = tmp_path / f"p{suffix}"
        write_prices(_priced(keys, [1.0, 2.0]), out)
        before = out.read_bytes()
        good = _priced(keys, [3.0, 4.0])
        # A column neither writer takes (the CSV writer has opened the file by then).
        broken = good.prices.append_column("bad", pa.array([{}, {}], pa.struct([])))
        with pytest.raises((pa.ArrowInvalid, pa.ArrowNotImplementedError)):
            write_prices(dataclasses.replace(good, prices=broken), out)
        assert out.read_bytes() == before, f"{out.name}: the previous export is intact"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p-rejected.csv", "p-rejected.parquet",
                                                          "p.csv", "p.parquet"]  # fmt: skip


def test_prices_command(local_store, tmp_path, capsys):
    lake, mv = local_store.lake, local_store.model_version
    store = lake.uri
    put_drop(lake, "p3", _images(3) | {"text.jpg": b"not a jpeg"})
    score_drop(lake, "p3", options=ScoreOptions(shard_size=2))
    capsys.readouterr()
    assert main(["prices", "p3", "--store", store]) == 0
    out = capsys.readouterr().out
    assert f"scores_uri: {lake.score_run('p3', mv).uri()}" in out
    assert re.search(r"^\s+key\s+price$", out, re.M), out  # the first rows, as a table
    # two decimals; the tiny test model's prices can be below zero
    assert re.search(r"^\s+img-0\.png\s+-?\d+\.\d\d$", out, re.M), out
    assert re.search(r"^\s+text\.jpg\s+not an image", out, re.M), out

    target = tmp_path / "out" / "p3.parquet"
    target.parent.mkdir()
    assert main(["prices", "p3", "--store", store, "--model-version", mv, "--out", str(target),
                 "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["counts"] == {"priced": 3, "rejected": 1, "superseded": 0}
    assert result["written"]["prices"] == str(target)
    assert len(pd.read_parquet(target)) == 3
    assert len(pd.read_parquet(tmp_path / "out" / "p3-rejected.parquet")) == 1

    cases = [
        (["prices", "never-scored"], "has no prices by"),
        (["prices", "p3", "--out", str(tmp_path / "p.xlsx")], "--out must end in .csv"),
        (["prices", "p3", "--model-version", "m-nope"], "(known: "),
    ]
    for args, expected in cases:
        assert main([*args, "--store", store]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vggprice: error: ") and expected in err[0]


def test_read_commands_name_a_missing_store_directory(tmp_path, capsys):
    missing = tmp_path / "no-such-dir" / "lake"
    for command in (["champion"], ["score", "d1"], ["score-new"], ["prices", "d1"]):
        assert main([*command, "--store", str(missing)]) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert f"{missing}: the store directory does not exist" in err[0], err
    assert not missing.parent.exists(), "nothing written"
    missing.mkdir(parents=True)  # there and empty: what is missing is a champion
    assert main(["champion", "--store", str(missing)]) == 2
    assert "no champion in" in capsys.readouterr().err


@pytest.mark.usefixtures("prefect_server")
def test_score_says_where_the_prices_are_and_score_new_when_nothing_is_left(local_store, capsys):
    lake, mv = local_store.lake, local_store.model_version
    put_drop(lake, "n1", _images(2))
    put_drop(lake, "n2", _images(1))
    capsys.readouterr()
    assert main(["score", "n1", "--store", lake.uri, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scores_uri"] == lake.score_run("n1", mv).uri()
    assert lake.store.list(f"scores/n1/{mv}/part-"), "the parts are under it"
    assert main(["score-new", "--store", lake.uri]) == 0
    out = capsys.readouterr().out
    assert f"n2: {lake.score_run('n2', mv).uri()}" in out, out
    assert main(["score-new", "--store", lake.uri]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"nothing to price: every drop (n1, n2) is already priced by {mv} (line demo)"]


def test_help_shows_no_markup():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for text in [parser.format_help(), *(p.format_help() for p in sub.choices.values())]:
        assert "``" not in text, text


def test_metrics_tables_are_rounded_tables():
    from tasks.data.loading import Split
    from tasks.governance.evaluation import catalog_metrics

    rng = np.random.default_rng(0)
    true = rng.uniform(0, 100, 200)
    test = Split(ids=[], images=np.zeros(0), classes=np.zeros(200, int), price=true, y=true / 100)
    metrics = catalog_metrics(test, true + rng.normal(0, 5, 200), {"min": 0, "max": 100}, 50.0,
                              rng.uniform(0, 100, 500))  # fmt: skip
    text = _human({"evaluate": metrics})
    assert "{" not in text and "'" not in text, text
    lines = text.splitlines()
    (header,) = [i for i, ln in enumerate(lines) if ln.split()[:2] == ["group", "count"]]
    rows = lines[header + 1 : header + 11]
    assert len(rows) == 10 and all(ln.lstrip().startswith("decile") for ln in rows), rows
    numbers = [w for ln in rows for w in re.findall(r"\d+\.\d+(?=\s|$)", ln.split(")", 1)[1])]
    assert numbers and all(len(w.split(".")[1]) <= 4 for w in numbers), numbers
    assert not re.search(r"\.\d{6,}", text), "every float rounded"


def _manifest(rejections: dict) -> dict:
    return {
        "drop_id": "d", "model_version": "m-1", "skipped_keys": 0, "rejections": rejections,
        "counts": {"listed": 3, "priced": 3 - sum(rejections.values()),
                   "rejected": sum(rejections.values())},
        "prices": {"quantiles": {"p50": 10.0}, "mean": 10.0},
        "drift": {"pixel_out_of_range_fraction": 0.0, "price_out_of_range_fraction": 0.5,
                  "flagged": True},
        "scorer_counts": {"host:1": 2},
    }  # fmt: skip


def test_drop_report_drift_on_one_line_and_rejections_only_when_there_are_some():
    clean = drop_markdown(_manifest({}), 10.0)
    assert "rejection reason" not in clean
    (drift,) = [ln for ln in clean.splitlines() if "Drift" in ln or "brightness" in ln]
    assert drift.startswith("Drift: **looks unlike") and drift.endswith("price range).")
    some = drop_markdown(_manifest({"empty file": 1}), 10.0)
    assert "| rejection reason | images |" in some and "| empty file | 1 |" in some


def test_stored_copies_are_links_only_on_the_web():
    shown = plots_markdown({"a": (b"png", "/home/me/lake/plots/a.png"),
                            "b": (b"png", "s3://bucket/lake/plots/b.png"),
                            "c": (b"png", "https://example.com/c.png")})  # fmt: skip
    targets = re.findall(r"\]\(([^)]*)\)", shown)
    assert [t for t in targets if not t.startswith("data:")] == ["https://example.com/c.png"]
    assert "Stored copy: `/home/me/lake/plots/a.png`" in shown
    assert "Stored copy: `s3://bucket/lake/plots/b.png`" in shown
