"""Memory plans (core.memory): every p-sized buffer counted before any work, the choice that fits, and a
refusal that names the number and the fix."""
from __future__ import annotations

import numpy as np
import pytest

from beam_influence.core import memory as M
from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
from beam_influence.core.projection import DeviceInfo, choose_method

GIB = M.GIB


def test_eigensystem_plan_counts_the_basis_and_six_vectors():
    p, n = 10_000_000, 150
    plan = M.plan_eigensystem(p=p, num_iters=n, top_k=50, host_free=64 * GIB)
    assert plan.choices["basis"] == "host" and plan.fits
    # basis (n+1)·p·4 + θ + six p-vectors' worth of operator buffers (two on "device" = host on CPU) + runtime
    assert plan.host_bytes == (n + 1) * p * 4 + p * 4 + 2 * p * 4 + 3 * p * 4 + M.RUNTIME_BYTES
    assert plan.host_bytes <= M.eigensystem_floor(p, n)
    line = plan.line()
    assert line.startswith("plan eigensystem: p=10,000,000, n=150, k=50, basis=host; host ")
    assert "of 64.00 GiB free" in line and "basis Q [151, p] 5.63 GiB" in line


def test_eigensystem_plan_refuses_with_the_fix_or_goes_to_disk():
    p, n = 110_000_000, 150  # the paper's size: a 61 GiB basis
    with pytest.raises(M.MemoryPlanError) as e:
        M.plan_eigensystem(p=p, num_iters=n, top_k=50, host_free=20 * GIB)
    msg = str(e.value)
    assert "needs 65." in msg and "of host memory" in msg and "20.00 GiB free" in msg
    assert "--basis mmap --basis_path" in msg
    # the fewest steps that fit: 18 GiB usable minus θ, vectors, runtime, in p·4 steps
    fewer = int(msg.split("--num_iters ")[1].split()[0])
    assert M.plan_eigensystem(p=p, num_iters=fewer, top_k=8, host_free=20 * GIB).fits
    with pytest.raises(M.MemoryPlanError):
        M.plan_eigensystem(p=p, num_iters=fewer + 2, top_k=8, host_free=20 * GIB)
    # with a basis file, auto goes to disk and only a few rows stay in memory
    plan = M.plan_eigensystem(p=p, num_iters=n, top_k=50, basis_path="/tmp/q.npy", host_free=20 * GIB)
    assert plan.choices["basis"] == "mmap" and plan.bytes_in("disk") == (n + 1) * p * 4
    assert plan.host_bytes < 6 * GIB


def test_eigensystem_plan_on_an_accelerator_places_the_basis_where_it_fits():
    p, n = 110_000_000, 150
    h200 = dict(platform="gpu", host_free=120 * GIB)
    assert M.plan_eigensystem(p=p, num_iters=n, top_k=50, device_free=139 * GIB, **h200).choices["basis"] == "device"
    plan = M.plan_eigensystem(p=p, num_iters=n, top_k=50, device_free=40 * GIB, **h200)
    assert plan.choices["basis"] == "host" and plan.device_bytes < 3 * GIB


def test_projection_plan_counts_u_and_picks_the_largest_micro_batch_that_fits():
    p, k = 110_000_000, 50  # U alone: 20.5 GiB
    plan = M.plan_projection("index", p=p, k=k, per_example_bytes_per_param=4, max_micro_batch=64,
                             host_free=40 * GIB)
    m = plan.choices["micro_batch"]
    assert m == 16  # 20.5 (U) + 0.4 (θ) + 1.6 (work) + 1 (runtime) + m·0.41 GiB within 0.9·40 GiB
    bigger = M.plan_projection("index", p=p, k=k, per_example_bytes_per_param=4, max_micro_batch=64,
                               micro_batch=2 * m, host_free=10**15)
    assert not M.MemoryPlan(bigger.stage, p, bigger.buffers, host_free=40 * GIB).fits
    assert plan.host_bytes <= M.projection_floor(p, k, m)
    with pytest.raises(M.MemoryPlanError) as e:
        M.plan_projection("index", p=p, k=k, per_example_bytes_per_param=4, max_micro_batch=64, host_free=20 * GIB)
    msg = str(e.value)
    assert "U alone 20.49 GiB" in msg and "20.00 GiB free" in msg
    k_fit = int(msg.split("--num_eigenpairs ")[1].split()[0])
    assert M.plan_projection("index", p=p, k=k_fit, per_example_bytes_per_param=4, max_micro_batch=1,
                             host_free=20 * GIB).fits


