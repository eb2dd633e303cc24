"""Drop ids are names in the store, never paths: a folder under drops/ named '~', '~root'
or '.x' is read from the store (or skipped as not a drop), never from a home directory
or the working directory; one bad drop never stops a scan; drops are listed by folder."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from flows.cli import main
from flows.score import score_new_drops_flow
from tasks.scoring.ledger import DropError
from tasks.scoring.runner import locate_drop
from tasks.store.lake import Lake
from tasks.store.storage import LocalStore, open_store
from tests.conftest import copy_lake
from tests.test_scoring import _save, garment, put_drop


@pytest.fixture
def scored_store(store_uri, tiny_lake):
    """The session's tiny model as champion, in a store of its own (local, then S3)."""
    return tiny_lake._replace(lake=copy_lake(tiny_lake.lake, store_uri))


def _png(size=(28, 28)) -> bytes:
    return _save(Image.fromarray(garment(size)), "PNG")


def _listed(lake: Lake, drop: str, mv: str) -> list[str]:
    return [key for key, _, _ in lake.score_run(drop, mv).manifest()["listing"]]


@pytest.mark.usefixtures("prefect_server")
def test_score_new_reads_every_drop_from_the_store(scored_store, tmp_path, monkeypatch):
    """Drops '.x', '~', '~root' and 'zz': the hidden one is skipped with its reason, the
    others are priced from the store (the banner in zz too); the home directory, where a
    photo lies, is never read. Before: the scan stopped at '.x' and priced nothing."""
    lake, mv = scored_store.lake, scored_store.model_version
    home = tmp_path / "home"
    home.mkdir()
    (home / "home.png").write_bytes(_png())
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # where a '.x' path would be looked for
    put_drop(lake, ".x", {"a.png": _png()})
    put_drop(lake, "~", {"in-store.png": _png()})
    put_drop(lake, "~root", {"r.png": _png()})
    put_drop(lake, "zz", {"g.png": _png(), "banner.png": _png((2016, 10))})

    result = score_new_drops_flow(store=lake.uri)
    assert set(result["scored"]) == {"~", "~root", "zz"}, result
    assert list(result["not_drops"]) == [".x"] and "hidden" in result["not_drops"][".x"]
    assert "failed" not in result
    assert _listed(lake, "~", mv) == ["in-store.png"], "the store's drop, not the home"
    assert _listed(lake, "~root", mv) == ["r.png"]
    assert result["scored"]["zz"] == {"listed": 2, "priced": 2, "rejected": 0}, "the banner"
    assert not any("home.png" in o.key for o in lake.store.list()), "nothing of the home"
    assert not lake.store.keys("scores/.x"), "the hidden folder is not priced"
    # The names are names for every caller but a person's typed argument.
    assert locate_drop(lake, "~").prefix == "drops/~/"
    assert locate_drop(lake, "~", from_user=True).prefix == "drops/~/", "the store has it"
    again = score_new_drops_flow(store=lake.uri)
    assert again["scored"] == {} and "; skipped, not drops: .x (a hidden folder" in again["message"]


def test_a_drop_id_is_never_a_path(tmp_path, monkeypatch):
    lake = Lake(LocalStore(tmp_path / "lake"))
    put_drop(lake, "d1", {"a.png": b"x"})
    folder = tmp_path / "photos"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ("/etc", "./photos", ".", "..", "a/b", "a\\b", "tab\there", ".x", ""):
        with pytest.raises(DropError, match="invalid drop id"):
            locate_drop(lake, name)
    typed = locate_drop(lake, "./photos", from_user=True)  # a person's path: a directory
    assert typed.store.uri == str(folder.resolve()) and typed.drop_id.startswith("photos-")
    assert locate_drop(lake, "d1", from_user=True).prefix == "drops/d1/"
    assert lake.drop_ids() == ["d1"]


@pytest.mark.usefixtures("prefect_server")
def test_one_bad_drop_never_stops_the_scan(tiny_lake, tmp_path, capsys):
    """A drop whose ledger is torn fails alone: the drops after it are priced, the
    command exits 1 with one line for it, and a hidden folder is reported skipped.
    Before: the scan stopped at the torn drop and c3 was never priced."""
    lake, mv = copy_lake(tiny_lake.lake, str(tmp_path / "lake")), tiny_lake.model_version
    for drop in ("a1", "bad", "c3"):
        put_drop(lake, drop, {"g.png": _png()})
    put_drop(lake, ".ipynb_checkpoints", {"g.png": _png()})
    lake.store.put_bytes(f"scores/bad/{mv}/_plans/00000001.json", b"{torn")
    capsys.readouterr()
    assert main(["score-new", "--store", lake.uri]) == 1
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("vggprice: error:")]
    assert len(errors) == 1 and errors[0].startswith("vggprice: error: drop bad: not priced: ")
    for drop in ("a1", "c3"):
        assert lake.score_run(drop, mv).manifest()["counts"]["priced"] == 1, drop
        assert f"{drop}: {lake.score_run(drop, mv).uri()}" in out, out
    assert ".ipynb_checkpoints: a hidden folder" in out, out


def test_drops_are_listed_by_folder(s3_uri):
    """One listing call for drops/, however many objects the drops hold (before: every
    object, page by page, and an object right under drops/ was taken for a drop)."""
    lake = Lake(open_store(s3_uri))
    keys = [f"drops/big/{i:04d}.png" for i in range(1001)]
    keys += ["drops/", "drops/loose.png", "drops/small/a.png", "drops/~/b.png"]
    store = lake.store
    with ThreadPoolExecutor(8) as pool:  # (a bare "drops/" marker is no key of the store)
        list(pool.map(lambda k: store.client.put_object(Bucket=store.bucket, Key=store.prefix + k,
                                                        Body=b"x"), keys))  # fmt: skip
    calls = []
    lake.store.client.meta.events.register(
        "provide-client-params.s3.ListObjectsV2", lambda params, **_: calls.append(params)
    )
    assert lake.drop_ids() == ["big", "small", "~"]
    assert len(calls) == 1 and calls[0]["Delimiter"] == "/", calls


def test_events_name_drops_not_paths(s3_uri):
    """The bridge makes no event for a folder that is not a drop (its run would fail),
    '~' is a drop like any other, and notify refuses what cannot be one."""
    import json

    from tasks.scoring.arrivals import check_drop_id, drops_in_message

    store = open_store(s3_uri)
    records = [{"eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": store.bucket}, "object": {"key": f"lake/drops/{d}/a.png"}}}
               for d in (".x", "~", "~root", "a%5Cb")]  # fmt: skip
    assert drops_in_message(Lake(store), json.dumps({"Records": records})) == {
        "~": False, "~root": False}  # fmt: skip
    assert check_drop_id("~") == "~"
    for name in (".x", "a\\b", "..", "tab\there"):
        with pytest.raises(ValueError, match="invalid drop id"):
            check_drop_id(name)
