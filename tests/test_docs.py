# SPDX-License-Identifier: AGPL-3.0-or-later
"""The docs cannot go stale: every measured figure in README.md and docs/ comes from a results file under
bench/results/, no generated page is older than its results files, and every link resolves. Fast: no cluster, no
model; ``bench/docs_pages.py`` (the generator) holds the rule, and the last tests check that it catches what it must."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import docs_pages as dp

ROOT = Path(__file__).resolve().parents[1]
SPDX = "<!-- SPDX-License-Identifier: AGPL-3.0-or-later -->"
REGENERATE = "run .venv/bin/python bench/docs_pages.py"


def _report(findings: list) -> str:
    return "\n".join(str(f) for f in findings)


# --- the repository's docs -------------------------------------------------------------------------------------------


def test_generated_pages_are_as_their_results_files_make_them():
    stale = dp.stale_pages(ROOT)
    assert not stale, (f"pages older than their templates or results files ({REGENERATE}):\n"
                       + "\n".join(stale.values()))


def test_no_page_claims_to_be_generated_without_a_template():
    assert not dp.orphan_pages(ROOT)


def test_every_measured_figure_comes_from_a_results_file():
    findings = dp.figure_findings(ROOT)
    assert not findings, ("figures typed by hand: write each as a placeholder of its results file in the page's "
                          "template under docs/src (or, for a default or a bar, add its phrase to SETTINGS in "
                          "bench/docs_pages.py):\n" + _report(findings))


def test_every_allowed_phrase_is_used():
    assert not dp.unused_settings(ROOT), _report(dp.unused_settings(ROOT))


def test_links_resolve():
    assert not dp.broken_links(ROOT), _report(dp.broken_links(ROOT))


def test_every_page_starts_with_the_license_header():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert [p.relative_to(ROOT) for p in pages if p.read_text().split("\n", 1)[0] != SPDX] == []


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 300
    assert not any(line.startswith("|") for line in lines), "benchmark tables belong in docs/benchmarks"


def test_every_results_file_is_quoted_somewhere():
    quoted = {body["file"] for t in dp.templates(ROOT) for m in dp.PLACEHOLDER.finditer(t.read_text())
              if (body := dp._PLACEHOLDER_BODY.match(m[1])) is not None}
    results = {p.name for p in (ROOT / "bench" / "results").glob("*.json")}
    assert results - quoted == set(), "results files no page quotes"


# --- the rule itself --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, figures", [
    ("decode 41.2 tok/s", ["41.2 tok/s"]),
    ("load took 3 s, then 12 ms", ["3 s", "12 ms"]),
    ("1.06-1.17x raw RPC", ["1.06-1.17x"]),
    ("a ratio of 0.947 here", ["0.947"]),
    ("grew by 491 MiB\n(the file)", ["491 MiB"]),
    ("at 2.5\nGiB", ["2.5 GiB"]),
    ("| setup | tok/s |\n|:---|---:|\n| mesh | 35 |", ["35"]),
    ("`--max-memory 12GiB` and ```\n3.5 s\n``` and <!-- 4 s -->", []),
    ("llama-cpp-python 0.3.36, TLSv1.3, Gemma 3 270M, 8 streams, 2-core host, 128k vocabulary", []),
    ("[a link](bench/results/x-1.5.json)", []),
    ("the cache cap, default 10 GiB, is a setting", []),
    ("a download waits for `token_timeout` (60 s)", []),
    ("(60 s)", ["60 s"]),  # a phrase is allowed only whole
])
def test_the_figure_rule(text, figures):
    assert [fig for _, fig in dp.untraced_figures(text)] == figures


def test_a_placeholder_hides_its_figure_and_says_where_it_is():
    text = "a\nload {{ load.json: x | .1f }} s,\ncold 4.8 s"
    assert dp.untraced_figures(text) == [(3, "4.8 s")]


# --- the test of the test: a small repository in a temporary directory ----------------------------------------------


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "src" / "benchmarks").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "speed.json").write_text(json.dumps(
        {"machine": {"date": "2026-12-01T10:00:00"}, "runs": [{"tok_s": 41.25, "load_s": 2.5}, {"tok_s": 39.0}]}))
    (tmp_path / "docs" / "src" / "benchmarks" / "speed.md").write_text(
        f"{SPDX}\n# Speed\n\nDecode {{{{ speed.json: runs[0].tok_s | .1f }}}} tok/s, best of "
        "{{ speed.json: len(runs) }} runs, [back](../index.md).\n")
    (tmp_path / "docs" / "index.md").write_text(f"{SPDX}\n# Docs\n\nSee [speed](benchmarks/speed.md).\n")
    (tmp_path / "README.md").write_text(f"{SPDX}\n# Project\n\nSee [the docs](docs/index.md).\n")
    assert dp.write_pages(tmp_path) == [tmp_path / "docs" / "benchmarks" / "speed.md"]
    return tmp_path


def _problems(root: Path) -> str:
    out: list[str] = []
    ok = dp.check(root, out.append)
    # the repository's SETTINGS phrases do not occur in this small one: leave that complaint out
    return "" if ok else "".join(x for x in out if "SETTINGS phrase" not in x)


def test_a_rendered_page_names_its_sources_and_passes(repo):
    page = (repo / "docs" / "benchmarks" / "speed.md").read_text()
    assert page.split("\n")[0] == SPDX
    assert "docs/src/benchmarks/speed.md" in page.split("\n")[1]
    assert "bench/results/speed.json (2026-12-01)" in page.split("\n")[1]
    assert "Decode 41.2 tok/s, best of 2 runs" in page
    assert _problems(repo) == ""


def test_a_figure_typed_into_a_template_fails(repo):
    src = repo / "docs" / "src" / "benchmarks" / "speed.md"
    src.write_text(src.read_text() + "\nThe mesh loads in 2.5 s.\n")
    dp.write_pages(repo)
    assert "docs/src/benchmarks/speed.md:6: measured figure '2.5 s'" in _problems(repo)


def test_a_figure_typed_into_a_hand_written_page_or_the_readme_fails(repo):
    (repo / "docs" / "index.md").write_text(f"{SPDX}\n# Docs\n\nIt decodes at 38.5 tok/s.\n")
    (repo / "README.md").write_text(f"{SPDX}\n# Project\n\nUp to 2.58x faster.\n")
    problems = _problems(repo)
    assert "docs/index.md:4: measured figure '38.5 tok/s'" in problems
    assert "README.md:4: measured figure '2.58x'" in problems


def test_a_figure_edited_by_hand_in_a_generated_page_fails(repo):
    page = repo / "docs" / "benchmarks" / "speed.md"
    page.write_text(page.read_text().replace("41.2 tok/s", "45.0 tok/s"))
    problems = _problems(repo)
    assert "docs/benchmarks/speed.md is stale" in problems
    assert "-Decode 45.0 tok/s" in problems and "+Decode 41.2 tok/s" in problems


def test_a_page_older_than_its_results_file_fails_until_written_again(repo):
    results = repo / "bench" / "results" / "speed.json"
    doc = json.loads(results.read_text())
    doc["runs"][0]["tok_s"] = 52.0
    results.write_text(json.dumps(doc))
    assert "docs/benchmarks/speed.md is stale" in _problems(repo)
    assert dp.main(["--check", "--root", str(repo)]) == 1
    dp.write_pages(repo)
    assert "Decode 52.0 tok/s" in (repo / "docs" / "benchmarks" / "speed.md").read_text()
    assert _problems(repo) == ""


def test_a_placeholder_without_its_figure_fails_to_render(repo):
    src = repo / "docs" / "src" / "benchmarks" / "speed.md"
    template = src.read_text()
    src.write_text(template + "\n{{ speed.json: runs[1].load_s | .1f }} s\n")
    with pytest.raises(dp.RenderError, match=r"runs\[1\]\.load_s.*no key 'load_s'"):
        dp.render_all(repo)
    src.write_text(template + "\n{{ missing.json: x }}\n")
    with pytest.raises(dp.RenderError, match="no results file"):
        dp.render_all(repo)


def test_a_generated_page_without_its_template_fails(repo):
    (repo / "docs" / "src" / "benchmarks" / "speed.md").unlink()
    assert "says it is generated, but no template" in _problems(repo)


def test_a_broken_link_fails(repo):
    (repo / "docs" / "index.md").write_text(f"{SPDX}\n# Docs\n\nSee [gone](gone.md) and [here](#nowhere).\n")
    problems = _problems(repo)
    assert "docs/index.md:4: link to 'gone.md': no such file" in problems
    assert "docs/index.md:4: link to '#nowhere': no such heading" in problems