def test_choose_method_counts_u_on_the_device():
    p = 110_000_000
    gpu = DeviceInfo("gpu", "H100", 78 * GIB)
    small_k = choose_method(batch_size=1 << 20, k=8, num_params=p, device=gpu)
    big_k = choose_method(batch_size=1 << 20, k=128, num_params=p, device=gpu)
    assert small_k.micro_batch == 64 and big_k.micro_batch < small_k.micro_batch  # U (bf16) takes room
    assert big_k.memory["choices"]["micro_batch"] == big_k.micro_batch
    assert big_k.memory["device_bytes"] <= 0.9 * 78 * GIB
    with pytest.raises(M.MemoryPlanError, match="--num_eigenpairs"):
        choose_method(batch_size=1 << 20, k=400, num_params=p, device=gpu)
    with pytest.raises(M.MemoryPlanError, match="smaller --micro_batch"):
        choose_method(batch_size=1 << 20, k=128, num_params=p, device=gpu, micro_batch=64)


def test_the_eigensystem_is_refused_before_any_product(logreg_trained, monkeypatch):
    from beam_influence.core import estimate

    t = logreg_trained
    monkeypatch.setattr(estimate, "host_free_bytes", lambda: 512 << 20)  # less than the runtime alone
    built = []
    monkeypatch.setattr(estimate, "CurvatureOperator", lambda *a, **k: built.append(1))
    with pytest.raises(M.MemoryPlanError, match="needs .* of host memory"):
        compute_eigensystem(t.spec, t.params, t.train_batch, EigensystemArgs(num_iters=10, top_k=4))
    assert not built


def test_the_eigensystem_records_its_plan_and_time_estimate(logreg_trained):
    t = logreg_trained
    lines = []
    es = compute_eigensystem(t.spec, t.params, t.train_batch, EigensystemArgs(num_iters=12, top_k=4, batch_size=256),
                             log=lines.append)
    assert lines[0].startswith("plan eigensystem: p=650, n=12, k=4, basis=")
    assert lines[1].startswith("eigensystem: the first product took") and "16 products in all" in lines[1]
    a = es.args
    assert a["memory_plan"]["choices"] == {"n": 12, "k": 4, "basis": a["basis_used"]}
    assert a["products"] == 16 and a["first_product_s"] > 0 and a["product_s"] > 0
    assert a["estimated_total_s"] == pytest.approx(a["first_product_s"] + 15 * a["product_s"])
    # the Ritz vectors did not keep the basis alive: [k, p] float32, owning (or the only view of) its memory
    u = next(iter(es.eigvecs.values()))
    base = u.base if u.base is not None else u
    while getattr(base, "base", None) is not None:
        base = base.base
    assert np.asarray(base).nbytes <= 4 * 650 * 4 + 64


def test_the_projection_context_holds_u_once(logreg_trained, logreg_files, tmp_path):
    import jax

    from beam_influence.beam.resources import ModelRef

    _, model = logreg_files(tmp_path, EigensystemArgs(num_iters=20, top_k=6, batch_size=512))
    kw = dict(zip(model[::2], model[1::2]))
    ctx = ModelRef(spec=kw["--spec"], checkpoint=kw["--checkpoint"], eigensystem=kw["--eigensystem"],
                   method="auto").load()
    assert ctx.memory_plan and ctx.memory_plan["line"].startswith("plan projection: p=650, k=6, micro_batch=")
    assert ctx.plan.method == "leafwise"  # k < 64 on the CPU
    dev_ptrs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(ctx.projector.eigvecs)}
    host_ptrs = {v.__array_interface__["data"][0] for v in ctx.eigensystem.eigvecs.values()}
    assert host_ptrs == dev_ptrs  # one copy: the eigensystem's blocks are views of the device buffers


@pytest.mark.parametrize("basis", ["mmap", "device"])
def test_the_ritz_vectors_are_the_same_from_every_basis_placement(logreg_trained, tmp_path, basis):
    t = logreg_trained
    args = dict(num_iters=16, top_k=5, batch_size=512, residuals=False)
    host = compute_eigensystem(t.spec, t.params, t.train_batch, EigensystemArgs(basis="host", **args))
    other = compute_eigensystem(t.spec, t.params, t.train_batch, EigensystemArgs(
        basis=basis, basis_path=str(tmp_path / "q.npy") if basis == "mmap" else "", **args))
    assert other.args["basis_used"] == basis and other.args["memory_plan"]["choices"]["basis"] == basis
    np.testing.assert_allclose(other.ritz_values, host.ritz_values, rtol=1e-5)
    for v in other.eigvecs.values():  # copied out of the basis file: nothing keeps it mapped
        assert not isinstance(v, np.memmap) and not isinstance(v.base, np.memmap)
    flat = lambda es: np.concatenate([x.reshape(5, -1) for _, x in sorted(es.eigvecs.items())], axis=1)  # noqa: E731
    np.testing.assert_allclose(np.abs(np.sum(flat(host) * flat(other), axis=1)), 1.0, atol=1e-4)
