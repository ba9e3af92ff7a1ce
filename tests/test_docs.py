"""The documentation's references hold: every relative link of the project's Markdown files
reaches an existing file (and heading), and every project path the text names in code
spans exists.  The README and results/README.md cite a results file for each figure; a
renamed or moved file must not leave a figure without its source."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".whl", "build", "dist", "work", "data-bin", "checkpoints", "outputs",
        ".git", ".pytest_cache"}
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")
PATH = re.compile(r"^(?:results|scripts|configs|grnn_fairseq|tests|data)/[\w./{},-]*$")


def markdown_files():
    return sorted(p for p in ROOT.rglob("*.md")
                  if not SKIP & set(p.relative_to(ROOT).parts[:-1])
                  and not any(part.endswith(".egg-info") for part in p.parts))


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"`|\*\*?", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", path.read_text(encoding="utf-8"),
                  flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M)}


def expand(path):
    """'a_{x,y}.txt' -> ['a_x.txt', 'a_y.txt'] (several brace lists: every combination)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",")
            for p in expand(path[:m.start()] + alt + path[m.end():])]


def broken_links(md):
    bad = []
    for target in LINK.findall(md.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (md.parent / file).resolve() if file else md
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


def missing_paths(md):
    # code spans may wrap lines (not paragraphs); fenced blocks are commands, not references
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", md.read_text(encoding="utf-8"), flags=re.S | re.M)
    bad = []
    for span in re.findall(r"`([^`]+)`", text):
        if "\n\n" in span:
            continue
        for token in span.split():
            token = token.strip("(),;:'\"")
            if not PATH.match(token):
                continue
            for path in expand(token):
                if not (ROOT / path).exists():
                    bad.append(path)
    return bad


def test_slug_follows_githubs_rule():
    assert slug("End to end on the CPU: beam search (2026-11-23)") == \
        "end-to-end-on-the-cpu-beam-search-2026-11-23"
    assert slug("The GPU (one H100), and the switches") == "the-gpu-one-h100-and-the-switches"
    assert slug("Use with `fairseq`") == "use-with-fairseq"
    assert expand("r/b_{wmt,iwslt}_{a,b}.txt") == ["r/b_wmt_a.txt", "r/b_wmt_b.txt",
                                                   "r/b_iwslt_a.txt", "r/b_iwslt_b.txt"]


def test_the_main_documents_are_checked():
    names = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    assert {"README.md", "DEVELOPERS.md", "results/README.md",
            "results/gpu_h100/README.md"} <= names


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(md):
    assert broken_links(md) == []


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_project_paths_exist(md):
    assert missing_paths(md) == []


def test_checks_catch_a_broken_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.txt").write_text("")
    md = tmp_path / "doc.md"
    md.write_text("# Top part\n\n[ok](#top-part) [file](results/a.txt) [gone](results/b.txt)"
                  " [bad anchor](doc.md#nowhere) [web](https://example.org)\n\n"
                  "`results/a.txt` and `wrapped\nspan` then `results/{a,c}.txt`\n\n"
                  "  ```sh\n  run --out results/made_by_the_command\n  ```\n")
    assert broken_links(md) == [f"results/b.txt: no file {tmp_path / 'results' / 'b.txt'}",
                                "doc.md#nowhere: no heading #nowhere in doc.md"]
    assert missing_paths(md) == ["results/c.txt"]
