"""Tests for fkd.optim and fkd.schedules: each optimizer against torch.optim, each schedule against
torch.optim.lr_scheduler or hard-coded values, plus the functional contract (pure updates, tensor state,
chain, vmap, compile without recompiles, checkpointable state)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.func import grad, vmap

from fkd.config import OptimizerConfig
from fkd.build import load_config
from fkd.errors import ConfigError
from fkd.optim import (
    OPTIMIZERS,
    GradientTransformation,
    adam,
    adamw,
    add_decayed_weights,
    apply_updates,
    chain,
    clip_by_global_norm,
    global_norm,
    hyperparams,
    identity,
    inject_hyperparams,
    optimizer_from_config,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    sgd,
    trace,
    with_hyperparams,
)
from fkd.pytree import tree_clone, tree_leaves, tree_map, tree_signature
from fkd.schedules import (
    SCHEDULES,
    InjectableSchedule,
    constant,
    current_lr,
    cosine_decay,
    learning_rate_schedule,
    multistep,
    one_cycle,
    warmup_cosine,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# A small linear regression with fixed data: the problem every optimizer is run on.
X = torch.randn(32, 5, generator=gen(0), dtype=F64)
Y = torch.randn(32, 3, generator=gen(1), dtype=F64)


def init_params(seed: int = 2) -> dict[str, torch.Tensor]:
    return {
        "linear.weight": 0.5 * torch.randn(3, 5, generator=gen(seed), dtype=F64),
        "linear.bias": 0.5 * torch.randn(3, generator=gen(seed + 1), dtype=F64),
    }


def regression_loss(params, x=X, y=Y):
    pred = x @ params["linear.weight"].T + params["linear.bias"]
    return ((pred - y) ** 2).mean()


def run_fkd(opt: GradientTransformation, steps: int = 50, params=None):
    """The training loop every test shares: any GradientTransformation plugs in unchanged."""
    params = init_params() if params is None else params
    state = opt.init(params)
    for _ in range(steps):
        grads = grad(regression_loss)(params)
        updates, state = opt.update(grads, state, params)
        params = apply_updates(params, updates)
    return params, state


def run_torch(make_opt, make_sched=None, steps: int = 50):
    params = {k: v.clone().requires_grad_(True) for k, v in init_params().items()}
    opt = make_opt(list(params.values()))
    sched = make_sched(opt) if make_sched else None
    for _ in range(steps):
        opt.zero_grad()
        regression_loss(params).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return {k: v.detach() for k, v in params.items()}


def assert_trees_close(a, b, **kw):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **kw)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# Agreement with torch.optim
# ---------------------------------------------------------------------------------------------------

TORCH_CASES = {
    "sgd": (lambda w: w(sgd)(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd_momentum": (lambda w: w(sgd)(0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "sgd_nesterov": (
        lambda w: w(sgd)(0.05, momentum=0.9, nesterov=True),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    ),
    "sgd_weight_decay": (
        lambda w: w(sgd)(0.1, weight_decay=0.05),
        lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05),
    ),
    "sgd_momentum_weight_decay": (
        lambda w: w(sgd)(0.05, momentum=0.8, nesterov=True, weight_decay=0.05),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.05),
    ),
    "adam": (lambda w: w(adam)(0.02), lambda p: torch.optim.Adam(p, lr=0.02)),
    "adam_betas": (
        lambda w: w(adam)(0.02, b1=0.8, b2=0.99, eps=1e-6),
        lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6),
    ),
    "adam_weight_decay": (
        lambda w: w(adam)(0.02, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.1),
    ),
    "adamw": (lambda w: w(adamw)(0.02), lambda p: torch.optim.AdamW(p, lr=0.02)),
    "adamw_weight_decay": (
        lambda w: w(adamw)(0.02, weight_decay=0.3),
        lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.3),
    ),
}


@pytest.mark.parametrize("wrap", [lambda builder: builder, inject_hyperparams], ids=["plain", "injected"])
@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_optimizer_matches_torch_optim_over_50_steps(case, wrap):
    make_fkd, make_torch = TORCH_CASES[case]
    ours, _ = run_fkd(make_fkd(wrap))
    theirs = run_torch(make_torch)
    assert not torch.allclose(ours["linear.weight"], init_params()["linear.weight"])  # it moved
    assert_trees_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_adamw_with_one_cycle_matches_torch_adamw_with_one_cycle_lr():
    ours, _ = run_fkd(adamw(one_cycle(0.05, total_steps=50), weight_decay=0.1))
    theirs = run_torch(
        lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=0.05, total_steps=50, anneal_strategy="cos", cycle_momentum=False
        ),
    )
    # The schedule is evaluated in float32 (the count is int64), hence 1e-5 rather than 1e-6.
    assert_trees_close(ours, theirs, rtol=1e-5, atol=1e-8)


def test_sgd_with_multistep_matches_torch_sgd_with_multistep_lr():
    ours, _ = run_fkd(sgd(multistep(0.1, [10, 30], gamma=0.5), momentum=0.9))
    theirs = run_torch(
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[10, 30], gamma=0.5),
    )
    assert_trees_close(ours, theirs, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------------


def test_chain_equals_its_parts_applied_by_hand():
    parts = [
        clip_by_global_norm(0.5),
        add_decayed_weights(0.01),
        trace(0.9, nesterov=True),
        scale_by_adam(b1=0.8),
        scale(0.5),
        scale_by_learning_rate(cosine_decay(0.1, 10)),
    ]
    chained = chain(*parts)
    params = init_params()
    chain_state = chained.init(params)
    part_states = [p.init(params) for p in parts]
    assert isinstance(chain_state, tuple) and len(chain_state) == len(parts)
    for _ in range(4):
        grads = grad(regression_loss)(params)
        chain_updates, chain_state = chained.update(grads, chain_state, params)
        updates = grads
        for i, part in enumerate(parts):
            updates, part_states[i] = part.update(updates, part_states[i], params)
        assert_trees_close(chain_updates, updates, rtol=0, atol=0)
        for a, b in zip(tree_leaves(chain_state), tree_leaves(tuple(part_states)), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        params = apply_updates(params, chain_updates)


def test_named_optimizers_are_chains_of_building_blocks():
    params, grads = init_params(), grad(regression_loss)(init_params())
    by_hand = chain(scale_by_adam(), add_decayed_weights(0.1), scale_by_learning_rate(0.01))
    a, _ = adamw(0.01, weight_decay=0.1).update(grads, adamw(0.01, weight_decay=0.1).init(params), params)
    b, _ = by_hand.update(grads, by_hand.init(params), params)
    assert_trees_close(a, b, rtol=0, atol=0)


def test_identity_and_scale():
    params, grads = init_params(), grad(regression_loss)(init_params())
    u, s = identity().update(grads, identity().init(params), params)
    assert u is grads and s == {}
    u, _ = scale(-2.0).update(grads, {}, params)
    assert_trees_close(u, tree_map(lambda g: -2.0 * g, grads))


# ---------------------------------------------------------------------------------------------------
# Convergence, and swapping optimizers
# ---------------------------------------------------------------------------------------------------

CURVATURE = {"a": torch.tensor([0.5, 1.0, 2.0], dtype=F64), "b": torch.tensor([[1.5, 0.7], [3.0, 1.0]], dtype=F64)}
TARGET = {"a": torch.tensor([1.0, -2.0, 0.5], dtype=F64), "b": torch.tensor([[0.0, 3.0], [-1.0, 2.0]], dtype=F64)}


def quadratic(params):
    return sum(0.5 * (CURVATURE[k] * (params[k] - TARGET[k]) ** 2).sum() for k in params)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_converges_on_a_quadratic(name):
    opt = OPTIMIZERS.get(name)(learning_rate=0.1)  # the one line that differs between optimizers
    params = {k: torch.zeros_like(v) for k, v in TARGET.items()}
    state = opt.init(params)
    for _ in range(300):
        updates, state = opt.update(grad(quadratic)(params), state, params)
        params = apply_updates(params, updates)
    # AdamW's default decay pulls slightly towards 0, so its optimum is not exactly TARGET.
    tol = 5e-2 if name == "adamw" else 1e-3
    assert_trees_close(params, TARGET, rtol=0, atol=tol)


@pytest.mark.parametrize(
    "opt",
    [
        sgd(0.1, momentum=0.9, nesterov=True),
        chain(clip_by_global_norm(1.0), adam(warmup_cosine(0.1, 20, 300))),
        sgd(one_cycle(0.3, 300)),
    ],
    ids=["sgd_nesterov", "clip_adam_warmup_cosine", "sgd_one_cycle"],
)
def test_variants_and_schedules_converge_on_a_quadratic(opt):
    params = {k: torch.zeros_like(v) for k, v in TARGET.items()}
    state = opt.init(params)
    for _ in range(300):
        updates, state = opt.update(grad(quadratic)(params), state, params)
        params = apply_updates(params, updates)
    assert_trees_close(params, TARGET, rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------------------
# The functional contract
# ---------------------------------------------------------------------------------------------------

ALL_OPTIMIZERS = {
    "sgd_momentum_wd": lambda: sgd(0.1, momentum=0.9, weight_decay=0.01),
    "adam_wd": lambda: adam(cosine_decay(0.01, 10), weight_decay=0.01),
    "adamw": lambda: adamw(0.01),
    "clip_sgd": lambda: chain(clip_by_global_norm(0.1), sgd(0.1)),
}


@pytest.mark.parametrize("name", list(ALL_OPTIMIZERS))
def test_update_does_not_modify_params_grads_or_state(name):
    opt = ALL_OPTIMIZERS[name]()
    params = init_params()
    _, state = opt.update(grad(regression_loss)(params), opt.init(params), params)  # non-trivial state
    grads = grad(regression_loss)(params)
    before = tree_clone((params, grads, state))
    updates, new_state = opt.update(grads, state, params)
    new_params = apply_updates(params, updates)
    for a, b in zip(tree_leaves((params, grads, state)), tree_leaves(before), strict=True):
        assert torch.equal(a, b)
    # Nothing returned shares memory with the state that was passed in.
    old = {t.data_ptr() for t in tree_leaves((params, state))}
    assert not any(t.data_ptr() in old for t in tree_leaves((new_params, new_state)))


@pytest.mark.parametrize("name", list(ALL_OPTIMIZERS))
def test_step_count_is_an_int64_tensor_in_the_state(name):
    opt = ALL_OPTIMIZERS[name]()
    _, state = run_fkd(opt, steps=3)

    def find_counts(tree):
        if isinstance(tree, dict):
            return [v for k, v in tree.items() if k == "count"] + [c for v in tree.values() for c in find_counts(v)]
        if isinstance(tree, tuple):
            return [c for member in tree for c in find_counts(member)]
        return []

    counts = find_counts(state)
    assert counts
    for count in counts:
        assert isinstance(count, torch.Tensor) and count.dtype == torch.int64 and count.dim() == 0
        assert int(count) == 3


def test_state_lives_on_the_params_device():
    params = {"w": torch.empty(4, 3, device="meta"), "b": torch.empty(3, device="meta")}
    for leaf in tree_leaves(adam(cosine_decay(0.1, 10)).init(params)):
        assert leaf.device.type == "meta"


def test_state_round_trips_through_torch_save_weights_only():
    opt = chain(clip_by_global_norm(1.0), adamw(warmup_cosine(0.1, 3, 20)))
    params, state = run_fkd(opt, steps=5)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    grads = grad(regression_loss)(params)
    a, sa = opt.update(grads, state, params)
    b, sb = opt.update(grads, loaded, params)
    assert_trees_close(a, b, rtol=0, atol=0)
    for x, y in zip(tree_leaves(sa), tree_leaves(sb), strict=True):
        assert torch.equal(x, y)


def test_grads_may_list_keys_in_another_order_than_params():
    params = init_params()
    grads = grad(regression_loss)(params)
    reversed_grads = dict(reversed(list(grads.items())))
    opt = adam(0.1, weight_decay=0.1)
    a, _ = opt.update(grads, opt.init(params), params)
    b, _ = opt.update(reversed_grads, opt.init(params), params)
    assert_trees_close(a, {k: b[k] for k in a}, rtol=0, atol=0)
    assert list(apply_updates(params, b)) == list(params)


def test_apply_updates_keeps_each_parameter_dtype():
    params = {"w": torch.ones(3, dtype=torch.bfloat16), "b": torch.ones(2, dtype=F64)}
    updates = {"w": torch.full((3,), 0.5), "b": torch.full((2,), 0.25)}
    out = apply_updates(params, updates)
    assert out["w"].dtype == torch.bfloat16 and out["b"].dtype == F64
    assert torch.equal(out["w"].float(), torch.full((3,), 1.5))
    assert torch.equal(out["b"], torch.full((2,), 1.25, dtype=F64))


# ---------------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.3, 100.0], ids=["clipped", "within_bound"])
def test_clip_by_global_norm_equals_clip_grad_norm_(max_norm):
    grads = {
        "a": torch.randn(4, 5, generator=gen(3), dtype=F64),
        "b": torch.randn(7, generator=gen(4), dtype=F64),
        "c": torch.randn(2, 3, 2, generator=gen(5), dtype=F64),
    }
    tensors = [g.clone().requires_grad_(True) for g in grads.values()]
    for t, g in zip(tensors, grads.values()):
        t.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    clip = clip_by_global_norm(max_norm)
    clipped, state = clip.update(grads, clip.init(grads))
    assert state == {}
    torch.testing.assert_close(global_norm(grads), total, rtol=1e-12, atol=0)
    for t, k in zip(tensors, grads):
        torch.testing.assert_close(clipped[k], t.grad, rtol=1e-12, atol=0)
    if max_norm > total:
        assert_trees_close(clipped, grads, rtol=0, atol=0)


def test_global_norm_is_the_norm_of_all_entries():
    tree = {"a": torch.randn(3, 4, generator=gen(6)), "b": torch.randn(5, generator=gen(7))}
    expected = torch.cat([t.flatten() for t in tree.values()]).norm()
    torch.testing.assert_close(global_norm(tree), expected)


# ---------------------------------------------------------------------------------------------------
# vmap and torch.compile
# ---------------------------------------------------------------------------------------------------

VMAP_OPTIMIZERS = {
    "sgd_nesterov_wd": lambda: sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam_schedule_wd": lambda: adam(warmup_cosine(0.05, 2, 10), weight_decay=0.05),
    "clip_adamw": lambda: chain(clip_by_global_norm(0.5), adamw(0.05)),
}


@pytest.mark.parametrize("name", list(VMAP_OPTIMIZERS))
def test_vmap_over_two_stacked_param_sets_equals_two_separate_runs(name):
    opt = VMAP_OPTIMIZERS[name]()
    members = [init_params(seed=2), init_params(seed=10)]
    xs = torch.stack([X, 2 * X])

    def step(params, state, x):
        grads = grad(regression_loss)(params, x)
        updates, state = opt.update(grads, state, params)
        return apply_updates(params, updates), state

    stacked = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    state = vmap(opt.init)(stacked)
    for _ in range(3):
        stacked, state = vmap(step)(stacked, state, xs)

    for i, params in enumerate(members):
        member_state = opt.init(params)
        for _ in range(3):
            params, member_state = step(params, member_state, xs[i])
        assert_trees_close({k: v[i] for k, v in stacked.items()}, params, rtol=1e-10, atol=1e-12)
        for a, b in zip(tree_leaves(state), tree_leaves(member_state), strict=True):
            torch.testing.assert_close(a[i], b, rtol=1e-10, atol=1e-12)


def test_compiled_step_matches_eager_and_does_not_recompile(fresh_dynamo):
    opt = chain(clip_by_global_norm(1.0), adamw(one_cycle(0.05, 20), weight_decay=0.1))

    def step(params, state):
        grads = grad(regression_loss)(params)
        updates, state = opt.update(grads, state, params)
        return apply_updates(params, updates), state

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    eager_params = compiled_params = init_params()
    eager_state = compiled_state = opt.init(eager_params)
    compiled_params, compiled_state = compiled(compiled_params, compiled_state)  # traces once
    eager_params, eager_state = step(eager_params, eager_state)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            compiled_params, compiled_state = compiled(compiled_params, compiled_state)
            eager_params, eager_state = step(eager_params, eager_state)
    assert_trees_close(compiled_params, eager_params, rtol=1e-12, atol=1e-14)
    assert int(compiled_state[1][2]["count"]) == 4


def test_compiled_vmapped_update_matches_eager(fresh_dynamo):
    opt = adam(cosine_decay(0.05, 10), weight_decay=0.01)
    stacked = {k: torch.stack([v, v + 1]) for k, v in init_params().items()}
    grads = {k: torch.randn(v.shape, generator=gen(8), dtype=F64) for k, v in stacked.items()}
    state = vmap(opt.init)(stacked)
    expected, _ = vmap(opt.update)(grads, state, stacked)
    compiled = torch.compile(vmap(opt.update), backend="eager", fullgraph=True)
    actual, _ = compiled(grads, state, stacked)
    assert_trees_close(actual, expected, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------


def values(schedule, steps, dtype=F64):
    return torch.stack([schedule(torch.tensor(s, dtype=dtype)) for s in steps])


def test_registries_name_every_schedule_and_optimizer():
    assert SCHEDULES.names() == ("constant", "cosine", "warmup_cosine", "multistep", "one_cycle")
    assert OPTIMIZERS.names() == ("sgd", "adam", "adamw")
    assert (OPTIMIZERS.get("sgd"), OPTIMIZERS.get("adam"), OPTIMIZERS.get("adamw")) == (sgd, adam, adamw)


@pytest.mark.parametrize(
    "schedule, steps, expected",
    [
        (constant(0.3), [0, 1, 1000], [0.3, 0.3, 0.3]),
        (cosine_decay(1.0, 10), [0, 5, 10, 20], [1.0, 0.5, 0.0, 0.0]),
        (cosine_decay(2.0, 10, alpha=0.1), [0, 5, 10], [2.0, 1.1, 0.2]),
        (warmup_cosine(1.0, 10, 110), [0, 5, 10, 60, 110, 500], [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]),
        (warmup_cosine(1.0, 4, 8, init_value=0.2, end_value=0.1), [0, 2, 4, 6, 8], [0.2, 0.6, 1.0, 0.55, 0.1]),
        (warmup_cosine(1.0, 0, 10), [0, 5, 10], [1.0, 0.5, 0.0]),
        (multistep(1.0, [3, 6], gamma=0.1), [0, 2, 3, 5, 6, 100], [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]),
        # one_cycle(1, 10, pct_start=0.3, div=4, final_div=10): peak at step 2, floor 0.025 at step 9.
        (
            one_cycle(1.0, 10, div_factor=4.0, final_div_factor=10.0),
            [0, 1, 2, 9, 50],
            [0.25, 0.625, 1.0, 0.025, 0.025],
        ),
    ],
    ids=[
        "constant",
        "cosine",
        "cosine_alpha",
        "warmup_cosine",
        "warmup_cosine_ends",
        "no_warmup",
        "multistep",
        "one_cycle",
    ],
)
def test_schedule_hard_coded_values(schedule, steps, expected):
    torch.testing.assert_close(values(schedule, steps), torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)


def torch_scheduler_lrs(make_sched, lr, steps):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make_sched(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return torch.tensor(lrs, dtype=F64)


@pytest.mark.parametrize(
    "total, pct, div, final_div", [(100, 0.3, 25.0, 1e4), (37, 0.25, 10.0, 100.0), (10, 0.5, 5.0, 1e3)]
)
def test_one_cycle_equals_torch_one_cycle_lr(total, pct, div, final_div):
    expected = torch_scheduler_lrs(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=0.4, total_steps=total, pct_start=pct, div_factor=div, final_div_factor=final_div,
            anneal_strategy="cos", cycle_momentum=False,
        ),
        lr=0.4,
        steps=total,
    )
    ours = values(one_cycle(0.4, total, pct_start=pct, div_factor=div, final_div_factor=final_div), range(total))
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("alpha", [0.0, 0.05])
def test_cosine_decay_equals_torch_cosine_annealing_lr(alpha):
    expected = torch_scheduler_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=40, eta_min=alpha * 0.3), lr=0.3, steps=41
    )
    torch.testing.assert_close(values(cosine_decay(0.3, 40, alpha), range(41)), expected, rtol=1e-10, atol=1e-14)


def test_multistep_equals_torch_multistep_lr():
    expected = torch_scheduler_lrs(
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[5, 9, 9, 20], gamma=0.3), lr=0.2, steps=30
    )
    torch.testing.assert_close(values(multistep(0.2, [5, 9, 9, 20], 0.3), range(30)), expected, rtol=1e-12, atol=0)


ALL_SCHEDULES = {
    "constant": constant(0.1),
    "cosine": cosine_decay(0.1, 100, 0.01),
    "warmup_cosine": warmup_cosine(0.1, 10, 100),
    "multistep": multistep(0.1, [30, 60]),
    "one_cycle": one_cycle(0.1, 100),
}


@pytest.mark.parametrize("name", list(ALL_SCHEDULES))
def test_schedule_takes_int64_or_float_counts_and_returns_a_0d_float_tensor(name):
    schedule = ALL_SCHEDULES[name]
    from_int = schedule(torch.tensor(42, dtype=torch.int64))
    from_float = schedule(torch.tensor(42.0, dtype=F64))
    assert from_int.dim() == 0 and from_int.dtype == torch.get_default_dtype()
    assert from_float.dim() == 0 and from_float.dtype == F64
    torch.testing.assert_close(from_int.double(), from_float, rtol=1e-6, atol=0)
    assert schedule(torch.tensor(0, device="meta")).device.type == "meta"


@pytest.mark.parametrize("name", list(ALL_SCHEDULES))
def test_schedule_compiles_without_graph_breaks_or_recompiles(name, fresh_dynamo):
    schedule = ALL_SCHEDULES[name]
    compiled = torch.compile(schedule, backend="eager", fullgraph=True)
    compiled(torch.tensor(0))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in (1, 35, 99, 150):
            torch.testing.assert_close(compiled(torch.tensor(step)), schedule(torch.tensor(step)))


@pytest.mark.parametrize("name", list(ALL_SCHEDULES))
def test_schedule_vmaps_over_counts(name):
    schedule = ALL_SCHEDULES[name]
    counts = torch.arange(0, 120, 7)
    torch.testing.assert_close(vmap(schedule)(counts), torch.stack([schedule(c) for c in counts]))


def test_learning_rate_may_be_a_schedule():
    lr = multistep(0.1, [1, 2], gamma=0.5)
    opt = scale_by_learning_rate(lr)
    grads = {"w": torch.ones(2, dtype=F64)}
    state = opt.init(grads)
    seen = []
    for _ in range(4):
        updates, state = opt.update(grads, state)
        seen.append(updates["w"][0])
    torch.testing.assert_close(torch.stack(seen), torch.tensor([-0.1, -0.05, -0.025, -0.025], dtype=F64))
    assert int(state["count"]) == 4


# ---------------------------------------------------------------------------------------------------
# Invalid settings
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: sgd(-0.1),
        lambda: sgd(0.1, nesterov=True),
        lambda: adam(0.1, b1=1.0),
        lambda: adamw(0.1, weight_decay=-1.0),
        lambda: clip_by_global_norm(0.0),
        lambda: cosine_decay(0.1, 0),
        lambda: warmup_cosine(0.1, 10, 10),
        lambda: one_cycle(0.1, 100, pct_start=1.0),
        lambda: multistep(0.1, [-1]),
    ],
)
def test_invalid_hyperparameters_raise_config_error(build):
    with pytest.raises(ConfigError):
        build()


def test_add_decayed_weights_needs_params():
    opt = add_decayed_weights(0.1)
    with pytest.raises(ValueError, match="needs params"):
        opt.update({"w": torch.ones(2)}, opt.init({"w": torch.ones(2)}))


def test_one_cycle_starts_at_max_over_div_factor():
    assert math.isclose(float(one_cycle(1.0, 100)(torch.tensor(0))), 1.0 / 25.0, rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------------
# From a config: the registries, the keys each entry takes, the schedules in epochs
# ---------------------------------------------------------------------------------------------------

STEPS_PER_EPOCH, EPOCHS = 7, 4  # 28 steps


@pytest.mark.parametrize("settings, direct", [
    ({"schedule": "constant"}, constant(0.1)),
    ({"schedule": "cosine"}, cosine_decay(0.1, 28)),
    ({"schedule": "warmup_cosine", "warmup_epochs": 1.5}, warmup_cosine(0.1, 10, 28)),  # round(1.5 * 7) = 10
    ({"schedule": "multistep", "milestones": [1, 3], "gamma": 0.5}, multistep(0.1, [7, 21], 0.5)),
    ({"schedule": "one_cycle"}, one_cycle(0.1, 28)),
])
def test_learning_rate_schedule_states_each_schedule_in_epochs(settings, direct):
    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=0.1, **settings), STEPS_PER_EPOCH, EPOCHS)
    steps = torch.arange(0, 40)
    assert torch.equal(vmap(schedule)(steps), vmap(direct)(steps))


def test_warmup_covering_the_whole_run_is_a_config_error():
    with pytest.raises(ConfigError, match="warmup_epochs = 4.0 covers the whole run of 4 epochs"):
        learning_rate_schedule(OptimizerConfig(schedule="warmup_cosine", warmup_epochs=4.0), STEPS_PER_EPOCH, EPOCHS)


@pytest.mark.parametrize("settings, direct", [
    ({"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
     lambda lr: sgd(lr, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ({"name": "adam", "b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 1e-2},
     lambda lr: adam(lr, b1=0.8, b2=0.99, eps=1e-6, weight_decay=1e-2)),
    # an option's default is its builder's: adamw's own weight_decay of 1e-2 (Architecture II), set 0 explicitly
    ({"name": "adamw"}, lambda lr: adamw(lr, weight_decay=1e-2)),
    ({"name": "adamw", "weight_decay": 0.0}, lambda lr: adamw(lr, weight_decay=0.0)),
])
def test_optimizer_from_config_passes_the_keys_the_optimizer_takes(settings, direct):
    cfg = OptimizerConfig(learning_rate=0.05, schedule="cosine", **settings)
    opt, schedule = optimizer_from_config(cfg, STEPS_PER_EPOCH, EPOCHS)
    assert_trees_close(run_fkd(opt, steps=20)[0], run_fkd(direct(cosine_decay(0.05, 28)), steps=20)[0],
                       rtol=0, atol=0)
    assert math.isclose(float(schedule(torch.tensor(0))), 0.05, rel_tol=1e-6)


def test_clipping_is_chained_before_any_optimizer():
    cfg = OptimizerConfig(name="sgd", learning_rate=0.1, clip_norm=0.01)
    opt, _ = optimizer_from_config(cfg, STEPS_PER_EPOCH, EPOCHS)
    direct = chain(clip_by_global_norm(0.01), sgd(constant(0.1)))
    assert_trees_close(run_fkd(opt, steps=5)[0], run_fkd(direct, steps=5)[0], rtol=0, atol=0)


@pytest.mark.parametrize("settings, message", [
    ({"name": "adam", "momentum": 0.9},
     "teacher.train.optimizer.momentum = 0.9 has no effect on optimizer 'adam', which takes b1, b2, eps, "
     "weight_decay; remove the key or pick sgd."),
    ({"name": "sgd", "b1": 0.5},
     "teacher.train.optimizer.b1 = 0.5 has no effect on optimizer 'sgd', which takes momentum, nesterov, "
     "weight_decay; remove the key or pick adam or adamw."),
    ({"name": "adamw", "nesterov": True},
     "teacher.train.optimizer.nesterov = true has no effect on optimizer 'adamw', which takes b1, b2, eps, "
     "weight_decay; remove the key or pick sgd."),
    ({"schedule": "cosine", "milestones": [2]},
     "teacher.train.optimizer.milestones = [2] has no effect on schedule 'cosine', which takes none of "
     "warmup_epochs, milestones, gamma; remove the key or pick multistep."),
    ({"schedule": "multistep", "warmup_epochs": 1.0},
     "teacher.train.optimizer.warmup_epochs = 1.0 has no effect on schedule 'multistep', which takes gamma, "
     "milestones; remove the key or pick warmup_cosine."),
])
def test_a_key_the_entry_does_not_take_fails_naming_it(settings, message):
    with pytest.raises(ConfigError) as info:
        optimizer_from_config(OptimizerConfig(**settings), STEPS_PER_EPOCH, EPOCHS, key="teacher.train.optimizer")
    assert str(info.value) == message
    # the same sentence when the config is read, before any run starts (prefix from the config's layout)
    overrides = [f"teacher.train.optimizer.{k}={v!r}".replace("True", "true").replace("'", '"')
                 for k, v in settings.items()]
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value) == message


def test_a_key_left_at_its_default_is_no_error():
    # momentum = 0 is the default: adam is fine with it; the teacher's built-in sgd keeps momentum 0.9
    optimizer_from_config(OptimizerConfig(name="adam", momentum=0.0), STEPS_PER_EPOCH, EPOCHS)
    assert load_config(None, ['train.optimizer.name="adamw"']).teacher.train.optimizer.momentum == 0.9


def test_unknown_optimizer_and_schedule_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match=r"teacher.train.optimizer.name = 'adamm' is not a known optimizer; "
                                          r"did you mean 'adam'\? valid: sgd, adam, adamw\."):
        optimizer_from_config(OptimizerConfig(name="adamm"), 1, 1, key="teacher.train.optimizer")
    with pytest.raises(ConfigError, match=r"train.optimizer.schedule = 'linear' is not a known schedule; "
                                          r"valid: constant, cosine, warmup_cosine, multistep, one_cycle\."):
        load_config(None, ['train.optimizer.schedule="linear"'])


def test_a_registered_optimizer_is_usable_from_a_config_with_its_own_keys():
    @OPTIMIZERS.register("test_signsgd")
    def signsgd(learning_rate, weight_decay: float = 0.0):
        return chain(add_decayed_weights(weight_decay), scale(1.0), scale_by_learning_rate(learning_rate))

    try:
        cfg = load_config(None, ['train.optimizer.name="test_signsgd"', "train.optimizer.weight_decay=0.1"])
        opt, _ = optimizer_from_config(cfg.train.optimizer, 1, 1)
        assert_trees_close(run_fkd(opt, steps=3)[0], run_fkd(signsgd(constant(1e-3), 0.1), steps=3)[0])
        with pytest.raises(ConfigError, match="has no effect on optimizer 'test_signsgd', which takes weight_decay"):
            load_config(None, ['train.optimizer.name="test_signsgd"', "train.optimizer.b1=0.5"])
    finally:
        OPTIMIZERS._entries.pop("test_signsgd")


# ---------------------------------------------------------------------------------------------------
# Hyperparameters in the state (inject_hyperparams)
# ---------------------------------------------------------------------------------------------------


def stack_trees(trees):
    """One tree whose leaves are the members' leaves stacked along a new first axis."""
    return tree_map(lambda *leaves: torch.stack(leaves), *trees)


