"""Negative samplers: invariants, memory fallback, reproducibility and clear errors."""
from __future__ import annotations

import pytest
import torch

from cpl_fast.losses.negatives import NEGATIVE_SAMPLERS, MismatchedExperts, OtherTask, build_negative_sampler
from cpl_fast.models.spm import Routing


def make_routings(batch: int, n: int, k: int, levels: int, seed: int = 0, requires_grad: bool = False,
                  dense: bool = False) -> list[Routing]:
    """Router-like routings: distinct experts per sample, random weights (distinct across samples)."""
    g = torch.Generator().manual_seed(seed)
    routings = []
    for _ in range(levels):
        probs = torch.softmax(torch.randn(batch, n, generator=g, dtype=torch.float64), dim=1)
        if dense:
            indices, weights = torch.arange(n).repeat(batch, 1), probs.clone()
        else:
            weights, indices = probs.topk(k, dim=1)
        routings.append(Routing(indices, weights.requires_grad_(requires_grad), probs))
    return routings


def test_mismatched_covers_every_other_expert_once():
    n, m, batch, levels = 5, 4, 6, 3
    routings = make_routings(batch, n, 1, levels, requires_grad=True)
    negatives = MismatchedExperts(n)(routings, m, generator=torch.Generator().manual_seed(0))
    assert len(negatives) == m and all(len(negative) == levels for negative in negatives)
    for level, positive in enumerate(routings):
        for b in range(batch):
            used = sorted(int(negative[level].indices[b, 0]) for negative in negatives)
            assert used == sorted(set(range(n)) - {int(positive.indices[b, 0])})
        for negative in negatives:
            routing = negative[level]
            assert routing.probs is None and not routing.weights.requires_grad
            assert routing.indices.dtype == torch.int64
            torch.testing.assert_close(routing.weights, positive.weights.detach())


@pytest.mark.parametrize("n,k,m", [(5, 2, 3), (6, 3, 5), (4, 4, 3)])
def test_mismatched_differs_at_every_slot(n, k, m):
    dense = k == n
    routings = make_routings(7, n, k, levels=2, seed=n + k, dense=dense)
    negatives = MismatchedExperts(n)(routings, m, generator=torch.Generator().manual_seed(1))
    for level, positive in enumerate(routings):
        stacked = torch.stack([negative[level].indices for negative in negatives])        # (m, B, k)
        assert bool((stacked != positive.indices.unsqueeze(0)).all())
        # m different experts in every slot, and a negative's own k experts stay distinct.
        assert all(len(set(stacked[:, b, j].tolist())) == m for b in range(7) for j in range(k))
        assert all(len(set(stacked[t, b].tolist())) == k for t in range(m) for b in range(7))
        if dense:    # a relabelling of all experts, each receiving another expert's probability
            assert all(sorted(stacked[t, b].tolist()) == list(range(n)) for t in range(m) for b in range(7))
        for negative in negatives:
            torch.testing.assert_close(negative[level].weights, positive.weights)


def test_mismatched_is_reproducible():
    routings = make_routings(8, 6, 2, levels=3)
    def draw(seed):
        negatives = MismatchedExperts(6)(routings, 4, generator=torch.Generator().manual_seed(seed))
        return torch.stack([torch.stack([r.indices for r in negative]) for negative in negatives])

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_mismatched_clear_errors():
    routings = make_routings(3, 5, 1, levels=2)
    with pytest.raises(ValueError, match=r"m=5.*n=5"):
        MismatchedExperts(5)(routings, 5)
    with pytest.raises(ValueError, match=r"k=6 .*n=5"):
        MismatchedExperts(5)(make_routings(3, 6, 6, levels=1, dense=True), 2)
    out_of_range = Routing(torch.tensor([[0], [4], [1]]), routings[0].weights, None)
    with pytest.raises(ValueError, match=r"\[0, n=4\)"):
        MismatchedExperts(4)([out_of_range], 2)
    with pytest.raises(ValueError, match="positive int"):
        MismatchedExperts(5)(routings, 0)
    with pytest.raises(TypeError, match="int64"):
        MismatchedExperts(5)([Routing(routings[0].indices.int(), routings[0].weights, None)], 2)
    with pytest.raises(ValueError, match="at least one prompt level"):
        MismatchedExperts(5)([], 2)
    with pytest.raises(ValueError, match="at least 2 prompt experts"):
        MismatchedExperts(1)


def rows_of(routings: list[Routing]) -> list[tuple]:
    """Each sample's routing as a hashable key over all levels."""
    batch = routings[0].indices.shape[0]
    return [tuple((tuple(r.indices[b].tolist()), tuple(r.weights[b].tolist())) for r in routings)
            for b in range(batch)]


def negative_rows(negatives: list[list[Routing]]) -> list[list[tuple]]:
    """negative_rows(...)[t][b]: the routing key of negative t for sample b."""
    return [rows_of(negative) for negative in negatives]


