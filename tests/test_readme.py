"""The README's set-up commands are the ones CI and users run, and its links lead somewhere."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_COMMAND = "python -m pip install . && uvkernelctl install-kernelspec --user && uvkernelctl try"
TEST_COMMAND = "python -m pip install '.[test]' && python -m pytest"
# [text](target) in Markdown; code spans are removed first, so `a[b](c)` in code is no link.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = "python -m pip install '.[test]' && python -m pytest"
    assert command in readme
    assert command in (ROOT / ".ci" / "run").read_text()


def test_readme_keeps_the_run_command() -> None:
    assert RUN_COMMAND in (ROOT / "README.md").read_text()


def test_make_test_runs_the_readme_test_command() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n\t(.*)$", makefile, re.MULTILINE)
    assert recipe is not None, "Makefile has no test target"
    assert recipe.group(1).strip() == TEST_COMMAND
    for target in ("install", "lint", "bench"):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"Makefile has no {target} target"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    for heading in re.findall(r"^#+ (.*)$", _without_code(markdown), re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def _without_code(markdown: str) -> str:
    return re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)


def test_readme_and_docs_links_stay_inside_the_repository() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1, "the README links to docs/; docs/*.md is missing"
    broken = []
    for page in pages:
        text = re.sub(r"`[^`\n]*`", "", _without_code(page.read_text()))
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path_part, _, anchor = target.partition("#")
            linked = (page.parent / path_part).resolve() if path_part else page
            if ROOT not in linked.parents or not linked.exists():
                broken.append(f"{page.name}: {target} (no such file in the repository)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