def member(tree, i):
    return tree_map(lambda leaf: leaf[i], tree)


def signature(opt, params=None):
    """The state's structure: every leaf's path, shape and dtype."""
    return tree_signature(opt.init(init_params() if params is None else params))


def config_optimizer(**settings):
    cfg = OptimizerConfig(**{"learning_rate": 0.05, **settings})
    return optimizer_from_config(cfg, STEPS_PER_EPOCH, EPOCHS)[0]


def test_numbers_are_0d_tensors_in_the_state_and_static_options_are_not():
    opt = inject_hyperparams(sgd)(0.1, momentum=0.9, nesterov=True)
    state = opt.init(init_params())
    assert state.keys() == {"hyperparams", "inner"}
    assert state["hyperparams"].keys() == {"learning_rate", "momentum", "weight_decay"}  # the default too
    for value in state["hyperparams"].values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == F64  # params are float64
    assert float(state["hyperparams"]["momentum"]) == 0.9 and float(state["hyperparams"]["weight_decay"]) == 0.0
    assert tree_signature(state["inner"]) == tree_signature(sgd(0.1, momentum=0.9, nesterov=True).init(init_params()))
    # float32 for float32 (or lower-precision) params, on their device
    f32 = inject_hyperparams(adam)(0.1).init({"w": torch.zeros(3, device="meta", dtype=torch.bfloat16)})
    assert all(v.dtype == torch.float32 and v.device.type == "meta" for v in f32["hyperparams"].values())


