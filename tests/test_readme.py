"""README stays true: its library example runs, and the commands it names exist."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from click.testing import CliRunner

from fkd import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


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
    root = Path(__file__).resolve().parents[1]
    for path in set(re.findall(r"(configs/[\w/]+\.toml)", README)):
        assert (root / path).is_file(), path


def test_extending_example_registers_a_working_term():
    import fkd.terms as terms
    from fkd.objective import build
    from fkd.terms import TermInputs

    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    example = next(b for b in blocks if "@register_term" in b)
    name = re.search(r'@register_term\("(\w+)"\)', example).group(1)
    if name not in terms.TERMS:
        exec(compile(example, "README.md", "exec"), {})  # noqa: S102 -- our own README
    obj = build({"ce": {"weight": 0.3}, name: {"weight": 0.7}})
    assert obj.needs_teacher_logits
    s, t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    inputs = TermInputs(s, {}, torch.zeros(4, dtype=torch.int64), t, {}, None, torch.zeros((), dtype=torch.int64))
    loss, metrics, _ = obj({}, {}, inputs)
    assert torch.isfinite(loss) and metrics[name] > 0
