"""A user's own loss terms, defined in their own file and named in ``distill.imports``: trained end to
end from the CLI without touching fkd, including a term with learnable parameters, a per-example
memory indexed by ``idx`` and randomness from the step's key, interrupted and resumed bit-exactly."""

from __future__ import annotations

import json
import signal
import sys

import pytest
import torch
from click.testing import CliRunner

from fkd import cli
from fkd.checkpoint import load_checkpoint
from fkd.build import load_config
from fkd.pytree import tree_leaves, tree_signature
from tests.conftest import wrap_distill_step

TERMS_FILE = '''
import attrs
import torch

from fkd import prng
from fkd.terms import Term, hyper, positive, register_term


@register_term("toy_margin")
@attrs.frozen
class ToyMargin(Term):
    """Logits only: the mean squared difference of student and teacher logits."""

    summary = "mean squared logit difference"
    consumes = frozenset({"student_logits", "teacher_logits"})
    scale: float = hyper(1.0, positive, help="multiplies the squared difference")

    def apply(self, params, state, inputs):
        return self.scale * (inputs.student_logits - inputs.teacher_logits).pow(2).mean(), state


@register_term("toy_memory")
@attrs.frozen
class ToyMemory(Term):
    """A memory of each example's softened prediction, a learnable temperature, random negatives."""

    summary = "agree with your own past predictions, differ from random others"
    consumes = frozenset({"student_logits", "idx", "key"})
    momentum: float = hyper(0.5, positive, help="share of the old memory row kept")
    negatives: int = hyper(4, positive, help="random other examples per example")

    def init(self, shapes, generator):
        k, n = shapes.num_classes, shapes.num_examples
        params = {"log_t": torch.zeros(())}
        state = {"memory": torch.full((n, k), 1.0 / k), "seen": torch.zeros(n, dtype=torch.int64)}
        return params, state

    def apply(self, params, state, inputs):
        p = torch.softmax(inputs.student_logits / params["log_t"].exp(), dim=-1)  # (B, K)
        mine = state["memory"][inputs.idx]  # (B, K)
        others = state["memory"][prng.randint(inputs.key, (p.shape[0], self.negatives), state["memory"].shape[0])]
        loss = (p - mine).pow(2).sum(-1).mean() - 0.1 * (p.unsqueeze(1) - others).pow(2).sum(-1).mean()
        rows = self.momentum * mine + (1 - self.momentum) * p.detach()
        memory = state["memory"].index_copy(0, inputs.idx, rows)
        seen = state["seen"].index_add(0, inputs.idx, torch.ones_like(inputs.idx))
        return loss, {"memory": memory, "seen": seen}
'''


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


@pytest.fixture(scope="module")
def terms_file(tmp_path_factory):
    # One file for the module: a process imports a terms file once, and registering the same term
    # names from a second file would be refused (two definitions of one name).
    path = tmp_path_factory.mktemp("user") / "my_terms.py"
    path.write_text(TERMS_FILE)
    return path


def user_config(tiny_config, terms_file, tables: str):
    return tiny_config("terms", extra=f'imports = ["{terms_file.as_posix()}"]\n{tables}')


MARGIN = """
[distill.terms.ce]
weight = 0.5

[distill.terms.toy_margin]
weight = 0.1
scale = 0.5
"""

MEMORY = """
[distill.terms.ce]
weight = 1.0

[distill.terms.toy_memory]
weight = 0.5
negatives = 3
"""