def test_a_schedule_from_a_config_keeps_its_numbers_in_the_state():
    opt = config_optimizer(schedule="multistep", milestones=[1, 3], gamma=0.5)
    numbers = hyperparams(opt.init(init_params()))["learning_rate"]
    assert numbers.keys() == {"init_value", "gamma", "boundaries"}
    assert torch.equal(numbers["boundaries"], torch.tensor([7.0, 21.0], dtype=F64))  # milestones in steps
    assert float(numbers["init_value"]) == 0.05 and float(numbers["gamma"]) == 0.5


@pytest.mark.parametrize("a, b", [
    (lambda: inject_hyperparams(sgd)(0.1), lambda: inject_hyperparams(sgd)(0.3, momentum=0.9, weight_decay=5e-4)),
    (lambda: inject_hyperparams(sgd)(0.1, momentum=0.0, nesterov=False),
     lambda: inject_hyperparams(sgd)(0.1, momentum=0.8, nesterov=False)),
    (lambda: inject_hyperparams(adam)(0.1), lambda: inject_hyperparams(adam)(0.01, b1=0.5, b2=0.9, eps=1e-3,
                                                                          weight_decay=0.1)),
    (lambda: inject_hyperparams(adamw)(0.1, weight_decay=0.0), lambda: inject_hyperparams(adamw)(0.1)),
    (lambda: config_optimizer(name="sgd", momentum=0.0), lambda: config_optimizer(name="sgd", momentum=0.9,
                                                                                    weight_decay=5e-4)),
    (lambda: config_optimizer(learning_rate=0.1, schedule="warmup_cosine", warmup_epochs=1.0),
     lambda: config_optimizer(learning_rate=0.3, schedule="warmup_cosine", warmup_epochs=2.5)),
    (lambda: config_optimizer(schedule="multistep", milestones=[1, 2], gamma=0.1),
     lambda: config_optimizer(learning_rate=0.2, schedule="multistep", milestones=[2, 3], gamma=0.5)),
    (lambda: config_optimizer(schedule="one_cycle", clip_norm=1.0),
     lambda: config_optimizer(learning_rate=0.5, schedule="one_cycle", clip_norm=5.0)),
], ids=["sgd_lr_momentum_wd", "sgd_momentum_0_or_not", "adam_betas_eps", "adamw_wd_0_or_not", "config_sgd",
        "warmup_lr_and_length", "multistep_lr_gamma_milestones", "clip_bound_one_cycle"])
