"""The caching CPU allocator (cpl_fast.memory): reuse, limits, restore, profiler, threads, bad input."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from cpl_fast import memory

pytestmark = pytest.mark.skipif(not memory.cpu_caching_available(),
                                reason="the caching CPU allocator is compiled in cpl_fast._C, not built here")

MIB = 1 << 20


@pytest.fixture(autouse=True)
def system_allocator_around():
    """Every test starts and ends with the system allocator and an empty cache."""
    memory.disable_cpu_caching()
    yield
    memory.disable_cpu_caching()


def _delta(before: dict, after: dict) -> dict:
    return {key: after[key] - before[key] for key in ("hits", "misses", "uncached", "released")}


def test_large_blocks_are_reused_and_hold_their_values():
    memory.enable_cpu_caching()
    assert memory.cpu_caching_enabled()
    gen = torch.Generator().manual_seed(0)
    before = memory.cpu_cache_stats()
    a = torch.randn(4 * MIB // 4, generator=gen)  # 4 MiB of float32
    expected = a.numpy().copy()
    after_alloc = memory.cpu_cache_stats()
    assert _delta(before, after_alloc)["misses"] == 1
    assert after_alloc["live_bytes"] - before["live_bytes"] >= 4 * MIB
    address = a.data_ptr()
    del a
    freed = memory.cpu_cache_stats()
    assert freed["cached_bytes"] >= 4 * MIB
    b = torch.empty(4 * MIB // 4)
    assert b.data_ptr() == address  # the same block, handed out again
    assert _delta(freed, memory.cpu_cache_stats())["hits"] == 1
    b.copy_(torch.from_numpy(expected))
    c = b * 2  # a fresh block while b is alive
    assert c.data_ptr() != b.data_ptr()
    torch.testing.assert_close(c, torch.from_numpy(expected) * 2, rtol=0, atol=0)


def test_small_blocks_go_to_the_system_allocator():
    memory.enable_cpu_caching()
    before = memory.cpu_cache_stats()
    small = torch.randn(1000)  # 4 KB
    after = memory.cpu_cache_stats()
    assert _delta(before, after)["uncached"] >= 1
    assert _delta(before, after)["misses"] == 0
    del small
    assert memory.cpu_cache_stats()["cached_bytes"] == after["cached_bytes"]


def test_limit_releases_blocks_and_empty_cache_frees_all():
    memory.enable_cpu_caching(max_cached_bytes=0)
    before = memory.cpu_cache_stats()
    x = torch.randn(2 * MIB)
    del x
    after = memory.cpu_cache_stats()
    assert after["cached_bytes"] == 0 and _delta(before, after)["released"] == 1

    memory.enable_cpu_caching(max_cached_bytes=64 * MIB)  # a new limit, same allocator
    tensors = [torch.randn(MIB) for _ in range(3)]
    del tensors
    assert memory.cpu_cache_stats()["cached_bytes"] >= 12 * MIB
    memory.empty_cpu_cache()
    assert memory.cpu_cache_stats()["cached_bytes"] == 0


def test_a_request_does_not_take_a_much_larger_block():
    memory.enable_cpu_caching()
    big = torch.empty(64 * MIB // 4)
    del big
    before = memory.cpu_cache_stats()
    small = torch.empty(2 * MIB // 4)
    assert _delta(before, memory.cpu_cache_stats())["misses"] == 1
    del small


def test_disable_restores_the_previous_allocator_and_keeps_live_tensors():
    memory.enable_cpu_caching()
    kept = torch.arange(MIB, dtype=torch.float64)  # 8 MiB, allocated by the caching allocator
    memory.disable_cpu_caching()
    assert not memory.cpu_caching_enabled()
    before = memory.cpu_cache_stats()
    other = torch.randn(4 * MIB)
    assert memory.cpu_cache_stats() == before  # the system allocator served it
    assert kept[-1].item() == MIB - 1
    del kept, other
    after = memory.cpu_cache_stats()
    assert after["cached_bytes"] == 0  # a block freed after disable goes to the system
    assert after["live_bytes"] < before["live_bytes"]


def test_context_manager_restores_the_state_before_it():
    with memory.cpu_caching(max_cached_bytes=32 * MIB):
        assert memory.cpu_caching_enabled()
        assert memory.cpu_cache_stats()["max_cached_bytes"] == 32 * MIB
        with memory.cpu_caching(max_cached_bytes=16 * MIB):
            assert memory.cpu_cache_stats()["max_cached_bytes"] == 16 * MIB
        assert memory.cpu_caching_enabled()
        assert memory.cpu_cache_stats()["max_cached_bytes"] == 32 * MIB
    assert not memory.cpu_caching_enabled()


def _train_steps(seed: int) -> tuple[list[float], list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.GELU(), nn.Conv2d(16, 3, 3, padding=1)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 64, 64, generator=gen, dtype=torch.float64)  # activations of 2 MiB each
    y = torch.rand(4, 3, 64, 64, generator=gen, dtype=torch.float64)
    losses = []
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        loss = (model(x) - y).abs().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def test_training_is_bitwise_the_same_with_the_cache():
    losses, params = _train_steps(3)
    with memory.cpu_caching():
        start = memory.cpu_cache_stats()
        cached_losses, cached_params = _train_steps(3)
        used = _delta(start, memory.cpu_cache_stats())
    assert used["hits"] > 0  # reused blocks (holding earlier steps' values) were in play
    assert cached_losses == losses
    for p, q in zip(params, cached_params):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_profiler_sees_the_same_allocations():
    def profiled_bytes() -> int:
        x = torch.randn(MIB)
        cpu = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=cpu, profile_memory=True) as prof:
            y = x * 3
            del y
        return max(e.cpu_memory_usage for e in prof.key_averages())

    plain = profiled_bytes()
    with memory.cpu_caching():
        profiled_bytes()  # fills the cache with the block the second call reuses
        cached = profiled_bytes()
    assert plain == cached == 4 * MIB


def test_threads_allocate_and_free_concurrently():
    memory.enable_cpu_caching(max_cached_bytes=256 * MIB)
    start = memory.cpu_cache_stats()
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            gen = torch.Generator().manual_seed(seed)
            for i in range(40):
                size = MIB // 4 * int(torch.randint(1, 9, (1,), generator=gen))
                t = torch.full((size,), float(seed * 100 + i))
                assert bool((t == seed * 100 + i).all())
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    end = memory.cpu_cache_stats()
    assert end["live_bytes"] == start["live_bytes"]  # every block came back
    assert _delta(start, end)["hits"] > 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GB"])
def test_bad_limit_is_refused(bad):
    with pytest.raises(ValueError, match="max_cached_bytes must be a non-negative int"):
        memory.enable_cpu_caching(bad)
    assert not memory.cpu_caching_enabled()


def test_fork_while_another_thread_allocates_leaves_the_child_usable():
    """DataLoader workers fork; the child's copy of the allocator's lock must not stay held."""
    import os
    import time

    memory.enable_cpu_caching()
    stop = threading.Event()

    def churn() -> None:
        # Freeing a full cache holds the allocator's lock for a while with the GIL released, so
        # the main thread's fork lands inside it often.
        while not stop.is_set():
            blocks = [torch.empty(2 * MIB // 4) for _ in range(64)]
            del blocks
            memory.empty_cpu_cache()

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(40):
            pid = os.fork()
            if pid == 0:  # the child: allocate through the inherited allocator, then leave at once
                # One thread first, as DataLoader workers do: GNU OpenMP's pool does not survive fork.
                torch.set_num_threads(1)
                ok = bool((torch.full((4 * MIB // 4,), 2.0) == 2.0).all())
                os._exit(0 if ok else 1)
            deadline = time.monotonic() + 30
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    pytest.fail("the forked child hung on the allocator's lock")
                time.sleep(0.01)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        stop.set()
        thread.join()


def test_cpl_info_reports_the_allocator(capsys):
    from cpl_fast.cli import info

    assert info.collect()["cpu_caching_allocator"].startswith("available")
    with memory.cpu_caching():
        assert info.collect()["cpu_caching_allocator"] == "installed"
        info.main([])
    assert "caching CPU allocator: installed" in capsys.readouterr().out


def test_an_impossible_request_fails_with_the_system_error_and_leaves_the_cache_working():
    memory.enable_cpu_caching()
    with pytest.raises(RuntimeError, match="(?i)memory|allocat"):
        torch.empty(1 << 61, dtype=torch.uint8)
    assert bool((torch.full((MIB,), 3.0) == 3.0).all())
