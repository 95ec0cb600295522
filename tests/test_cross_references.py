"""Every section cited by name exists. The code, the benchmarks and the notebook cite one as
README, "NAME" (or README's "NAME") or docs/PAGE.md, "NAME"; README and the docs pages cite their
own as see "NAME", and each other's pages by links. NAME is the whole text of a heading of that
page or, in README, the question of an FAQ entry: a cited name that is neither, a citation without
its name quoted, or a link to a page or picture that does not exist fails here."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r'(README|docs/[\w-]+\.md)(?:,|\'s)\s+"([^"]+)"')
UNQUOTED = re.compile(r"(?:README|docs/[\w-]+\.md),\s+(?!\")[A-Z]")  # a name not quoted
SEE = re.compile(r'see "([^"]+)"')  # within one page
LINK = re.compile(r"\]\(((?!https?:)[^)#\s]+)(?:#[^)]*)?\)")  # a relative link or picture
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def page_name(path):
    return "README" if path.name == "README.md" else f"docs/{path.name}"


def sections(path):
    """A page's headings, and README's FAQ questions, as written."""
    text = path.read_text()
    headings = {line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")}
    if path.name == "README.md":
        faq = text.split("\n## FAQ\n", 1)[1]
        headings |= set(re.findall(r"^\*\*(.+?)\*\*", faq, flags=re.MULTILINE))
    return headings


def citing_texts():
    """Each file that may cite a page, as one text: the notebook's cells joined, escaped quotes as
    quotes."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("*/*.py")]  # the paper, machinery, benchmarks, tests
    texts = {path.name: path.read_text() for path in files if path.name != Path(__file__).name}
    cells = json.loads((ROOT / "tutorial.ipynb").read_text())["cells"]
    texts["tutorial.ipynb"] = "\n".join("".join(cell["source"]) for cell in cells)
    return {name: re.sub(r"\s+", " ", text.replace('\\"', '"')) for name, text in texts.items()}


def test_every_section_cited_by_name_exists():
    known = {page_name(path): sections(path) for path in PAGES}
    cited = []
    for name, text in citing_texts().items():
        unquoted = UNQUOTED.search(text)
        assert not unquoted, f"{name}: cite a section with its whole name quoted: {unquoted[0]}..."
        cited += [(name, page, section) for page, section in CITED.findall(text)]
    for path in PAGES:
        text = re.sub(r"\s+", " ", path.read_text())
        cited += [(path.name, page_name(path), section) for section in SEE.findall(text)]
    assert len({file for file, _, _ in cited}) >= 4  # found: config.py, train.py, a benchmark...
    missing = [c for c in cited if c[1] not in known or c[2] not in known[c[1]]]
    assert not missing, f"cited, but that page has no heading or FAQ entry of that name: {missing}"


def test_every_link_between_the_pages_leads_to_a_file():
    broken = [
        (path.name, target)
        for path in PAGES
        for target in LINK.findall(path.read_text())
        if not (path.parent / target).exists()
    ]
    assert not broken, f"links to files that do not exist: {broken}"
