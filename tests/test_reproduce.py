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
