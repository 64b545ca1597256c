"""cpl_fast.ops.channel_attention (MDTA's core with its backward in contiguous layouts): the shared op
tests (tests/op_harness.py) and the op's own."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_harness import TOL, Inputs, OpTester

from cpl_fast.models.restormer import Attention, set_backbone_ops
from cpl_fast.ops import channel_attention, channel_attention_reference

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {  # (B, heads, d, N): odd sizes, one head, one channel a head, one pixel
    "odd": (2, 3, 5, 13),
    "one_head": (1, 1, 7, 9),
    "d1": (2, 2, 1, 6),
    "n1": (3, 2, 4, 1),
    "model": (1, 2, 8, 64),
}


def _qkv_chunks(dtype, device):
    """q, k and v as the model makes them: chunks of one (B, 3C, H, W) map, viewed as (B, heads, d, N)."""
    qkv = torch.randn(2, 3 * 6, 4, 5, dtype=dtype, device=device)
    temperature = torch.rand(2, 1, 1, dtype=dtype, device=device) + 0.5
    grad_out = torch.randn(2, 2, 3, 20, dtype=torch.float64, device=device)

    def split(qkv, t):
        q, k, v = qkv.chunk(3, dim=1)
        return (*(x.reshape(2, 2, 3, 20) for x in (q, k, v)), t)
    return Inputs([qkv, temperature], split, [grad_out])


def _transposed(dtype, device):
    """Inputs that are transposed views (not contiguous in the last dimension)."""
    leaves = [torch.randn(2, 3, 11, 4, dtype=dtype, device=device) for _ in range(3)]
    leaves.append(torch.rand(3, 1, 1, dtype=dtype, device=device) + 0.5)
    grad_out = torch.randn(2, 3, 4, 11, dtype=torch.float64, device=device)
    return Inputs(leaves, lambda q, k, v, t: (*(x.transpose(-2, -1) for x in (q, k, v)), t), [grad_out])


class TestChannelAttention(OpTester):
    fn = channel_attention
    reference = channel_attention_reference
    # No kernels of its own: "auto" is the written-out backward, on the CPU and (gpu marker) on CUDA.
    backends = (("auto", "cpu"), ("auto", "cuda"))
    cases = dict(SHAPES)
    non_contiguous_cases = {"qkv_chunks": _qkv_chunks, "transposed": _transposed}
    gradcheck_cases = {"odd": (2, 2, 3, 5)}
    test_low_precision_error_budget = None   # autocast is test_autocast_takes_the_composite

    def make_inputs(self, case, dtype, device):
        if callable(case):
            return case(dtype, device)
        leaves = [torch.randn(*case, dtype=dtype, device=device) for _ in range(3)]
        leaves.append(torch.rand(case[1], 1, 1, dtype=dtype, device=device) + 0.5)
        grad_out = torch.randn(*case, dtype=torch.float64, device=device)
        return Inputs(leaves, lambda q, k, v, t: (q, k, v, t), [grad_out])

    def bad_inputs(self):
        q = torch.randn(2, 3, 4, 5)
        t = torch.ones(3, 1, 1)
        return {
            "q_3d": ((torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 5), t), {}, ValueError,
                     r"q must be \(B, heads, d, N\)"),
            "k_shape": ((q, torch.randn(2, 3, 4, 6), q, t), {}, ValueError, "k must have q's shape"),
            "v_shape": ((q, q, torch.randn(2, 3, 5, 5), t), {}, ValueError, "v must have q's shape"),
            "temperature": ((q, q, q, torch.ones(2, 1, 1)), {}, ValueError,
                            r"temperature must be \(3, 1, 1\) for 3 heads"),
            "dtype": ((q, q.double(), q, t), {}, ValueError, "dtype"),
            "type": ((q, q, "v", t), {}, TypeError, "v must be a tensor"),
        }


def test_a_zero_row_takes_the_clamped_gradient_of_normalize():
    """Where a row's norm is below eps, F.normalize divides by eps: the gradient has no projection term."""
    q = torch.randn(1, 2, 3, 6, dtype=torch.float64)
    q[0, 1, 2] = 0.0
    k = torch.randn(1, 2, 3, 6, dtype=torch.float64)
    k[0, 0, 0] = 1e-14
    v = torch.randn(1, 2, 3, 6, dtype=torch.float64)
    t = torch.rand(2, 1, 1, dtype=torch.float64) + 0.5
    grad = torch.randn(1, 2, 3, 6, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, t)]
    want = torch.autograd.grad(channel_attention_reference(*leaves), leaves, grad)
    got = torch.autograd.grad(channel_attention(*leaves), leaves, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_reference_backend_runs_the_composite(monkeypatch):
    q, k, v = (torch.randn(1, 2, 3, 7, requires_grad=True) for _ in range(3))
    t = torch.ones(2, 1, 1, requires_grad=True)
    fused = channel_attention(q, k, v, t)
    assert type(fused.grad_fn).__name__ == "_ChannelAttentionBackward"
    monkeypatch.setenv("CPL_FAST_BACKEND", "reference")
    reference = channel_attention(q, k, v, t)
    assert type(reference.grad_fn).__name__ != "_ChannelAttentionBackward"
    torch.testing.assert_close(fused, reference)


def test_autocast_takes_the_composite():
    q, k, v = (torch.randn(1, 2, 3, 7) for _ in range(3))
    t = torch.ones(2, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = channel_attention(q, k, v, t), channel_attention_reference(q, k, v, t)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unknown_backend_is_a_value_error():
    q = torch.randn(1, 1, 2, 3)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        channel_attention(q, q, q, torch.ones(1, 1, 1), backend="fast")


def test_compiles_without_graph_breaks():
    q, k, v = (torch.randn(1, 2, 4, 9, requires_grad=True) for _ in range(3))
    t = torch.rand(2, 1, 1, requires_grad=True)
    compiled = torch.compile(channel_attention, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, t)
    torch.testing.assert_close(out, channel_attention_reference(q, k, v, t))
    out.sum().backward()
    assert all(x.grad is not None for x in (q, k, v, t))


def test_attention_module_switches_and_matches_the_published_block():
    torch.manual_seed(0)
    block = Attention(12, num_heads=3).double()
    with torch.no_grad():
        block.temperature.uniform_(0.5, 1.5)
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64, requires_grad=True)
    fused = block(x)
    (grad_fused,) = torch.autograd.grad(fused.sum(), x)
    set_backbone_ops(block, "reference")
    assert block.ops == "reference"
    reference = block(x)
    (grad_reference,) = torch.autograd.grad(reference.sum(), x)
    torch.testing.assert_close(fused, reference, **TOL[torch.float64])
    torch.testing.assert_close(grad_fused, grad_reference, **TOL[torch.float64])
    # the published code, line for line
    q, k, v = block.qkv_dwconv(block.qkv(x)).chunk(3, dim=1)
    q, k, v = (t.reshape(2, 3, 4, 35) for t in (q, k, v))
    scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    attn = (scores * block.temperature).softmax(-1)
    torch.testing.assert_close(reference, block.project_out((attn @ v).reshape(2, 12, 5, 7)), rtol=0, atol=0)