def test_other_task_takes_routings_of_other_tasks_in_the_batch():
    tasks = torch.tensor([0, 0, 1, 2, 1, 2, 0])
    routings = make_routings(7, 5, 1, levels=3, requires_grad=True)
    keys = rows_of(routings)
    sampler = OtherTask(num_tasks=3)
    negatives = sampler(routings, 2, task_ids=tasks, generator=torch.Generator().manual_seed(0))
    for t, rows in enumerate(negative_rows(negatives)):
        for b, key in enumerate(rows):
            sources = [s for s, other in enumerate(keys) if other == key]
            assert sources and all(int(tasks[s]) != int(tasks[b]) for s in sources)
            assert int(sampler.last_negative_tasks[b, t]) == int(tasks[sources[0]])
    # Two other tasks and m = 2: each is used once (drawn without replacement).
    for b in range(7):
        assert sorted(sampler.last_negative_tasks[b].tolist()) == sorted({0, 1, 2} - {int(tasks[b])})
    for negative in negatives:
        assert all(r.probs is None and not r.weights.requires_grad for r in negative)


def test_other_task_falls_back_to_memory_when_the_batch_has_one_task():
    sampler = OtherTask(num_tasks=3, memory_size=4)
    first = make_routings(6, 5, 1, levels=2, seed=1)
    first_tasks = torch.tensor([0, 1, 2, 1, 2, 0])
    sampler(first, 2, task_ids=first_tasks, generator=torch.Generator().manual_seed(0))
    first_keys = rows_of(first)

    second = make_routings(4, 5, 1, levels=2, seed=2)
    negatives = sampler(second, 3, task_ids=torch.zeros(4, dtype=torch.int64),
                        generator=torch.Generator().manual_seed(1))
    for rows in negative_rows(negatives):
        for key in rows:
            sources = [s for s, other in enumerate(first_keys) if other == key]
            assert sources and all(int(first_tasks[s]) != 0 for s in sources)
    assert set(sampler.last_negative_tasks.flatten().tolist()) == {1, 2}


def test_other_task_memory_is_a_bounded_ring_buffer():
    sampler = OtherTask(num_tasks=2, memory_size=2)
    routings = make_routings(5, 4, 1, levels=1, seed=3)
    sampler(routings, 1, task_ids=torch.tensor([0, 0, 0, 0, 1]))
    assert len(sampler.memory[0]) == 2 and len(sampler.memory[1]) == 1
    torch.testing.assert_close(sampler.memory[0][-1][0][1], routings[0].weights[3])
    torch.testing.assert_close(sampler.memory[0][0][0][1], routings[0].weights[2])


def test_other_task_is_reproducible():
    routings = make_routings(8, 5, 2, levels=2, seed=4)
    tasks = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return negative_rows(OtherTask(4)(routings, 3, task_ids=tasks, generator=generator))

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_other_task_clear_errors():
    routings = make_routings(3, 5, 1, levels=2)
    with pytest.raises(ValueError, match="need task_ids"):
        OtherTask(3)(routings, 2)
    with pytest.raises(ValueError, match="no other task"):
        OtherTask(3)(routings, 2, task_ids=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"num_tasks=3"):
        OtherTask(3)(routings, 2, task_ids=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        OtherTask(3)(routings, 2, task_ids=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer tensor"):
        OtherTask(3)(routings, 2, task_ids=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="at least 2 tasks"):
        OtherTask(1)
    sampler = OtherTask(2)
    sampler(routings, 1, task_ids=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="levels"):
        sampler(routings[:1], 1, task_ids=torch.tensor([0, 0, 0]))


def test_build_sampler():
    assert set(NEGATIVE_SAMPLERS) == {"mismatched_experts", "other_task"}
    assert isinstance(build_negative_sampler("mismatched_experts", num_prompts=5), MismatchedExperts)
    assert isinstance(build_negative_sampler("other_task", num_tasks=3, memory_size=4), OtherTask)
    with pytest.raises(ValueError, match="unknown negative sampler 'random'"):
        build_negative_sampler("random")


def test_every_sampler_says_whether_it_draws_level_by_level():
    """The fast step's one-pass decode relies on ``draws_by_level``; a sampler that cannot draw one
    level alone refuses ``sample_level`` instead of drawing something the full call would not."""
    samplers = {"mismatched_experts": MismatchedExperts(5), "other_task": OtherTask(3)}
    assert set(samplers) == set(NEGATIVE_SAMPLERS)
    assert samplers["mismatched_experts"].draws_by_level and not samplers["other_task"].draws_by_level
    routing = make_routings(3, 5, 2, 1)[0]
    assert len(samplers["mismatched_experts"].sample_level(0, routing, 2)) == 2
    with pytest.raises(NotImplementedError, match="every prompt level"):
        samplers["other_task"].sample_level(0, routing, 2, task_ids=torch.tensor([0, 1, 2]))