def test_the_state_structure_does_not_depend_on_the_numbers(a, b):
    opt_a, opt_b = a(), b()
    assert signature(opt_a) == signature(opt_b)
    params = init_params()
    state_a, state_b = opt_a.init(params), opt_b.init(params)
    assert any(not torch.equal(x, y) for x, y in zip(tree_leaves(state_a), tree_leaves(state_b)))
    # The update reads every number from the state: a's update runs b's state exactly as b's does.
    for _ in range(3):
        grads = grad(regression_loss)(params)
        theirs, next_b = opt_b.update(grads, state_b, params)
        ours, via_a = opt_a.update(grads, state_b, params)
        assert_trees_close(ours, theirs, rtol=0, atol=0)
        for x, y in zip(tree_leaves(via_a), tree_leaves(next_b), strict=True):
            assert torch.equal(x, y)
        params, state_b = apply_updates(params, theirs), next_b


def test_momentum_0_sgd_is_bit_identical_to_plain_gradient_descent():
    # Before, sgd without momentum or weight decay was the learning-rate step alone; now the momentum
    # buffer and the decay run at 0 and must change nothing, bit for bit, in float32 and float64.
    for dtype in (torch.float32, F64):
        params = {k: v.to(dtype) for k, v in init_params().items()}
        for injected, old in [
            (inject_hyperparams(sgd)(0.1), scale_by_learning_rate(0.1)),
            (sgd(0.1), scale_by_learning_rate(0.1)),
            # from a config, the (constant) schedule's value in float32, as before
            (config_optimizer(name="sgd", learning_rate=0.1), scale_by_learning_rate(constant(0.1))),
        ]:
            a, b = params, params
            sa, sb = injected.init(a), old.init(b)
            for _ in range(20):
                x = X.to(dtype)
                ua, sa = injected.update(grad(regression_loss)(a, x, Y.to(dtype)), sa, a)
                ub, sb = old.update(grad(regression_loss)(b, x, Y.to(dtype)), sb, b)
                a, b = apply_updates(a, ua), apply_updates(b, ub)
            for k in params:
                assert torch.equal(a[k], b[k]), (dtype, k)


