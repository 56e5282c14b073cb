"""GPU sharing in the engine: fractions of a GPU and MIG slices, their placement, counting, preemption and limits."""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from quotas import QueueSpec, QueueTree
from scheduler.engine import NodeSpec, Settings, Started
from scheduler.engine.baselines import BestFitFractionsEngine
from scheduler.engine.cluster import Pool
from scheduler.engine.engine import Engine
from scheduler.engine.model import JobSpec, JobState, exact, mig_fraction
from scheduler.engine.reference import ReferenceEngine
from scheduler.engine.sharing import best_fit_key, fgd_key, fragmentation
from scheduler.engine.shortcut_free import ShortcutFreeEngine
from scheduler.service.core.specs import JobSubmit, engine_spec_of
from scheduler.sim.inputs import InputError, SimJob, World, load_scenario, load_trace
from scheduler.sim.runner import Simulation
from tests.factories import cancel, engine, job, node, node_down, node_up, nodes, queue, world
from tests.prop_model import NO_GUARD, PROPERTY

SCENARIOS = Path(__file__).parent / "scenarios"

# ----- requests: what a job may ask -----


def test_fractions_and_mig_profiles_are_counted_as_documented() -> None:
    assert job("a", gpus=0.25).request == 0.25
    assert type(job("a", gpus=2.0).gpus) is int  # a whole amount stays an int: logs and reasons unchanged
    assert job("a", mig="1g.10gb").gpus == 0.142857
    assert job("a", mig="3g.40gb").request == 0.428571
    assert job("a", mig="7g.80gb").gpus == 1 and job("a", mig="7g.80gb").shared
    assert mig_fraction("2g.20gb+me") == 0.285714
    assert not job("a", gpus=4).shared and job("a", gpus=0.5).shared


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"gpus": 0.3, "workers": 2}, "0.3 with 2 workers"),
        ({"gpus": 1.5}, "above 1 it must be a whole number"),
        ({"gpus": -0.5}, "cannot be negative"),
        ({"gpus": float("nan")}, "a number of GPUs"),
        ({"mig": "1x.10gb"}, "not a MIG profile"),
        ({"mig": "1g.10gb", "workers": 2}, "for one worker"),
    ],
)
def test_bad_requests_say_what_and_where(kw: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match="job a") as err:
        job("a", **kw)
    assert words in str(err.value)


def test_a_node_layout_names_real_profiles() -> None:
    with pytest.raises(ValueError, match="node n0: mig: 'big' is not a MIG profile"):
        node("n0", mig={"big": 1})
    with pytest.raises(ValueError, match="node n0: mig 1g.10gb: -1 slices"):
        node("n0", mig={"1g.10gb": -1})


def _scenario(tmp_path: Path, job_line: str, pool: str = "{name: a100, nodes: 1, gpus_per_node: 2}") -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(
        f"cluster:\n  pools:\n    - {pool}\nqueues:\n  - {{name: team-a, quota: {{a100: 1}}}}\njobs:\n"
        f"  - {job_line}\nexpect: []\n"
    )
    return p


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("{id: j, queue: team-a, pool: a100, gpus: 0.3, workers: 2, submit: 0, duration: 1}", "0.3 with 2 workers"),
        ("{id: j, queue: team-a, pool: a100, gpus: 1.5, submit: 0, duration: 1}", "above 1"),
        ("{id: j, queue: team-a, pool: a100, gpus: -1, submit: 0, duration: 1}", "negative"),
        ("{id: j, queue: team-a, pool: a100, mig: 9g.1gb, submit: 0, duration: 1}", "not a MIG profile"),
        ("{id: j, queue: team-a, pool: a100, mig: 1g.10gb, gpus: 1, submit: 0, duration: 1}", "leave gpus out"),
    ],
)
def test_scenario_files_refuse_bad_shares_with_the_line(tmp_path: Path, line: str, words: str) -> None:
    with pytest.raises(InputError) as err:
        load_scenario(_scenario(tmp_path, line))
    assert "line 7" in err.value.where and "jobs[0]" in err.value.where
    assert words in err.value.what


def test_scenario_files_refuse_an_unknown_node_profile(tmp_path: Path) -> None:
    pool = "{name: a100, nodes: 1, gpus_per_node: 2, mig_per_node: {huge: 2}}"
    with pytest.raises(InputError) as err:
        load_scenario(_scenario(tmp_path, "{id: j, queue: team-a, pool: a100, submit: 0, duration: 1}", pool))
    assert "mig_per_node" in err.value.where and "not a MIG profile" in err.value.what


