"""Every relative link and image of README.md and docs/ resolves, anchors included.

The README is the front page and docs/*.md hold the rest, so a moved
section or a renamed heading must not leave a dead link behind. Checked:
Markdown links and images, and HTML `href`/`src` attributes, outside code;
a path must name an existing file or folder, relative to the document; an
`#anchor` must be a heading of the document it points into, as GitHub
spells heading anchors. Web addresses are not followed (the tests run
offline).
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The generated study reports under docs/ (docs/*/...) are checked too: the
# front pages link into them and they link to their figures.
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
# [text](target "title") and ![alt](target); the text may hold `code`.
MARKDOWN_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def _blank(match):
    return re.sub(r"[^\n]", " ", match.group(0))


def without_code(text, spans=True):
    """`text` with fenced blocks (and code spans, if `spans`) blanked, lines kept."""
    text = FENCE.sub(_blank, text)
    return CODE_SPAN.sub(_blank, text) if spans else text


def anchor_of(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    """Every heading anchor of a Markdown file, a repeated one also as '-1', '-2', ..."""
    seen = {}
    found = set()
    # A heading's code spans count: `make demo` is #make-demo.
    for match in HEADING.finditer(without_code(path.read_text(), spans=False)):
        anchor = anchor_of(re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)))
        found.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
        seen[anchor] = seen.get(anchor, 0) + 1
    return found


def links(path):
    """(line, target) of every link and image of a Markdown file, outside code."""
    text = without_code(path.read_text())
    for pattern in (MARKDOWN_LINK, HTML_LINK):
        for match in pattern.finditer(text):
            yield text[:match.start()].count("\n") + 1, match.group(1)


def broken_links(path):
    """Messages naming each link of `path` that does not resolve."""
    problems = []
    for line, target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{where}: {target} names no file ({linked})")
        elif anchor and linked.suffix != ".md":
            problems.append(f"{where}: {target} has an anchor, but is no Markdown file")
        elif anchor and anchor not in anchors(linked):
            problems.append(f"{where}: {target}: no heading with the anchor #{anchor} "
                            f"in {linked.name}")
    return problems


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert not broken_links(path), "\n".join(broken_links(path))


def test_the_readme_links_every_document_under_docs():
    linked = {(ROOT / target.partition("#")[0]).resolve()
              for _, target in links(ROOT / "README.md") if not EXTERNAL.match(target)}
    documents = sorted((ROOT / "docs").glob("*.md"))
    assert len(documents) >= 6  # the five topics and multi_worker.md
    missing = [str(p.relative_to(ROOT)) for p in documents if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    # The two commands come first, then a runnable example.
    first_block = re.search(r"^```\n(.*?)^```", text, re.M | re.S).group(1)
    assert [line.split()[:2] for line in first_block.splitlines()[:2]] == [
        ["make", "demo"], ["make", "test"]]
    assert "```python\nimport secrets" in text
    assert len(text.splitlines()) < 200, "the README grew long: move detail to docs/"


def test_anchors_are_spelled_as_github_spells_them():
    assert anchor_of("Study 3: the explorable's figures (heatmap, privacy-sensitive)") == (
        "study-3-the-explorables-figures-heatmap-privacy-sensitive")
    assert anchor_of("`make demo`") == "make-demo"
    assert anchor_of("Train, sweep, report") == "train-sweep-report"
    assert anchor_of("dp_overhead.py  runs") == "dp_overheadpy--runs"


def test_a_broken_link_is_reported_with_its_line(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Known `heading`\n\n## Known heading\n")
    (tmp_path / "figure.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n"
        "[fine](other.md#known-heading) [repeat](other.md#known-heading-1) "
        "![fine](figure.png) [web](https://example.org/x) [here](#page)\n"
        "`[in code](missing.md)`\n"
        "```\n[in a block](missing.md)\n```\n"
        "[gone](missing.md)\n"
        "[no heading](other.md#unknown)\n"
        '<img src="lost.png">\n'
        "[anchor into a figure](figure.png#top)\n")
    assert broken_links(page) == [
        f"{page}:7: missing.md names no file ({tmp_path / 'missing.md'})",
        f"{page}:8: other.md#unknown: no heading with the anchor #unknown in other.md",
        f"{page}:10: figure.png#top has an anchor, but is no Markdown file",
        f"{page}:9: lost.png names no file ({tmp_path / 'lost.png'})",
    ]