def test_weight_decay_0_adamw_is_bit_identical_to_adam_without_decay():
    a, _ = run_fkd(inject_hyperparams(adamw)(0.02, weight_decay=0.0))
    b, _ = run_fkd(chain(scale_by_adam(), scale_by_learning_rate(0.02)))
    assert_trees_close(a, b, rtol=0, atol=0)


MEMBERS = [  # students of one sweep group: the same structure, every number different
    {"name": "sgd", "learning_rate": 0.05, "momentum": 0.0, "weight_decay": 0.0, "warmup_epochs": 0.5},
    {"name": "sgd", "learning_rate": 0.2, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 1.0},
    {"name": "sgd", "learning_rate": 0.1, "momentum": 0.5, "weight_decay": 1e-2, "warmup_epochs": 2.0},
]


def test_vmap_over_members_with_different_numbers_equals_each_member_alone():
    opts = [config_optimizer(schedule="warmup_cosine", clip_norm=2.0, **m) for m in MEMBERS]
    params = [init_params(seed=2 + i) for i in range(len(MEMBERS))]
    xs = torch.stack([X * (i + 1) for i in range(len(MEMBERS))])

    def step_with(opt):
        def step(p, s, x):
            updates, s = opt.update(grad(regression_loss)(p, x), s, p)
            return apply_updates(p, updates), s
        return step

    stacked_params = stack_trees(params)
    stacked_state = stack_trees([opt.init(p) for opt, p in zip(opts, params)])
    group_step = vmap(step_with(opts[0]))  # any member's update: the numbers come from the state
    for _ in range(12):
        stacked_params, stacked_state = group_step(stacked_params, stacked_state, xs)
    for i, (opt, p) in enumerate(zip(opts, params)):
        s = opt.init(p)
        for _ in range(12):
            p, s = step_with(opt)(p, s, xs[i])
        assert_trees_close(member(stacked_params, i), p, rtol=1e-12, atol=1e-14)
        for a, b in zip(tree_leaves(member(stacked_state, i)), tree_leaves(s), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_compiled_update_does_not_recompile_when_only_numbers_change(fresh_dynamo):
    opts = [config_optimizer(schedule="warmup_cosine", clip_norm=2.0, **m) for m in MEMBERS]
    params = init_params()

    def step(p, s):
        updates, s = opts[0].update(grad(regression_loss)(p), s, p)
        return apply_updates(p, updates), s

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    compiled(params, opts[0].init(params))  # traces once
    with torch._dynamo.config.patch(error_on_recompile=True):
        for opt in opts[1:]:
            state = opt.init(params)
            for _ in range(2):
                (p_c, s_c), (p_e, s_e) = compiled(params, state), step(params, state)
                assert_trees_close(p_c, p_e, rtol=1e-12, atol=1e-14)
                state = s_e


def test_compiled_vmapped_update_over_different_numbers_matches_eager(fresh_dynamo):
    # (a plain schedule function would be static: only an InjectableSchedule's numbers go in the state)
    schedules = [InjectableSchedule(cosine_decay, {"init_value": 0.05 * (i + 1), "decay_steps": 10}) for i in range(2)]
    opts = [inject_hyperparams(adamw)(schedules[i], b1=0.8 + 0.05 * i, weight_decay=0.1 * i) for i in range(2)]
    stacked = {k: torch.stack([v, v + 1]) for k, v in init_params().items()}
    grads = {k: torch.randn(v.shape, generator=gen(8), dtype=F64) for k, v in stacked.items()}
    state = stack_trees([opt.init(member(stacked, i)) for i, opt in enumerate(opts)])
    expected, _ = vmap(opts[0].update)(grads, state, stacked)
    compiled = torch.compile(vmap(opts[0].update), backend="eager", fullgraph=True)
    actual, _ = compiled(grads, state, stacked)
    assert_trees_close(actual, expected, rtol=1e-12, atol=1e-14)
    alone, _ = opts[1].update(member(grads, 1), opts[1].init(member(stacked, 1)), member(stacked, 1))
    assert_trees_close(member(actual, 1), alone, rtol=1e-12, atol=1e-14)


def test_hyperparams_are_read_through_a_chain_and_set_in_a_new_state():
    opt = config_optimizer(name="sgd", momentum=0.9, schedule="cosine", clip_norm=1.0)
    state = opt.init(init_params())
    found = hyperparams(state)
    assert found.keys() == {"max_norm", "learning_rate", "momentum", "weight_decay"}
    assert found["learning_rate"].keys() == {"init_value", "decay_steps"}
    changed = with_hyperparams(state, momentum=0.5, learning_rate={"init_value": 0.2})
    assert float(hyperparams(changed)["momentum"]) == 0.5
    assert float(hyperparams(changed)["learning_rate"]["init_value"]) == 0.2
    assert float(hyperparams(state)["momentum"]) == 0.9  # the original is untouched
    assert tree_signature(changed) == tree_signature(state)
    # the same as building the optimizer with those numbers
    direct = config_optimizer(name="sgd", momentum=0.5, learning_rate=0.2, schedule="cosine", clip_norm=1.0)
    params = init_params()
    a, _ = opt.update(grad(regression_loss)(params), changed, params)
    b, _ = direct.update(grad(regression_loss)(params), direct.init(params), params)
    assert_trees_close(a, b, rtol=0, atol=0)
    assert hyperparams(sgd(0.1).init(init_params())) == {}
    with pytest.raises(KeyError, match="no hyperparameter \\['b1'\\]"):
        with_hyperparams(state, b1=0.5)


def test_current_lr_reads_the_schedule_numbers_from_the_state():
    opt, schedule = optimizer_from_config(OptimizerConfig(learning_rate=0.1, schedule="warmup_cosine",
                                                          warmup_epochs=1.0), STEPS_PER_EPOCH, EPOCHS)
    state = opt.init(init_params())
    step = torch.tensor(3)
    assert math.isclose(current_lr(schedule, step, hyperparams(state)["learning_rate"]), 0.1 * 3 / 7, rel_tol=1e-6)
    faster = with_hyperparams(state, learning_rate={"peak_value": 0.4, "warmup_steps": 3.0})
    assert math.isclose(current_lr(schedule, step, hyperparams(faster)["learning_rate"]), 0.4, rel_tol=1e-6)
    assert current_lr(schedule, step) == current_lr(schedule, step, hyperparams(state)["learning_rate"])
    constant_lr = inject_hyperparams(sgd)(0.3).init(init_params())
    assert math.isclose(current_lr(constant(0.3), step, hyperparams(constant_lr)["learning_rate"]), 0.3,
                        rel_tol=1e-6)


@pytest.mark.parametrize("name", list(ALL_SCHEDULES))
def test_a_schedule_rebuilt_from_tensor_numbers_equals_the_schedule(name):
    settings = {"warmup_cosine": {"warmup_epochs": 1.5}, "multistep": {"milestones": [1, 3], "gamma": 0.5}}
    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=0.1, schedule=name, **settings.get(name, {})),
                                      STEPS_PER_EPOCH, EPOCHS)
    assert isinstance(schedule, InjectableSchedule)
    tensors = {k: torch.tensor(v) for k, v in schedule.numbers.items()}
    steps = torch.arange(0, 40)
    for dtype in (torch.float32, F64):  # the numbers follow the count's dtype
        torch.testing.assert_close(vmap(schedule.with_numbers(tensors))(steps.to(dtype)),
                                   vmap(schedule)(steps.to(dtype)), rtol=1e-6, atol=1e-9)
    # and the numbers themselves may be vmapped over, as a group of students' are
    stacked = {k: torch.stack([v, v]) for k, v in tensors.items()}
    per_member = vmap(lambda numbers: schedule.with_numbers(numbers)(torch.tensor(9)))(stacked)
    torch.testing.assert_close(per_member, schedule(torch.tensor(9)).expand(2))


