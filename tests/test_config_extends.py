"""Config inheritance: ``extends`` resolves relative to the naming file, merges tables deeply (later wins),
replaces lists, fails on cycles and missing bases in one sentence, and never reaches a run's config.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from fkd import cli
from fkd.build import load_config
from fkd.config_files import merge_tables, read_config_file
from fkd.errors import ConfigError
from tests.test_errors import assert_clean_failure

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        read_config_file(path)
    message = str(info.value)
    assert "\n" not in message  # one sentence, one line
    return message


# --- resolving ------------------------------------------------------------------------------------------


def test_paths_are_relative_to_the_file_that_names_them(tmp_path, monkeypatch):
    write(tmp_path / "shared" / "common.toml", 'extends = "deeper/seed.toml"\nname = "common"\n')
    write(tmp_path / "shared" / "deeper" / "seed.toml", "seed = 7\n[data]\nbatch_size = 8\n")
    run = write(tmp_path / "experiments" / "a" / "run.toml",
                'extends = "../../shared/common.toml"\n[data]\nimage_size = 16\n')
    monkeypatch.chdir(write(tmp_path / "elsewhere" / "x", "").parent)  # the working directory plays no part
    assert read_config_file(run) == {"seed": 7, "name": "common", "data": {"batch_size": 8, "image_size": 16}}


def test_a_list_of_bases_merges_in_order_and_the_file_itself_wins(tmp_path):
    write(tmp_path / "a.toml", 'name = "a"\nseed = 1\n[data]\nbatch_size = 8\n')
    write(tmp_path / "b.toml", 'seed = 2\n[data]\nbatch_size = 16\nimage_size = 24\n')
    own = write(tmp_path / "own.toml", 'extends = ["a.toml", "b.toml"]\nname = "own"\n[data]\nimage_size = 32\n')
    assert read_config_file(own) == {"name": "own", "seed": 2, "data": {"batch_size": 16, "image_size": 32}}
    swapped = write(tmp_path / "swapped.toml", 'extends = ["b.toml", "a.toml"]\n')
    assert read_config_file(swapped)["seed"] == 1 and read_config_file(swapped)["data"]["batch_size"] == 8


def test_nested_tables_merge_key_by_key(tmp_path):
    write(tmp_path / "base.toml", '[train]\nepochs = 3\n[train.optimizer]\nname = "sgd"\nlearning_rate = 0.1\n'
                                  'momentum = 0.9\n')
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\n[train.optimizer]\nlearning_rate = 0.5\n')
    assert read_config_file(child) == {
        "train": {"epochs": 3, "optimizer": {"name": "sgd", "learning_rate": 0.5, "momentum": 0.9}}}


def test_a_list_value_is_replaced_not_concatenated(tmp_path):
    write(tmp_path / "base.toml", '[distill]\nstudent_features = ["block1", "block2"]\n'
                                  "[train.optimizer]\nmilestones = [1, 2, 3]\n")
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\n[distill]\nstudent_features = ["block3"]\n'
                                           "[train.optimizer]\nmilestones = [5]\n")
    got = read_config_file(child)
    assert got["distill"]["student_features"] == ["block3"] and got["train"]["optimizer"]["milestones"] == [5]


def test_a_shared_base_reached_twice_is_not_a_cycle(tmp_path):
    write(tmp_path / "root.toml", "seed = 1\n")
    write(tmp_path / "left.toml", 'extends = "root.toml"\nname = "left"\n')
    write(tmp_path / "right.toml", 'extends = "root.toml"\n[data]\nbatch_size = 4\n')
    top = write(tmp_path / "top.toml", 'extends = ["left.toml", "right.toml"]\n')
    assert read_config_file(top) == {"seed": 1, "name": "left", "data": {"batch_size": 4}}


def test_merge_tables_changes_neither_input():
    base, top = {"a": {"x": 1, "y": [1]}, "b": 1}, {"a": {"y": [2]}}
    assert merge_tables(base, top) == {"a": {"x": 1, "y": [2]}, "b": 1}
    assert base == {"a": {"x": 1, "y": [1]}, "b": 1} and top == {"a": {"y": [2]}}


# --- errors ----------------------------------------------------------------------------------------------


def test_a_file_extending_itself_names_the_chain(tmp_path):
    own = write(tmp_path / "a.toml", 'extends = "a.toml"\n')
    message = error_of(own)
    assert "extends itself" in message and f"{own} -> {own}" in message and "remove one of these extends" in message


def test_a_two_step_cycle_names_the_chain(tmp_path):
    a = write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    b = write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    message = error_of(a)
    assert message.startswith(f"config '{a}' extends itself: {a} -> {b} -> {a};"), message


def test_a_missing_base_names_the_file_that_names_it_and_the_chain(tmp_path):
    write(tmp_path / "mid.toml", 'extends = "sub/gone.toml"\n')
    top = write(tmp_path / "top.toml", 'extends = "mid.toml"\n')
    message = error_of(top)
    gone = tmp_path / "sub" / "gone.toml"
    assert message.startswith(f"config '{tmp_path / 'mid.toml'}' extends '{gone}', which does not exist"), message
    assert f"{top} -> {tmp_path / 'mid.toml'} -> {gone}" in message
    assert "relative to the file that names it" in message


def test_extends_that_is_not_a_path_is_one_sentence(tmp_path):
    assert "extends = 3" in error_of(write(tmp_path / "n.toml", "extends = 3\n"))
    assert "list of such paths" in error_of(write(tmp_path / "l.toml", "extends = [1]\n"))


def test_a_broken_base_is_named(tmp_path):
    write(tmp_path / "bad.toml", "seed = = 1\n")
    message = error_of(write(tmp_path / "top.toml", 'extends = "bad.toml"\n'))
    assert f"config file '{tmp_path / 'bad.toml'}' is not valid TOML" in message


def test_top_level_file_errors_keep_their_messages(tmp_path):
    assert "does not exist; pass an existing file to --config" in error_of(tmp_path / "nope.toml")
    (tmp_path / "latin1.toml").write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    assert "is not UTF-8 text" in error_of(tmp_path / "latin1.toml")


# --- the config layer and the CLI -----------------------------------------------------------------------


@pytest.fixture
def child(tiny_config, tmp_path):
    """A config that extends the tiny test config, changing one optimizer key and the epoch count."""
    tiny_config("none", name="_tiny.toml")
    return write(tmp_path / "runs" / "child.toml", 'extends = "../_tiny.toml"\nname = "child"\n'
                                                   "[train]\nepochs = 1\n[train.optimizer]\nlearning_rate = 0.05\n")


def test_load_config_resolves_extends_and_set_applies_on_top(child, tmp_path):
    base = load_config(tmp_path / "_tiny.toml")
    cfg = load_config(child)
    assert (cfg.name, cfg.train.epochs, cfg.train.optimizer.learning_rate) == ("child", 1, 0.05)
    assert cfg.student == base.student and cfg.train.optimizer.name == base.train.optimizer.name
    assert load_config(child, ["train.optimizer.learning_rate=0.7"]).train.optimizer.learning_rate == 0.7


def test_cli_config_prints_the_resolved_config_without_extends(child):
    result = CliRunner().invoke(cli.main, ["config", "--config", str(child)])
    assert result.exit_code == 0, result.output
    assert "extends" not in result.output
    printed = tomllib.loads(result.output)
    assert printed["train"]["optimizer"]["learning_rate"] == 0.05 and printed["student"]["widths"] == [4, 8]


@pytest.mark.parametrize("command", ["config", "distill"])
def test_cli_extends_errors_are_one_line_and_exit_2(tmp_path, command):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    result = CliRunner().invoke(cli.main, [command, "--config", str(tmp_path / "a.toml")])
    assert_clean_failure(result, "extends itself", "a.toml -> ", "b.toml -> ")
    missing = write(tmp_path / "m.toml", 'extends = "nowhere.toml"\n')
    assert_clean_failure(CliRunner().invoke(cli.main, [command, "--config", str(missing)]),
                         "nowhere.toml", "which does not exist")


def test_a_run_directory_holds_the_resolved_config(child, tmp_path, one_thread):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli.main, ["distill", "--config", str(child), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    written = (out / "config.toml").read_text()
    assert "extends" not in written
    assert load_config(out / "config.toml") == load_config(child)  # the run reproduces from its own folder


def test_a_sweep_of_a_method_config_grids_over_its_resolved_tables(monkeypatch):
    from fkd.sweep.plan import plan_sweep

    monkeypatch.chdir(ROOT)
    plan = plan_sweep("configs/methods/kd.toml", [], (0, 1), [("distill.terms.logit.weight", [0.9, 90.0])])
    cfgs = [s.config for s in plan.students]
    assert sorted(c.distill.terms["logit"]["weight"] for c in cfgs) == [0.9, 0.9, 90.0, 90.0]
    assert {(c.student.arch, c.teacher.arch, c.train.epochs) for c in cfgs} == {("seed_cnn", "resnet18", 8)}


# --- the shipped configs ---------------------------------------------------------------------------------


METHOD_FILES = sorted((ROOT / "configs" / "methods").glob("[!_]*.toml"))
PAIR_FILES = sorted((ROOT / "configs" / "cifar100").glob("*/[!_]*.toml"))


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: p.stem)
def test_each_method_config_is_its_base_plus_name_and_distill_in_at_most_20_lines(path):
    assert len(path.read_text().splitlines()) <= 20
    own = tomllib.loads(path.read_text())
    assert own["extends"] == "_base.toml" and set(own) == {"extends", "name", "distill"}


@pytest.mark.parametrize("path", PAIR_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_each_cifar100_method_config_extends_its_pairs_base(path):
    own = tomllib.loads(path.read_text())
    assert own["extends"] == "_base.toml" and set(own) == {"extends", "name", "distill"}
    assert (path.parent / "_base.toml").is_file()