def test_trace_gpus_may_be_a_fraction_of_one_worker(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("id,submit,duration,queue,pool,workers,gpus\na,0,1,q,a100,1,0.25\nb,0,1,q,a100,1,2\n")
    a, b = load_trace(p)
    assert a.spec.gpus == 0.25 and type(b.spec.gpus) is int
    p.write_text("id,submit,duration,queue,pool,workers,gpus\na,0,1,q,a100,2,0.25\n")
    with pytest.raises(InputError, match="line 2, column gpus.*one worker"):
        load_trace(p)


# ----- placement -----


def _starts(decisions: list[Any]) -> dict[str, Started]:
    return {d.job: d for d in decisions if isinstance(d, Started)}


def test_fractions_share_a_gpu_and_give_it_back_whole() -> None:
    e = engine(nodes("a100", 1, 2), [queue("team-a", quota={"a100": 2})])
    for i, f in enumerate([0.5, 0.25, 0.25]):
        e.submit(job(f"f{i}", gpus=f), 0)
    started = _starts(e.schedule(0))
    assert {j: d.workers for j, d in started.items()} == {f"f{i}": (("a100-0", (0,)),) for i in range(3)}
    assert e.node_room("a100-0")[0] == 1  # GPU 1 still whole and free
    e.submit(job("w", gpus=2), 1)
    assert not e.schedule(1)  # GPU 0 is shared: no whole job on it
    for i in range(3):
        e.finish(f"f{i}", 2)
    assert _starts(e.schedule(2))["w"].workers == (("a100-0", (0, 1)),)


def test_usage_counts_fractions_exactly_and_returns_to_ints() -> None:
    e = engine(nodes("a100", 1, 1), [queue("team-a", quota={"a100": 1}, limit={"a100": 1})])
    for i, f in enumerate([0.1, 0.2, 0.7]):
        e.submit(job(f"f{i}", gpus=f), 0)
    e.submit(job("late", gpus=0.1), 0)
    assert set(_starts(e.schedule(0))) == {"f0", "f1", "f2"}
    load = e.pool_load("a100")
    assert load is not None and load.used("team-a") == 1 and type(load.used("team-a")) is int
    assert e.explain("late", 0).rule == "limit"
    for i in range(3):
        e.finish(f"f{i}", 1)
    e.schedule(1)
    load = e.pool_load("a100")
    assert load is not None and load.used("team-a") == 0.1


def test_pending_reasons_speak_of_fractions_and_slices() -> None:
    ns = [node("a100-0", gpus=1, mig={"1g.10gb": 1})]
    e = engine(ns, [queue("team-a", quota={"a100": 1})])
    e.submit(job("w", gpus=1), 0)
    e.submit(job("s1", mig="1g.10gb"), 0)
    e.submit(job("s2", mig="1g.10gb"), 0)
    e.submit(job("f", gpus=0.5), 0)
    e.schedule(0)
    assert e.job_state("w") is JobState.RUNNING and e.job_state("s1") is JobState.RUNNING
    assert "needs 0.5 of a GPU" in e.explain("f", 0).message
    assert "needs a MIG slice 1g.10gb" in e.explain("s2", 0).message


def test_a_restored_fraction_takes_its_share_and_no_more() -> None:
    e = engine(nodes("a100", 1, 1), [queue("team-a", quota={"a100": 1})])
    e.restore(job("a", gpus=0.5), 0, 0, [("a100-0", [0])])
    e.restore(job("b", gpus=0.25), 0, 0, [("a100-0", [0])])
    with pytest.raises(ValueError, match="0.5 of GPU"):
        e.restore(job("c", gpus=0.5), 0, 0, [("a100-0", [0])])
    e.submit(job("d", gpus=0.25), 0)
    assert _starts(e.schedule(0))["d"].workers == (("a100-0", (0,)),)


def test_a_restored_mig_job_takes_a_slice_of_its_profile() -> None:
    e = engine([node("a100-0", gpus=0, mig={"1g.10gb": 1})], [queue("team-a", quota={"a100": 0})])
    e.restore(job("a", mig="1g.10gb"), 0, 0, [("a100-0", [])])
    with pytest.raises(ValueError, match="a 1g.10gb slice of node a100-0 is not free"):
        e.restore(job("b", mig="1g.10gb"), 0, 0, [("a100-0", [])])
    e.finish("a", 1)
    e.submit(job("c", mig="1g.10gb"), 1)
    assert _starts(e.schedule(1))["c"].workers == (("a100-0", ()),)


def test_the_placement_rules_rank_as_documented() -> None:
    mix = {0.25: 1, 0.5: 2}
    # fgd: the 0.75 room stays useful to the 0.5s, the 0.5 room would not
    assert fgd_key(0.75, 0.25, mix) < fgd_key(0.5, 0.25, mix)
    assert best_fit_key(0.5, 0.25, mix) < best_fit_key(0.75, 0.25, mix)
    assert fgd_key(0.5, 0.5, mix) == (0.0, 0.0)  # no fragmentation either side: an exact fit ties on the room


def _run(path: Path, engine_type: type[Engine] | None = None) -> dict[str, Any]:
    return Simulation(load_scenario(path), log_fair_share=False, engine_type=engine_type).run()


def test_fragmentation_aware_placement_beats_best_fit_on_its_scenario() -> None:
    path = SCENARIOS / "42-fractions-fragmentation.yaml"
    started = {e["job"]: e["t"] for e in _run(path)["events"] if e["event"] == "started"}
    best_fit = {e["job"]: e["t"] for e in _run(path, BestFitFractionsEngine)["events"] if e["event"] == "started"}
    assert started["p2"] == 10 and best_fit["p2"] > 10


def test_started_entries_carry_the_fraction_and_whole_ones_do_not() -> None:
    events = _run(SCENARIOS / "45-mig-slices.yaml")["events"]
    by_job = {e["job"]: e for e in events if e["event"] == "started"}
    assert by_job["m1"]["nodes"] == {"a100-0": []} and by_job["m1"]["mig"] == "3g.40gb"
    assert by_job["m1"]["fraction"] == 0.428571
    assert set(by_job["w1"]) == {"t", "event", "job", "nodes"}
    events = _run(SCENARIOS / "40-fractions-pack.yaml")["events"]
    assert {"t": 0, "event": "started", "job": "f1", "nodes": {"a100-0": [0]}, "fraction": 0.25} in events


# ----- random worlds: the fast engine against the slow ones, and the sharing invariants -----

FRACTIONS = [0.1, 0.125, 0.2, 0.25, 0.3, 0.5, 0.75]
PROFILES = ["1g.10gb", "2g.20gb", "3g.40gb"]


def sharing_world(seed: int, n_nodes: int, n_teams: int, n_jobs: int, guard: float, min_runtime: float) -> World:
    """A saturated pool of 4-GPU nodes (some with MIG slices) and jobs that are half fractions or MIG slices."""
    rng = random.Random(seed)
    layout = {"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1}
    ns = [NodeSpec(f"n{i}", "h100", 4, mig=layout if i % 2 else {}) for i in range(n_nodes)]
    gpus = 4 * n_nodes
    quotas, left = [], gpus
    for _ in range(n_teams):
        quotas.append(min(left, rng.choice([0, 1, 2, 4])))
        left -= quotas[-1]
    specs = [
        QueueSpec(f"t{t}", quota={"h100": q}, limit={"h100": q + 2} if rng.random() < 0.25 else {})
        for t, q in enumerate(quotas)
    ]
    tree = QueueTree(specs, {"h100": gpus})
    jobs, t = [], 0.0
    for i in range(n_jobs):
        t += rng.expovariate(1 / 3)
        kind = rng.random()
        extra: dict[str, Any] = (
            {"gpus": rng.choice(FRACTIONS)}
            if kind < 0.4
            else {"mig": rng.choice(PROFILES)}
            if kind < 0.55
            else {"gpus": rng.choice([1, 1, 2, 4]), "workers": rng.choice([1, 1, 2])}
        )
        spec = JobSpec(
            f"j{i}",
            f"t{rng.randrange(n_teams)}",
            "h100",
            priority=rng.choice([0, 0, 1]),
            preemptible=rng.random() < 0.9,
            **extra,
        )
        jobs.append(SimJob(spec, round(t, 1), float(rng.randint(5, 300))))
    return world(ns, tree, jobs, [], Settings(min_runtime=min_runtime, starvation_timeout=guard))


def churned_world(seed: int) -> World:
    """A sharing_world of random size with nodes going down and up and cancellations."""
    rng = random.Random(seed)
    w = sharing_world(
        seed,
        rng.randint(1, 4),
        rng.randint(2, 12),
        rng.randint(20, 150),
        rng.choice([NO_GUARD, 60.0]),
        rng.choice([0.0, 20.0]),
    )
    names = [n.name for n in w.nodes]
    events = []
    for _ in range(rng.randint(0, 4)):
        t, n = rng.uniform(0, 300), rng.choice(names)
        events += [node_down(round(t, 1), n), node_up(round(t + rng.uniform(1, 100), 1), n)]
    for _ in range(rng.randint(0, 4)):
        events.append(cancel(round(rng.uniform(0, 300), 1), rng.choice(w.jobs).spec.id))
    w.events = sorted(events, key=lambda e: e.at)
    return w


def check_sharing(w: World, events: list[dict[str, Any]]) -> None:
    """Per physical GPU the fractions sum to at most 1, and a shared GPU holds no whole job; MIG slices in use per
    node and profile stay within the layout."""
    specs = {j.spec.id: j.spec for j in w.jobs}
    layout = {n.name: dict(n.mig) for n in w.nodes}
    holding: dict[str, list[tuple[str, int | str]]] = {}
    whole: dict[tuple[str, int], str] = {}
    shares: dict[tuple[str, int], float] = {}
    slices: dict[tuple[str, str], int] = {}
    for e in events:
        j = e["job"]
        if e["event"] == "started":
            spec = specs[j]
            places: list[tuple[str, int | str]] = []
            for n, gs in e["nodes"].items():
                if spec.mig is not None:
                    assert gs == [] and e["mig"] == spec.mig and e["fraction"] == spec.gpus
                    slices[n, spec.mig] = slices.get((n, spec.mig), 0) + 1
                    assert slices[n, spec.mig] <= layout[n].get(spec.mig, 0), (e, slices)
                    places.append((n, spec.mig))
                for g in gs:
                    assert (n, g) not in whole, (e, whole[n, g])
                    if spec.shared:
                        assert e["fraction"] == spec.gpus
                        shares[n, g] = round(shares.get((n, g), 0.0) + spec.gpus, 6)
                        assert shares[n, g] <= 1, (e, shares[n, g])
                    else:
                        assert (n, g) not in shares, (e, shares[n, g])
                        whole[n, g] = j
                    places.append((n, g))
            holding[j] = places
        elif e["event"] in ("completed", "preempted", "cancelled", "failed") and j in holding:
            spec = specs[j]
            for n, g in holding.pop(j):
                if isinstance(g, str):
                    slices[n, g] -= 1
                elif spec.shared:
                    shares[n, g] = round(shares[n, g] - spec.gpus, 6)
                    if shares[n, g] <= 0:
                        del shares[n, g]
                else:
                    del whole[n, g]


def first_rule(room: float, fraction: float, mix: Mapping[float, int]) -> tuple[float, ...]:
    """The first fgd_key, which counted the job being placed in the pending mix: the worlds the regression tests
    below were found in unfold under it."""
    left = exact(room - fraction)
    return (exact(fragmentation(left, mix) - fragmentation(room, mix)), left)


class FirstRule(Engine):
    def share_key(self, room: float, fraction: float, mix: Mapping[float, int]) -> tuple[float, ...]:
        return first_rule(room, fraction, mix)


class FirstRuleReference(ReferenceEngine):
    def share_key(self, room: float, fraction: float, mix: Mapping[float, int]) -> tuple[float, ...]:
        return first_rule(room, fraction, mix)


class FirstRuleShortcutFree(ShortcutFreeEngine):
    def share_key(self, room: float, fraction: float, mix: Mapping[float, int]) -> tuple[float, ...]:
        return first_rule(room, fraction, mix)


def _log(w: World, engine_type: type[Engine] | None) -> dict[str, Any]:
    sim = Simulation(copy.deepcopy(w), "corral", log_fair_share=False, engine_type=engine_type)
    log = sim.run()
    log["holds"] = [(h.at, h.job, h.starving, h.cause) for h in sim.holds or []]
    return log


@settings(PROPERTY, max_examples=40)
@given(
    seed=st.integers(0, 10**6),
    n_nodes=st.integers(1, 4),
    n_teams=st.integers(2, 16),
    n_jobs=st.integers(10, 120),
    guard=st.sampled_from([NO_GUARD, 60.0]),
    min_runtime=st.sampled_from([0.0, 0.0, 20.0]),
)
def test_shared_worlds_decide_alike_and_never_overfill_a_gpu(
    seed: int, n_nodes: int, n_teams: int, n_jobs: int, guard: float, min_runtime: float
) -> None:
    w = sharing_world(seed, n_nodes, n_teams, n_jobs, guard, min_runtime)
    fast = _log(w, None)
    check_sharing(w, fast["events"])
    assert fast == _log(w, ReferenceEngine)
    assert fast["events"] == _log(w, ShortcutFreeEngine)["events"]  # it records more guard holds: it skips nothing
    ends = {e["job"] for e in fast["events"] if e["event"] in ("completed", "rejected")}
    assert ends == {j.spec.id for j in w.jobs}  # nothing waits forever


@settings(PROPERTY, max_examples=30)
@given(seed=st.integers(0, 10**6))
def test_churned_shared_worlds_decide_alike(seed: int) -> None:
    w = churned_world(seed)
    fast = _log(w, None)
    check_sharing(w, fast["events"])
    assert fast == _log(w, ReferenceEngine)
    assert fast["events"] == _log(w, ShortcutFreeEngine)["events"]


def test_nodes_the_reservation_lets_go_are_used_at_once() -> None:
    """Found by churned_world(220): a fraction opened the last free GPU of the node reserved for a starving job, so
    the reservation moved to another node; what that GPU had left (0.8) was free for others at once, but the engine
    passed again only when the reservation's job changed, and the room waited for the next event (an extra wakeup
    of ShortcutFreeEngine's found it first). A reservation that lets nodes go now counts as moved."""
    w = churned_world(220)
    fast = _log(w, FirstRule)
    assert fast["events"] == _log(w, FirstRuleShortcutFree)["events"]
    assert {"t": 1337.7, "event": "started", "job": "j51", "nodes": {"n1": [1]}, "fraction": 0.25} in fast["events"]


def test_a_queue_read_in_a_pass_comes_back_when_it_loses_a_job() -> None:
    """Found by churned_world(75): a parked queue woken and read in a pass started its last pending job, then lost a
    running one to a preemption later in the pass (for a job kept off the reserved nodes); once the reservation's
    job started, the free room there was its again. The pass took it for a parked queue it had passed by (its
    parked mark is stale until the pass ends) and never read it again; ReferenceEngine did (ordering.PassOrder)."""
    w = churned_world(75)
    assert _log(w, FirstRule) == _log(w, FirstRuleReference)


def test_best_fit_fractions_keeps_the_invariants_too() -> None:
    w = sharing_world(11, 3, 8, 150, NO_GUARD, 0.0)
    check_sharing(w, Simulation(w, "best-fit-fractions", log_fair_share=False).run()["events"])


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"gpus": 0.3, "workers": 2}, "0.3 with 2 workers"),
        ({"gpus": 1.5}, "above 1 it must be a whole number"),
        ({"mig": "1g.10gb", "gpus": 1}, "leave gpus out"),
        ({"mig": "big"}, "not a MIG profile"),
    ],
)
def test_the_job_api_refuses_bad_shares(body: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as err:
        JobSubmit.model_validate({"queue": "team-a", "command": ["true"], **body})
    assert words in str(err.value)


def test_the_job_api_passes_shares_to_the_engine() -> None:
    share = JobSubmit.model_validate({"queue": "team-a", "command": ["true"], "gpus": 0.25}).engine_spec(7, "a100")
    assert share.gpus == 0.25 and share.id == "job-7"
    mig = JobSubmit.model_validate({"queue": "team-a", "command": ["true"], "mig": "2g.20gb"}).engine_spec(8, "a100")
    assert mig.mig == "2g.20gb" and mig.gpus == 0.285714
    assert engine_spec_of({"queue": "team-a", "gpus": 0.25}, 9, "a100").gpus == 0.25


def test_a_pools_capacity_with_mig_slices_is_exact_after_nodes_go_down_and_up() -> None:
    """Capacity with MIG slices is a fraction; a node going down and up must leave exactly what it found (fair shares
    read it, and a rebuilt engine computes it afresh): 8.428571 - 8 was 0.42857099999999946."""
    specs = [NodeSpec("m0", "a100", 0, mig={"3g.40gb": 1}), NodeSpec("w0", "a100", 8)]
    pool = Pool("a100", specs, {})
    for _ in range(50):
        pool.set_up("w0", False)
        assert pool.capacity == Pool("a100", specs[:1], {}).capacity == 0.428571
        pool.set_up("w0", True)
    assert pool.capacity == Pool("a100", specs, {}).capacity