def test_invalid_numbers_raise_their_config_error_before_injection():
    with pytest.raises(ConfigError, match="sgd with nesterov=True needs momentum > 0."):
        inject_hyperparams(sgd)(0.1, nesterov=True)
    with pytest.raises(ConfigError, match="adam needs 0 <= b1 < 1"):
        inject_hyperparams(adam)(0.1, b1=1.0)
    with pytest.raises(ConfigError, match="warmup_cosine needs decay_steps > warmup_steps"):
        InjectableSchedule(warmup_cosine, {"peak_value": 0.1, "warmup_steps": 10, "decay_steps": 10})


def test_a_user_optimizer_with_its_own_numeric_option_is_injected():
    @OPTIMIZERS.register("test_heavy_ball")
    def heavy_ball_sgd(learning_rate, heavy_ball: float = 0.5, nesterov: bool = False,
                       weight_decay: float = 0.0):
        """SGD whose momentum option is called ``heavy_ball``: written as any optimizer here is."""
        return chain(add_decayed_weights(weight_decay), trace(heavy_ball, nesterov),
                     scale_by_learning_rate(learning_rate))

    try:
        build = inject_hyperparams(OPTIMIZERS.get("test_heavy_ball"))
        opts = [build(0.1, heavy_ball=0.0), build(0.05, heavy_ball=0.9)]
        params = init_params()
        states = [opt.init(params) for opt in opts]
        assert states[1]["hyperparams"]["heavy_ball"].dim() == 0
        assert float(states[1]["hyperparams"]["heavy_ball"]) == 0.9
        assert "nesterov" not in states[1]["hyperparams"]
        assert tree_signature(states[0]) == tree_signature(states[1])
        stacked_params = stack_trees([params, params])
        g = grad(regression_loss)(params)
        updates, _ = vmap(opts[0].update)(stack_trees([g, g]), stack_trees(states), stacked_params)
        for i, opt in enumerate(opts):
            alone, _ = opt.update(g, states[i], params)
            assert_trees_close(member(updates, i), alone, rtol=0, atol=0)
        # and it matches torch.optim.SGD with that momentum
        ours, _ = run_fkd(build(0.05, heavy_ball=0.9))
        assert_trees_close(ours, run_torch(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)), rtol=1e-6, atol=1e-9)
    finally:
        OPTIMIZERS._entries.pop("test_heavy_ball")
