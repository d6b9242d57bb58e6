"""References between the docs stay true. Docstrings, comments and docs cite docs/DESIGN.md by
section title (`docs/DESIGN.md, "The data path"`): every title cited must be a heading there. And
a Markdown link to a section (`bench/RESULTS.md#todays-numbers`) must name a heading of its file.
A renamed or dropped section shows up here instead of in a newcomer's search."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DESIGN = REPO / "docs" / "DESIGN.md"
CITING = ("fgdist", "shards", "launcher", "bench", "tests")
# `docs/DESIGN.md` then, after a comma, an opening parenthesis or nothing, one or more quoted
# titles joined by commas or "and": `docs/DESIGN.md ("A")`, `docs/DESIGN.md, "A" and "B"`.
CITATION = re.compile(r'docs/DESIGN\.md[\s,(]*((?:"[^"]+"(?:\s*(?:,|and)\s*(?=")|))+)')


def headings() -> set[str]:
    return {line.lstrip("#").strip() for line in DESIGN.read_text().splitlines() if line.startswith("#")}


def flat(text: str) -> str:
    """The text with comment markers at line starts dropped and white space folded, so that a
    title wrapped over two lines of a comment or docstring reads as one."""
    return re.sub(r"\s+", " ", re.sub(r"\n[ \t]*#+[ \t]?", " ", text))


def citations(text: str) -> list[str]:
    return [title for run in CITATION.findall(flat(text)) for title in re.findall(r'"([^"]+)"', run)]


def citing_files() -> list[Path]:
    files = [REPO / "README.md"]
    for folder in CITING:
        files += [p for p in sorted((REPO / folder).rglob("*")) if p.suffix in (".py", ".sh", ".md")]
    return [p for p in files if p != Path(__file__).resolve()]


def test_the_citation_pattern_reads_every_form_in_use():
    text = '''(docs/DESIGN.md, "The column line") docs/DESIGN.md ("Evaluation") for why; docs/DESIGN.md
    "Backbones": x. docs/DESIGN.md, "How a step runs" and "The gradient-scale rule", has it. docs/DESIGN.md, "How
        a step runs", lists. # see docs/DESIGN.md,
        # "The data path". [docs/DESIGN.md](docs/DESIGN.md) "not a citation"'''
    assert citations(text) == [
        "The column line",
        "Evaluation",
        "Backbones",
        "How a step runs",
        "The gradient-scale rule",
        "How a step runs",
        "The data path",
    ]


def test_every_cited_design_section_exists():
    titles = headings()
    cited = {(p.relative_to(REPO).as_posix(), t) for p in citing_files() for t in citations(p.read_text())}
    assert len(cited) >= 10  # the pattern still finds the citations
    missing = sorted(f'{where}: "{title}"' for where, title in cited if title not in titles)
    assert not missing, "cited, but no such heading in docs/DESIGN.md:\n" + "\n".join(missing)


LINK = re.compile(r"\]\(([^)\s#]*)#([^)\s]+)\)")


def slug(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces `-`."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    """The anchors of a Markdown file's headings (not of `#` lines inside fenced code)."""
    found, fenced = set(), False
    for line in markdown.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#+ ", line):
            found.add(slug(line.lstrip("#")))
    return found


def test_slug_is_github_s():
    assert slug("Does it hold over two seeds, and at the paper's 200 epochs?") == (
        "does-it-hold-over-two-seeds-and-at-the-papers-200-epochs"
    )
    assert slug("Which option helps? (one seed, 0)") == "which-option-helps-one-seed-0"


def test_every_link_to_a_section_names_a_heading():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "bench").rglob("*.md"))]
    links = [(doc, target, anchor) for doc in docs for target, anchor in LINK.findall(doc.read_text())]
    assert len(links) >= 5  # the pattern still finds them
    broken = [
        f"{doc.relative_to(REPO)}: {target}#{anchor}"
        for doc, target, anchor in links
        if anchor not in anchors((doc.parent / target) if target else doc)
    ]
    assert not broken, "links to no heading:\n" + "\n".join(broken)
