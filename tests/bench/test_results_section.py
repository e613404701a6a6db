"""One benchmark's section of RESULTS.md: replaced in place, appended when new, others kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.results_md import keep_other_sections, replace_section

BEFORE = ("# Benchmark results\n\n## Summary\n\nsummary\n\n## Mine\n\nold\nlines\n\n"
          "## Last\n\nlast\n")


def test_replaces_only_its_own_section(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(BEFORE)
    replace_section("## Mine\n\nnew\n", path)
    assert path.read_text() == (
        "# Benchmark results\n\n## Summary\n\nsummary\n\n## Mine\n\nnew\n\n## Last\n\nlast\n")
    replace_section("## Mine\n\nnew\n", path)  # idempotent
    assert path.read_text().count("## Mine") == 1


def test_last_section_and_append(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(BEFORE)
    replace_section("## Last\n\nfresh", path)
    replace_section("## New\n\nadded\n", path)
    text = path.read_text()
    assert text.endswith("## Last\n\nfresh\n\n## New\n\nadded\n")
    assert "## Mine\n\nold\nlines\n" in text


def test_missing_file_and_bad_section(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    replace_section("## Only\n\nbody\n", path)
    assert path.read_text() == "# Benchmark results\n\n## Only\n\nbody\n"
    with pytest.raises(ValueError):
        replace_section("no heading\n", path)


def test_regenerating_the_comparison_keeps_the_other_sections(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Summary\n\nold\n\n## Drift sampling overhead\n\n"
                    "drift table\n")
    merged = keep_other_sections("# Benchmark results\n\n## Summary\n\nnew\n", path)
    assert "new" in merged and "old" not in merged
    assert merged.count("## Summary") == 1
    assert "## Drift sampling overhead\n\ndrift table" in merged
