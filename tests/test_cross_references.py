"""Every README section cited by name exists. The code, the benchmarks and the notebook cite one as
README, "NAME" (or README's "NAME"); README itself as see "NAME". NAME is the whole text of a
heading or the question of an FAQ entry: a cited name that is neither, or a citation without its
name quoted, fails here."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r'README(?:,|\'s)\s+"([^"]+)"')  # in the code, the benchmarks and the notebook
UNQUOTED = re.compile(
    r"README,\s+(?!\")[A-Z]"
)  # README, Name: a citation without the whole name quoted
SEE = re.compile(r'see "([^"]+)"')  # within README


def sections():
    """README's headings and FAQ questions, as written."""
    text = (ROOT / "README.md").read_text()
    headings = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    questions = re.findall(r"^\*\*(.+?)\*\*", text.split("\n## FAQ\n", 1)[1], flags=re.MULTILINE)
    return set(headings) | set(questions)


def citing_texts():
    """Each file that may cite README, as one text: the notebook's cells joined, escaped quotes as quotes."""
    files = [
        *ROOT.glob("*.py"),
        *ROOT.glob("*/*.py"),
    ]  # the paper, the machinery, the toy world, benchmarks, tests, examples
    texts = {path.name: path.read_text() for path in files if path.name != Path(__file__).name}
    cells = json.loads((ROOT / "tutorial.ipynb").read_text())["cells"]
    texts["tutorial.ipynb"] = "\n".join("".join(cell["source"]) for cell in cells)
    return {name: re.sub(r"\s+", " ", text.replace('\\"', '"')) for name, text in texts.items()}


def test_every_readme_section_cited_by_name_exists():
    known, cited = sections(), []
    for name, text in citing_texts().items():
        assert not UNQUOTED.search(text), (
            f"{name}: cite a README section with its whole name quoted: {UNQUOTED.search(text)[0]}..."
        )
        cited += [(name, section) for section in CITED.findall(text)]
    cited += [
        ("README.md", section)
        for section in SEE.findall(re.sub(r"\s+", " ", (ROOT / "README.md").read_text()))
    ]
    assert (
        len({file for file, _ in cited}) >= 4
    )  # the citations are found: config.py, train.py, a benchmark, the notebook, README
    missing = [(file, section) for file, section in cited if section not in known]
    assert not missing, f"cited, but no README heading or FAQ entry has that name: {missing}"