def test_a_logits_only_term_from_the_users_file_trains_end_to_end(tiny_config, terms_file, tmp_path):
    cfg = user_config(tiny_config, terms_file, MARGIN)
    out = tmp_path / "margin"
    result = invoke("distill", "--config", cfg, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "terms" and summary["terms"] == {"ce": 0.5, "toy_margin": 0.1}
    assert "teacher_test_acc" in summary  # the term consumes the teacher's logits, so the teacher ran
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_toy_margin"] > 0 for r in records)
    # The resolved config records the tables and the import, so the run can be resumed as it was.
    saved = load_config(out / "config.toml")
    assert saved.distill.terms["toy_margin"] == {"weight": 0.1, "scale": 0.5}
    assert saved.distill.imports == [terms_file.as_posix()]
    # --keys with the config lists the user's keys too.
    keys = invoke("config", "--keys", "--config", cfg)
    assert keys.exit_code == 0 and "distill.terms.toy_margin.scale" in keys.output


def test_a_term_with_params_and_per_example_memory_resumes_bit_exactly(tiny_config, terms_file, tmp_path,
                                                                      monkeypatch):
    cfg = user_config(tiny_config, terms_file, MEMORY)
    full = tmp_path / "full"
    assert invoke("distill", "--config", cfg, "--out", full, "--quiet").exit_code == 0

    cut = tmp_path / "cut"

    def interrupt(n, batch):
        if n == 8:  # 6 steps per epoch: mid-way through epoch 2
            signal.raise_signal(signal.SIGTERM)

    with monkeypatch.context() as m:
        wrap_distill_step(m, interrupt)
        stopped = invoke("distill", "--config", cfg, "--out", cut, "--quiet")
    assert stopped.exit_code == 128 + signal.SIGTERM, stopped.output
    mid = load_checkpoint(cut / "checkpoints" / "latest.pt", "student_run")["state"]
    assert int(mid["objective"]["toy_memory"]["seen"].sum()) == 8 * 16  # 8 steps of 16 images, saved with it
    resumed = invoke("distill", "--config", cfg, "--out", cut, "--quiet", "--resume")
    assert resumed.exit_code == 0, resumed.output

    a = load_checkpoint(full / "checkpoints" / "latest.pt", "student_run")["state"]
    b = load_checkpoint(cut / "checkpoints" / "latest.pt", "student_run")["state"]
    assert tree_signature(a) == tree_signature(b)
    for part in ("params", "objective", "opt_state", "buffers", "key", "step"):
        for i, (x, y) in enumerate(zip(tree_leaves(a[part]), tree_leaves(b[part]))):
            assert torch.equal(x, y), f"{part}, leaf {i}"
    memory = a["objective"]["toy_memory"]
    assert int(memory["seen"].sum()) == 2 * 6 * 16  # every step of both epochs wrote 16 rows
    assert not torch.allclose(memory["memory"], torch.full_like(memory["memory"], 0.25))
    assert a["params"]["objective"]["toy_memory"]["log_t"] != 0  # the learnable temperature trained


@pytest.mark.parametrize("entry, message", [
    ("missing_terms.py", "distill.imports names 'missing_terms.py', which is not a file"),
    ("no_such_module_xyz", "distill.imports names module 'no_such_module_xyz', which cannot be found"),
    ("{broken}", "importing '{broken}' (distill.imports) failed: ZeroDivisionError: division by zero"),
])
def test_bad_imports_fail_in_one_sentence_and_write_nothing(tiny_config, tmp_path, entry, message):
    broken = tmp_path / "broken_terms.py"
    broken.write_text("x = 1 / 0\n")
    entry, message = (s.replace("{broken}", broken.as_posix()) for s in (entry, message))
    cfg = tiny_config("terms", extra=f'imports = ["{entry}"]\n[distill.terms.ce]\nweight = 1.0')
    result = invoke("distill", "--config", cfg, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert message in result.output
    assert not (tmp_path / "run").exists()


def test_only_files_a_config_names_are_imported(tiny_config, terms_file, tmp_path):
    before = {name for name in sys.modules if name.startswith("fkd_user_terms_")}
    # The term file sits beside the config, but the config does not name it: its term stays unknown.
    cfg = tiny_config("terms", extra="[distill.terms.toy_never_named]\nweight = 1.0")
    result = invoke("distill", "--config", cfg, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 2 and "unknown loss term 'toy_never_named'" in result.output
    assert {name for name in sys.modules if name.startswith("fkd_user_terms_")} == before


def test_set_reaches_into_term_tables(tiny_config):
    cfg = tiny_config("terms", extra="[distill.terms.ce]\nweight = 0.5\n[distill.terms.logit]\nweight = 0.5")
    shown = invoke("config", "--config", cfg, "--set", "distill.terms.logit.temperature=4")
    assert shown.exit_code == 0 and "[distill.terms.logit]\nweight = 0.5\ntemperature = 4" in shown.output
    typo = invoke("config", "--config", cfg, "--set", "distill.terms.logit.temprature=4")
    assert typo.exit_code == 2 and "unknown key 'temprature' in distill.terms.logit" in typo.output
