"""TP=2, PP=2, TP=2 x PP=2, PP=2 x VPP=2 and DP=2 on gloo match TP=1 x PP=1 from the same weights (fp32).

Compared per layout: full logits, per-token completion log-probs, loss, gradients (every shard vs
the matching slice of the TP=1 gradient), gradient norm, and the weights after one Adam step.
The loss uses noisy sampling-time log-probs (ratios != 1, some clipped) and beta > 0 (frozen
reference model), so every part of the GHPO loss takes part. Also: a checkpoint saved at TP=2 loads
at TP=1 and at PP=2 with the same logits (and, saved fully reshardable, continues training there);
resume at the same layout is exact; a NaN loss skips the update and is counted. Checked on the way:
DAPO and SFT normalisation across DP, sequence packing, activation recompute, temperature and
entropy vs a plain softmax, the warm-up + cosine schedule, BF16, and ``from_config`` on HF folders
(logits equal transformers'). Two launches (2 and 4 processes); see _policy_scenarios.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _policy_launch import launch  # type: ignore[import-not-found]

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_policy_worker.py"

# fp32, relative to the magnitude of the reference quantity (``scale/<quantity>`` in the results:
# max |logit|, max |log-prob|, |loss|, max |gradient|, gradient norm, max |weight update|).
# Layouts sum in different orders, so values differ by float rounding only: measured ~1e-6 or less.
RTOL = {"logits": 1e-5, "logprobs": 1e-5, "loss": 1e-5, "grads": 2e-5, "grad_norm": 1e-5, "weights": 1e-4}


def _run(scenario: str, world_size: int, tmp_path: Path, timeout_s: float) -> dict[str, float]:
    out = tmp_path / scenario
    out.mkdir()
    launch(WORKER, [scenario, str(out)], world_size=world_size, log_dir=out / "logs", timeout_s=timeout_s)
    return json.loads((out / "result.json").read_text())


def _check_parity(results: dict[str, float], layouts: list[str], scale: str = "scale") -> None:
    failures = []
    for layout in layouts:
        assert f"{layout}/grads" in results, f"{layout} did not run"
        for quantity, rtol in RTOL.items():
            key = f"{layout}/{quantity}"
            if key in results:
                bound = rtol * results[f"{scale}/{quantity}"]
                if not results[key] <= bound:
                    failures.append(f"{key}: max |diff| = {results[key]:.3e} > {bound:.3e}")
    assert not failures, "parity vs TP=1 x PP=1 broken:\n" + "\n".join(failures)


def _check_layouts(r: dict[str, float], parallel: tuple[str, ...]) -> None:
    """Loss normalisation does not depend on the micro-batch layout: in order (one group per micro-batch,
    the reference's layout), straddling groups, length-grouped, packed and shared-prompt rows give the
    same step loss and gradients for every loss type, and bnpo/grpo/dr_grpo/dapo equal the reference's
    loss computed directly."""
    failures = []
    for name in parallel:
        for loss_type in ("bnpo", "grpo", "dr_grpo", "dapo"):
            pre = f"{name}_layouts/{loss_type}"
            if not r[f"{pre}/direct"] <= RTOL["loss"] * r[f"{pre}/scale_loss"]:
                failures.append(f"{pre}: loss {r[f'{pre}/direct']:.3e} away from the reference's definition")
            for layout in ("in_order_mb3", "by_length", "packed", "shared"):
                for quantity in ("loss", "grads"):
                    key = f"{pre}/{layout}/{quantity}"
                    if not r[key] <= RTOL[quantity] * r[f"{pre}/scale_{quantity}"]:
                        failures.append(f"{key}: max |diff| vs in-order = {r[key]:.3e}")
        assert r[f"{name}_layouts/input_tokens_shared"] < r[f"{name}_layouts/input_tokens_padded"], r
    assert not failures, "loss normalisation depends on the micro-batch layout:\n" + "\n".join(failures)


def test_tp2_pp2_dp2_vpp_checkpoint_nan_packing(tmp_path: Path) -> None:
    r = _run("world2", 2, tmp_path, timeout_s=300)
    print(json.dumps(r, indent=1, sort_keys=True))
    _check_parity(r, ["dp2", "dp2_dapo", "dp2_dapo_packed", "recompute", "tp2", "pp2"])
    # fully_reshardable optimizer checkpoint saved at TP=2, resumed at TP=1 and PP=2: the next step
    # matches continuing at TP=2. Weights within the usual bound (a wrong or reset Adam state moves
    # them by ~lr); loss and gradient norm within 1e-4: one step on, layout rounding has compounded.
    for layout in ("ckpt_tp2_to_tp1_full", "ckpt_tp2_to_pp2_full"):
        for quantity, rtol in (("weights", RTOL["weights"]), ("loss", 1e-4), ("grad_norm", 1e-4)):
            bound = rtol * r[f"scale/{quantity}"]
            assert r[f"{layout}/{quantity}"] <= bound, f"{layout}/{quantity}: {r[f'{layout}/{quantity}']:.3e} > {bound:.3e}"
    _check_parity(r, ["pp2vpp2"], scale="vpp_scale")
    for key in ("tp2/temperature_logprobs", "tp2/entropy"):
        bound = RTOL["logprobs"] * r["scale/logprobs"]
        assert r[key] <= bound, f"{key}: max |diff| vs a plain softmax over the gathered vocabulary = {r[key]:.3e} > {bound:.3e}"
    for key in ("ckpt_tp2_to_tp1/logits", "ckpt_tp2_to_pp2/logits"):
        bound = RTOL["logits"] * r["scale/logits"]
        assert r[key] <= bound, f"{key}: max |diff| = {r[key]:.3e} > {bound:.3e} vs the logits at TP=2 before saving"
    assert r["nan/loss_is_nan"] == 1.0, "the injected NaN advantage did not produce a NaN loss"
    assert r["nan/update_skipped"] == 1.0 and r["nan/skipped_steps"] == 1.0, r
    assert r["nan/max_weight_change"] == 0.0, f"weights moved on a skipped step: {r['nan/max_weight_change']:.3e}"
    assert r["nan/lr_unchanged"] == 1.0, "the LR schedule advanced on a skipped step"
    assert r["nan/next_step_updated"] == 1.0 and r["nan/next_step_skipped_steps"] == 1.0, r
    for key in ("ckpt_tp2_to_tp1/optimizer_refused", "ckpt_tp2_to_pp2/optimizer_refused"):
        assert r[key] == 1.0, f"{key}: loading distributed-optimizer state at another layout must fail clearly"
    # Resume at the saved layout (model + optimizer + schedule) continues exactly.
    assert r["resume/loss"] == 0.0 and r["resume/grad_norm"] == 0.0 and r["resume/weights"] == 0.0, r
    assert r["resume/iteration"] == 2.0, r
    _check_layouts(r, ("tp2", "pp2"))
    assert r["schedule/max_lr_diff"] < 1e-12, f"warm-up + cosine schedule off by {r['schedule/max_lr_diff']:.3e}"
    # SFT: a global token mean, whatever the DP split; equal to the mean NLL computed directly.
    assert r["sft/loss"] <= 1e-6 * r["sft/scale_loss"] and r["sft/loss_vs_direct"] <= 1e-5 * r["sft/scale_loss"], r
    assert r["sft/grads"] <= RTOL["grads"] * r["sft/scale_grads"], f"sft/grads: {r['sft/grads']:.3e}"
    for arch in ("qwen2", "llama"):  # model provider + HF import: Megatron logits = transformers logits
        bound = RTOL["logits"] * r[f"hf_{arch}/scale_logits"]
        assert r[f"hf_{arch}/logits"] <= bound, f"hf_{arch}: max |logit diff| vs transformers {r[f'hf_{arch}/logits']:.3e}"
        assert r[f"hf_{arch}/step_ok"] == 1.0, f"MegatronPolicy.from_config({arch}) train step failed"
    # BF16 weights: same loss and gradient norm as FP32 up to bf16 rounding.
    assert r["bf16/loss_rel_diff"] < 0.05 and r["bf16/grad_norm_rel_diff"] < 0.05, r


def test_tp2_x_pp2(tmp_path: Path) -> None:
    r = _run("world4", 4, tmp_path, timeout_s=300)
    print(json.dumps(r, indent=1, sort_keys=True))
    _check_parity(r, ["tp2pp2"])
    _check_layouts(r, ("tp2pp2",))
