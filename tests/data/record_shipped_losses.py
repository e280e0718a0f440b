"""Record the loss of every shipped config on one fixed batch, with fkd as it was before loss terms
became registered units (commit 637ec30, the pre-``fkd.terms`` API). ``tests/test_shipped_configs.py``
checks that today's objective gives the same values.

This script uses that old API (``Objective.init_regressors``, ``objective(s_logits, ...)``), so it runs
against a checkout of that commit, not against today's fkd::

    git worktree add /tmp/fkd-old 637ec30
    cd /tmp/fkd-old && PYTHONPATH=/tmp/fkd-old python /path/to/tests/data/record_shipped_losses.py \\
        > /path/to/tests/data/shipped_losses.json

The recipe (batch, models, seeds) is repeated in the test; keep the two in step.
"""

import json
import sys
from pathlib import Path

import torch

import fkd
from fkd import objective as objective_lib
from fkd.build import load_config
from fkd.distill_setup import build_student, feature_shapes
from fkd.models import build_model

BATCH = 4


def shipped_configs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("[!_]*.toml") if "method" in p.read_text() or "[distill]" in p.read_text())


def main() -> None:
    torch.set_num_threads(1)
    root = Path("configs")
    out = {"fkd": str(Path(fkd.__file__).parent), "losses": {}}
    for path in shipped_configs(root):
        cfg = load_config(path)
        obj = objective_lib.from_config(cfg.distill)
        k = cfg.data.synthetic_classes if cfg.data.name == "synthetic" else 10
        side = cfg.data.image_size
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(BATCH, 3, side, side, generator=gen), torch.randint(0, k, (BATCH,), generator=gen)
        student, sp, sb = build_student(cfg, k, "cpu")
        t = cfg.teacher
        t_names = cfg.distill.teacher_features if obj.needs_features else ()
        teacher, tp, tb = build_model(t.arch, k, side, t_names, seed=cfg.seed + 1, **t.options)
        regs = {}
        if obj.needs_features:
            regs = obj.init_regressors(feature_shapes(student, sp, sb, side, "cpu"),
                                       feature_shapes(teacher, tp, tb, side, "cpu"), seed=cfg.seed)
        with torch.no_grad():
            t_logits, t_feats, _ = teacher.apply(tp, tb, x, train=False)
            s_logits, s_feats, _ = student.apply(sp, sb, x, train=True)
            loss, metrics = obj(s_logits, s_feats, y, t_logits, t_feats, regs)
        out["losses"][path.as_posix()] = {name: float(v) for name, v in metrics.items()}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
