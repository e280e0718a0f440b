"""README and docs/ stay true: the library and extending examples run, the commands and configs they name
exist, the two set-up commands come first, every docs page is in the site's navigation, and every
registered loss term is on the terms page."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from click.testing import CliRunner

from fkd import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXTENDING = (ROOT / "docs" / "extending.md").read_text()


def test_readme_is_short_and_starts_with_the_two_commands():
    assert len(README.splitlines()) <= 250
    first_block = re.search(r"```\w*\n(.*?)```", README, flags=re.S).group(1)
    assert first_block.split("\n")[:2] == ["make demo", "make test"] and first_block.count("\n") == 2
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile and "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_docs_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1]
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f": {page.name}" in nav, page.name
    for link in re.findall(r"\]\((docs/[\w-]+\.md)", README):
        assert (ROOT / link).is_file(), link


def test_every_registered_term_is_on_the_terms_page():
    from fkd.terms import TERMS

    page = (ROOT / "docs" / "terms.md").read_text()
    for name in TERMS.names():
        if TERMS.get(name).__module__.startswith("fkd.terms."):  # other tests register terms of their own
            assert f"| `{name}` |" in page, name


def test_library_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has a python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 -- our own README
    assert torch.isfinite(namespace["metrics"]["loss"])
    assert int(namespace["state"]["step"]) == 1


def test_commands_named_in_readme_exist():
    for command in set(re.findall(r"python cli\.py (\w+)", README)):
        assert CliRunner().invoke(cli.main, [command, "--help"]).exit_code == 0, command


def test_configs_named_in_readme_exist():
    for path in set(re.findall(r"(configs/[\w/]+\.toml)", README)):
        assert (ROOT / path).is_file(), path


def test_extending_example_registers_a_working_term():
    import fkd.terms as terms
    from fkd.objective import build
    from fkd.terms import TermInputs

    blocks = re.findall(r"```python\n(.*?)```", EXTENDING, flags=re.S)
    example = next(b for b in blocks if "@register_term" in b)
    name = re.search(r'@register_term\("(\w+)"\)', example).group(1)
    if name not in terms.TERMS:
        exec(compile(example, "docs/extending.md", "exec"), {})  # noqa: S102 -- our own docs
    obj = build({"ce": {"weight": 0.3}, name: {"weight": 0.7}})
    assert obj.needs_teacher_logits
    s, t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    inputs = TermInputs(s, {}, torch.zeros(4, dtype=torch.int64), t, {}, None, torch.zeros((), dtype=torch.int64))
    loss, metrics, _ = obj({}, {}, inputs)
    assert torch.isfinite(loss) and metrics[name] > 0
