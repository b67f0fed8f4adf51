"""The Megatron-Core CPU compatibility patches: still needed, still pointed at the right code, effective.

``test_no_patch_is_stale`` is the upgrade alarm: it fails when a Megatron-Core release no longer
contains a CUDA call one of the patches neutralises (the patch is then dead or aimed at moved code).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.unit

cpu_compat = pytest.importorskip("megatron_ghpo.policy.cpu_compat")


def test_no_patch_is_stale() -> None:
    stale = cpu_compat.stale_patches()
    assert not stale, (
        f"Megatron-Core {cpu_compat.megatron_core_version()} (patches validated on "
        f"{cpu_compat.VALIDATED_MEGATRON_CORE}) no longer matches these CPU patches:\n" + "\n".join(stale)
    )


def test_validated_version_is_installed() -> None:
    assert cpu_compat.megatron_core_version() == cpu_compat.VALIDATED_MEGATRON_CORE


def test_stale_detection_notices_a_missing_call(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = cpu_compat.ShimmedModule("megatron.core.transformer.utils", ("torch.cuda.not_a_real_call()",), "n/a")
    monkeypatch.setattr(cpu_compat, "SHIMMED_MODULES", cpu_compat.SHIMMED_MODULES + (spec,))
    assert any("not_a_real_call" in p for p in cpu_compat.stale_patches())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the unpatched failures only happen without CUDA")
def test_unpatched_megatron_fails_without_cuda() -> None:
    """Without the patches these Megatron-Core calls raise on a CPU-only machine: the patches are needed."""
    code = textwrap.dedent(
        """
        import torch
        from megatron.core.transformer.utils import get_default_causal_mask
        from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
        from megatron.core.utils import local_multi_tensor_l2_norm
        calls = {
            "causal_mask": lambda: get_default_causal_mask(4),
            "rng_tracker_add": lambda: CudaRNGStatesTracker().add("x", 1),
            "l2_norm": lambda: local_multi_tensor_l2_norm(1, None, [[torch.ones(3)]], False),
        }
        for name, call in calls.items():
            try:
                call()
                print(name, "OK")
            except (AssertionError, RuntimeError) as exc:
                print(name, "FAILS", type(exc).__name__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert set(lines) == {"causal_mask", "rng_tracker_add", "l2_norm"}, out.stderr[-2000:]
    assert all(v.startswith("FAILS") for v in lines.values()), f"expected every call to fail unpatched: {lines}"


@pytest.fixture(scope="module")
def patched() -> bool:
    return cpu_compat.apply_cpu_compat()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_apply_is_idempotent_and_cpu_only(patched: bool) -> None:
    assert patched and cpu_compat.is_applied()
    assert cpu_compat.apply_cpu_compat() is True  # second call: no double wrapping
    from megatron.core.optimizer import clip_grads

    fn = clip_grads.clip_grad_by_total_norm_fp32
    assert getattr(fn, "__megatron_ghpo_cpu_compat__", False)
    assert not getattr(fn.__wrapped__, "__megatron_ghpo_cpu_compat__", False), "wrapped twice"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_patched_calls_work_on_cpu(patched: bool) -> None:
    from megatron.core.optimizer import clip_grads
    from megatron.core.transformer.utils import get_default_causal_mask
    from megatron.core.utils import local_multi_tensor_l2_norm

    mask = get_default_causal_mask(3)
    assert mask.device.type == "cpu" and mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    norm, _ = local_multi_tensor_l2_norm(1, None, [[torch.tensor([3.0]), torch.tensor([4.0])]], False)
    assert norm.device.type == "cpu" and norm.item() == pytest.approx(5.0)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([3.0, 4.0])
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=5.0)
    assert p.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)
    # The temporary Tensor.type override is gone once the wrapped function returns.
    assert torch.ones(1).type() == "torch.FloatTensor"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_rng_tracker_forks_distinct_reproducible_streams(patched: bool) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.CudaRNGStatesTracker()
    torch.manual_seed(0)
    tracker.add("a", 11)
    tracker.add("b", 12)
    outside = torch.get_rng_state()
    with tracker.fork("a"):
        a1 = torch.rand(4)
    with tracker.fork("b"):
        b1 = torch.rand(4)
    with tracker.fork("a"):
        a2 = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside), "fork must restore the default generator"
    torch.manual_seed(11)
    expect_a = torch.rand(8)
    assert torch.equal(torch.cat([a1, a2]), expect_a), "stream 'a' must continue across forks"
    assert not torch.equal(a1, b1)


def test_cpu_torch_proxy_maps_devices() -> None:
    proxy = cpu_compat.CpuTorch()
    assert proxy.zeros(2, device="cuda").device.type == "cpu"
    assert proxy.empty(2, device=0).device.type == "cpu"
    assert proxy.tensor([1.0], device=torch.device("cuda", 1)).device.type == "cpu"
    assert proxy.ones(1, device=proxy.cuda.current_device()).device.type == "cpu"
    assert proxy.float32 is torch.float32 and proxy.distributed is torch.distributed
    proxy.cuda.synchronize()
    proxy.cuda.current_stream().wait_stream(proxy.cuda.default_stream())


def test_te_missing_name_is_still_missing_without_te() -> None:
    """Upgrade alarm for MISSING_TE_NAMES: without Transformer Engine the module still leaves the name
    undefined (read in a fresh process, before any patch), and the patch defines it as None."""
    code = textwrap.dedent(
        """
        import importlib
        from megatron_ghpo.policy.cpu_compat import MISSING_TE_NAMES, define_missing_te_names
        for spec in MISSING_TE_NAMES:
            print(spec.module, hasattr(importlib.import_module(spec.module), spec.name))
        print("defined", sorted(define_missing_te_names()))
        print("again", define_missing_te_names())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    lines = out.stdout.splitlines()
    assert lines and lines[0] == "megatron.core.transformer.moe.moe_utils False", out.stderr[-2000:]
    assert lines[1] == "defined ['megatron.core.transformer.moe.moe_utils.te_general_gemm']" and lines[2] == "again []"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_moe_router_and_dispatcher_streams_work_on_cpu(patched: bool) -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    assert moe_utils.te_general_gemm is None
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    logits = moe_utils.router_gating_linear(x, w, None, torch.float32)
    logits.sum().backward()
    assert torch.allclose(logits, x @ w.t()) and x.grad is not None and w.grad is not None
    stream = token_dispatcher.torch.cuda.Stream()
    event = stream.record_event()
    event.synchronize()  # the alltoall dispatcher synchronises on the device-to-host event
    assert event.query()
