"""bench/reproduce.py and bench/repro/common.py: verdict rules on synthetic numbers, rendering, CLI wiring."""

import json
import math

from bench import reproduce
from bench.repro import common as C


def test_interval_verdict_excludes_and_includes():
    assert C.interval_verdict(0.1, 0.3, 0.5, "contains")[0] == "not reproduced"
    assert C.interval_verdict(0.4, 0.6, 0.5, "contains")[0] == "reproduced"
    assert C.interval_verdict(0.6, 0.9, 0.5, "above")[0] == "reproduced"
    assert C.interval_verdict(0.4, 0.9, 0.5, "above")[0] == "not reproduced"
    assert C.interval_verdict(0.1, 0.4, 0.5, "below")[0] == "reproduced"
    assert C.interval_verdict(0.1, 0.6, 0.5, "below")[0] == "not reproduced"
    assert C.interval_verdict(math.nan, 0.6, 0.5, "below")[0] == "not comparable"
    assert C.interval_verdict(None, None, 0.5, "above")[0] == "not comparable"


def test_all_and_combine():
    assert C.all_verdict({"a": True, "b": True})[0] == "reproduced"
    assert C.all_verdict({"a": True, "b": False})[0] == "not reproduced"
    assert C.all_verdict({"a": True, "b": None})[0] == "not comparable"
    assert C.all_verdict({})[0] == "not comparable"
    r, n, c = ("reproduced", ""), ("not reproduced", ""), ("not comparable", "")
    assert C.combine([r, r])[0] == "reproduced"
    assert C.combine([r, c])[0] == "not comparable"
    assert C.combine([c, n, r])[0] == "not reproduced"


def test_section_rejects_typed_verdict_and_renders():
    try:
        C.section("p", "c", {}, {}, "s", 1, "i", ("probably", "x"), 0)
    except ValueError:
        pass
    else:
        raise AssertionError("an invalid verdict must be rejected")
    s = C.section("Paper A", "claim", {"quote": "x", "v": 0.5}, {"v": 0.7}, "set", 10, "wilson",
                  C.interval_verdict(0.6, 0.8, 0.5, "above"), 3)
    md = C.render_markdown([s, C.not_run("Paper B", "missing")])
    assert "Paper A" in md and "**reproduced**" in md and "not comparable" in md and "Paper B" in md


def test_missing_section_is_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "SECTIONS", reproduce.SECTIONS + ("no_such_section",))
    out = tmp_path / "R.md"
    assert reproduce.main(["--only", "no_such_section", "--out", str(out)]) == 0
    d = json.loads(out.with_suffix(".json").read_text())
    assert d["sections"][0]["verdict"] == "not comparable" and "not run" in d["sections"][0]["reason"]
    assert d["meta"]["seed"] == 0 and "wall_s" in d["sections"][0]


def test_quick_run_end_to_end(tmp_path):
    """The --quick pipeline on one section (the cheapest; every section's own quick mode is run by `make
    reproduce --quick`): each returns a valid section dict with a computed verdict, rendered and saved."""
    out = tmp_path / "R.md"
    assert reproduce.main(["--quick", "--only", "geometry_of_tokens", "--out", str(out)]) == 0
    d = json.loads(out.with_suffix(".json").read_text())
    assert {s["module"] for s in d["sections"]} == {"geometry_of_tokens"}
    for s in d["sections"]:
        assert set(C.KEYS) <= set(s) and s["verdict"] in C.VERDICTS
        assert not s["reason"].startswith("not run"), s["reason"]
    assert out.read_text().startswith("# Reproductions")


def test_merge_keeps_other_sections_and_writes_after_each(tmp_path, monkeypatch):
    """--merge replaces only the sections run now; the table is rewritten after each section (a section that
    dies later cannot lose the earlier ones); each section records its run."""
    calls = []

    def fake_run_one(name, quick, seed, progress=True):
        calls.append(name)
        if name == "microscope":  # the table must already hold the first section when the second runs
            d = json.loads(out.with_suffix(".json").read_text())
            assert [s["module"] for s in d["sections"]][-1] == "geometry_of_tokens"
            assert d["meta"]["pending"] == ["microscope"]
        s = C.section(name, "c", {}, {"v": len(calls)}, "set", 1, "i", C.not_comparable("x"), seed)
        s["module"], s["wall_s"] = name, 0.0
        return [s]

    out = tmp_path / "R.md"
    monkeypatch.setattr(reproduce, "run_one", fake_run_one)
    assert reproduce.main(["--only", "geometry_of_tokens,microscope", "--out", str(out), "--seed", "3"]) == 0
    assert reproduce.main(["--only", "tuned_lens,geometry_of_tokens", "--merge", "--out", str(out)]) == 0
    d = json.loads(out.with_suffix(".json").read_text())
    mods = [s["module"] for s in d["sections"]]
    assert mods == ["geometry_of_tokens", "microscope", "tuned_lens"]  # SECTIONS order, no duplicates
    by = {s["module"]: s for s in d["sections"]}
    assert by["microscope"]["run"]["seed"] == 3 and by["geometry_of_tokens"]["run"]["seed"] == 0
    assert by["geometry_of_tokens"]["ours"]["v"] == 4 and d["meta"]["pending"] == []
    assert "| run |" in out.read_text()
