"""The copy engine: link profiles, FIFO completion, pacing accounted as link time, copy errors surfaced."""

from __future__ import annotations

import pytest
import torch

from moe_env.errors import UsageError
from moe_env.transfer import LINKS, CudaCopyEngine, LinkModel, ThreadCopyEngine, link_by_name, make_copy_engine


def test_link_profiles():
    assert link_by_name("pcie4").bandwidth_gbps == 25.0
    assert link_by_name("nvme").latency_s == pytest.approx(80e-6)
    assert not link_by_name("host").paced and not link_by_name("none").paced
    assert link_by_name("pcie5").copy_seconds(50_000_000_000) == pytest.approx(1.0 + 10e-6)
    with pytest.raises(UsageError, match="known links: " + ", ".join(LINKS)):
        link_by_name("thunderbolt")


def test_copies_complete_in_fifo_order_with_the_right_bytes():
    engine = ThreadCopyEngine(LinkModel("slow", bandwidth_gbps=0.05, latency_s=1e-4))
    sources = [torch.full((2048,), float(i)) for i in range(6)]
    slots = [torch.zeros(2048) for _ in sources]
    tickets = [engine.submit(dst, src) for dst, src in zip(slots, sources, strict=True)]
    engine.wait(tickets[-1])
    assert all(t.done() for t in tickets)  # FIFO: the last done means all done
    assert all(torch.equal(dst, src) for dst, src in zip(slots, sources, strict=True))
    # every paced copy occupied the link for at least latency + bytes / bandwidth
    assert engine.copy_s() >= 6 * engine.link.copy_seconds(2048 * 4)
    assert engine.stall_s() > 0  # the waiter blocked behind the paced link
    engine.close()


def test_a_failed_copy_is_reported_to_the_waiter():
    engine = ThreadCopyEngine(LINKS["host"])
    ticket = engine.submit(torch.zeros(3), torch.zeros(5))
    with pytest.raises(RuntimeError, match="expert copy failed"):
        engine.wait(ticket)
    ok = engine.submit(torch.zeros(3), torch.ones(3))  # the thread survives
    engine.wait(ok)
    engine.close()


def test_reset_stats_drains_the_queue():
    engine = ThreadCopyEngine(LinkModel("slow", bandwidth_gbps=0.01))
    tickets = [engine.submit(torch.zeros(1024), torch.ones(1024)) for _ in range(3)]
    engine.reset_stats()
    assert all(t.done() for t in tickets) and engine.stall_s() == 0 and engine.copy_s() == 0
    engine.close()


def test_pacing_is_refused_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    with pytest.raises(UsageError, match="paces CPU copies only"):
        make_copy_engine(torch.device("cuda"), LINKS["pcie4"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_copies_land_and_compute_waits_on_them():
    engine = CudaCopyEngine(torch.device("cuda"))
    src = torch.arange(1 << 20, dtype=torch.float32).pin_memory()
    dst = torch.zeros(1 << 20, device="cuda")
    ticket = engine.submit(dst, src)
    engine.wait(ticket)
    assert torch.equal(dst.cpu(), src)
    assert engine.copy_s() > 0
