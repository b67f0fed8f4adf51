"""Scenarios of the policy parity checks, run by each rank of _policy_worker.py.

Every layout runs in the same processes one
after another (``destroy_parallel`` between them), each compared with a TP=1 x PP=1 reference
computed in this launch from the same initial checkpoint: the reference layout runs every rank as
a data-parallel replica on the *whole* batch, which makes it numerically the single-process model
(averaging identical gradients is exact). Rank 0 writes ``result.json`` with every max difference.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import _policy_common as C
import torch

from megatron_ghpo.policy.optimizer import OptimizerOptions
from megatron_ghpo.policy.options import AlgorithmOptions, BatchingOptions, ModelOptions, ParallelOptions
from megatron_ghpo.policy.policy import MegatronPolicy

# adam_eps well above rounding noise: Adam's first step divides each gradient element by its own
# magnitude, which would turn 1e-9 rounding differences of near-zero gradients into lr-sized ones.
BETA = 0.04  # a frozen reference model and the k3 KL term take part in every layout
OPT = OptimizerOptions(lr=1e-2, adam_eps=1e-2, clip_grad=1.0, use_distributed_optimizer=True)


def make(
    cfg, tp=1, pp=1, vpp=None, *, init=None, loss_type="bnpo", random_init=False, bf16=False, recompute=False, opt=None,
    unit=2,
) -> MegatronPolicy:
    # bnpo units of 2 sequences: a whole batch on every replica and half of it per replica (DP=2) then
    # have the same units, so their step losses agree.
    return MegatronPolicy(
        cfg,
        parallel=ParallelOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp, seed=1234, timeout_s=120),
        optimizer=opt or OPT,
        algorithm=AlgorithmOptions(loss_type=loss_type, beta=BETA, loss_unit_size=unit),
        batching=BatchingOptions(micro_batch_size=2),
        init_checkpoint=init,
        random_init=random_init,
        model=ModelOptions(bf16=bf16, recompute=recompute),
    )  # fmt: skip


def my_share(samples, policy, split: bool):
    if not split:
        return samples
    d, n = policy.layout.dp_rank, policy.layout.dp
    per = len(samples) // n
    return samples[d * per : (d + 1) * per]


def run(policy, samples, *, split=False, logits=True) -> dict:
    """Logits, log-probs, loss, gradients and post-step weights of one layout."""
    out = {}
    if logits:
        out["logits"] = policy.full_logits(C.fixed_tokens())
        out["logprobs"] = policy.compute_logprobs(C.batch(samples))
    share = my_share(samples, policy, split)
    report = policy.forward_backward(share)
    C.gather_dp_grads(policy)
    out["loss"] = report["loss"]
    out["grads"] = policy  # compared in place (shards live in the policy)
    out["report"] = report
    return out


def scales(ref, grads, weights_before, weights_after) -> dict[str, float]:
    """Magnitudes the differences are measured against (relative tolerances)."""
    return {
        "logits": ref["logits"].abs().max().item(),
        "logprobs": max(abs(x) for row in ref["logprobs"] for x in row),
        "loss": abs(ref["loss"]),
        "grads": max(g.abs().max().item() for g in grads.values()),
        "grad_norm": ref["grad_norm"],
        "weights": max((weights_after[k] - weights_before[k]).abs().max().item() for k in weights_after),
    }


def compare(name, ref, policy, res, results, *, weights_ref, grads_ref, logits=True):
    if logits:
        results[f"{name}/logits"] = C.all_max((res["logits"] - ref["logits"]).abs().max().item())
        results[f"{name}/logprobs"] = C.list_diff(res["logprobs"], ref["logprobs"])
    results[f"{name}/loss"] = abs(res["loss"] - ref["loss"])
    results[f"{name}/grads"] = C.max_diff(policy, grads_ref, "grad")
    metrics = policy.apply_update(res["report"])
    results[f"{name}/grad_norm"] = abs(metrics["train/grad_norm"] - ref["grad_norm"])
    results[f"{name}/weights"] = C.max_diff(policy, weights_ref, "param")


def reference(cfg, init, samples, results, loss_type="bnpo", scale_prefix="scale"):
    """TP=1 x PP=1 values; their magnitudes go to ``results['<scale_prefix>/<quantity>']`` (first call wins)."""
    pol = make(cfg, init=init, loss_type=loss_type)
    before = C.snapshot(pol, "param")
    ref = run(pol, samples)
    grads = C.snapshot(pol, "grad")
    ref["grad_norm"] = pol.apply_update(ref["report"])["train/grad_norm"]
    weights = C.snapshot(pol, "param")
    pol.close(destroy_process_group=False)
    for k, v in scales(ref, grads, before, weights).items():
        results.setdefault(f"{scale_prefix}/{k}", v)
    return ref, grads, weights


PACKED = BatchingOptions(micro_batch_size=2, max_tokens_per_micro_batch=40)
GROUP_PADDED = BatchingOptions(micro_batch_size=4)  # one 4-completion group per micro-batch, as below
GROUP_SHARED = BatchingOptions(micro_batch_size=4, share_prompts=True, shared_row_tokens=20)  # rows of 2 and 4


def initial_model(cfg, init: Path) -> list:
    """Random initial weights saved to ``init``; returns the fixed samples with sampling-time log-probs."""
    pol = make(cfg, random_init=True)
    pol.save_checkpoint(init)
    samples = C.fixed_samples()
    samples = C.with_old_logprobs(samples, pol.compute_logprobs(C.batch(samples)))
    pol.close(destroy_process_group=False)
    return samples


def scenario_world2(out: Path, results: dict) -> None:
    cfg = C.tiny_config()
    init = out / "init"
    samples = initial_model(cfg, init)
    ref, g_ref, w_ref = reference(cfg, init, samples, results)

    pol = make(cfg, init=init)  # DP=2: each replica trains on half of the batch
    compare("dp2", ref, pol, run(pol, samples, split=True, logits=False), results, weights_ref=w_ref, grads_ref=g_ref, logits=False)
    pol.close(destroy_process_group=False)
    dref, dg, dw = reference(cfg, init, samples, results, loss_type="dapo")
    pol = make(cfg, init=init, loss_type="dapo")
    packed_check(pol, my_share(samples, pol, True), dref, dg, results)
    compare("dp2_dapo", dref, pol, run(pol, samples, split=True, logits=False), results, weights_ref=dw, grads_ref=dg, logits=False)
    pol.close(destroy_process_group=False)

    pol = make(cfg, init=init, recompute=True)  # full activation recomputation: same numbers
    compare("recompute", ref, pol, run(pol, samples, logits=False), results, weights_ref=w_ref, grads_ref=g_ref, logits=False)
    pol.close(destroy_process_group=False)
    schedule_check(cfg, init, samples, results)

    pol = make(cfg, tp=2, init=init)
    compare("tp2", ref, pol, run(pol, samples), results, weights_ref=w_ref, grads_ref=g_ref)
    tp2_logits = pol.full_logits(C.fixed_tokens())
    temperature_check(pol, samples, results)
    pol.save_checkpoint(out / "tp2")
    pol.save_checkpoint(out / "tp2_full", optimizer_sharding="fully_reshardable")
    continued = pol.train_step(C.batch(samples))
    after = {n: t.clone() for n, _p, t in C.global_items(pol, "param")}
    tp2_after = C.gather_tp_full(pol)
    pol.close(destroy_process_group=False)
    pol = make(cfg, tp=2, init=init)  # resume: model + optimizer + schedule from the checkpoint
    pol.load_checkpoint(out / "tp2")
    resumed = pol.train_step(C.batch(samples))
    results["resume/loss"] = abs(resumed["train/loss"] - continued["train/loss"])
    results["resume/grad_norm"] = abs(resumed["train/grad_norm"] - continued["train/grad_norm"])
    results["resume/weights"] = C.all_max(max((t - after[n]).abs().max().item() for n, _p, t in C.global_items(pol, "param")))
    results["resume/iteration"] = float(pol.iteration)
    layout_check("tp2", pol, results)
    pol.close(destroy_process_group=False)

    pol = make(cfg, pp=2, init=init)
    compare("pp2", ref, pol, run(pol, samples), results, weights_ref=w_ref, grads_ref=g_ref)
    layout_check("pp2", pol, results)
    pol.close(destroy_process_group=False)

    for name, tp, pp in (("ckpt_tp2_to_tp1", 1, 1), ("ckpt_tp2_to_pp2", 1, 2)):
        pol = make(cfg, tp=tp, pp=pp, init=out / "tp2")
        results[name + "/logits"] = C.all_max((pol.full_logits(C.fixed_tokens()) - tp2_logits).abs().max().item())
        try:  # the distributed optimizer's dp_reshardable state cannot move to another TP/PP: a clear error
            pol.load_checkpoint(out / "tp2")
            results[name + "/optimizer_refused"] = 0.0
        except ValueError as exc:
            results[name + "/optimizer_refused"] = float("load_optimizer=False" in str(exc))
        if pp == 2:
            nan_check(pol, samples, results)
        pol.close(destroy_process_group=False)
        # fully_reshardable: model, Adam state and schedule continue at the new layout (the policy is
        # built from the initial weights, as a resumed run is, so its reference model is the same).
        pol = make(cfg, tp=tp, pp=pp, init=init)
        pol.load_checkpoint(out / "tp2_full")
        m = pol.train_step(C.batch(samples))
        results[name + "_full/loss"] = abs(m["train/loss"] - continued["train/loss"])
        results[name + "_full/grad_norm"] = abs(m["train/grad_norm"] - continued["train/grad_norm"])
        results[name + "_full/weights"] = C.max_diff(pol, tp2_after, "param")
        pol.close(destroy_process_group=False)

    sft_check(cfg, init, samples, results)
    config_check(out, results)

    pol = make(cfg, init=init, bf16=True)  # BF16 params, FP32 master weights in the distributed optimizer
    m = pol.train_step(C.batch(samples))
    results["bf16/loss_rel_diff"] = abs(m["train/loss"] - ref["loss"]) / abs(ref["loss"])
    results["bf16/grad_norm_rel_diff"] = abs(m["train/grad_norm"] - ref["grad_norm"]) / ref["grad_norm"]
    pol.close(destroy_process_group=False)
    scenario_vpp(out, results)


def sft_check(cfg, init, samples, results) -> None:
    """SFT cross-entropy is a token mean over the global batch: the same loss and gradients whether
    each DP replica sees the whole batch or its half."""
    pol = make(cfg, init=init)
    full = pol.forward_backward(samples, mode="sft")
    C.gather_dp_grads(pol)
    grads = C.snapshot(pol, "grad")
    half = pol.forward_backward(my_share(samples, pol, True), mode="sft")
    C.gather_dp_grads(pol)
    tokens = sum(sum(s.completion_mask) for s in samples)
    nll = -sum(m * x for s in samples for m, x in zip(s.completion_mask, pol.compute_logprobs(C.batch([s]), temperature=1.0)[0]))
    results["sft/loss"] = abs(half["loss"] - full["loss"])
    results["sft/loss_vs_direct"] = abs(full["loss"] - nll / tokens)
    results["sft/grads"] = C.max_diff(pol, grads, "grad")
    results["sft/scale_loss"] = full["loss"]
    results["sft/scale_grads"] = max(g.abs().max().item() for g in grads.values())
    pol.close(destroy_process_group=False)


def config_check(out: Path, results) -> None:
    """``MegatronPolicy.from_config`` on HF folders (weights through the bridge's import): the logits
    equal transformers' on the same weights (Qwen2 tied, Llama untied), and a step runs."""
    from transformers import AutoModelForCausalLM

    from megatron_ghpo.config import Config
    from megatron_ghpo.models.tiny import build_tiny_model

    cfg = Config()
    cfg.training.per_device_train_batch_size = 2
    tokens = C.fixed_tokens()
    for arch, tied in (("qwen2", True), ("llama", False)):
        hf_dir = out / f"hf_{arch}"
        if int(os.environ.get("RANK", "0")) == 0:
            build_tiny_model(hf_dir, arch=arch, vocab_size=C.VOCAB, tie_word_embeddings=tied)
        torch.distributed.barrier()
        pol = MegatronPolicy.from_config(cfg, model_dir=hf_dir, total_steps=10)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            expect = hf(tokens).logits
        results[f"hf_{arch}/logits"] = C.all_max((pol.full_logits(tokens) - expect).abs().max().item())
        results[f"hf_{arch}/scale_logits"] = expect.abs().max().item()
        m = pol.train_step(C.batch(C.fixed_samples(4)))
        results[f"hf_{arch}/step_ok"] = float(math.isfinite(m["train/loss"]) and m["train/update_skipped"] == 0.0)
        pol.close(destroy_process_group=False)


def schedule_check(cfg, init, samples, results) -> None:
    """Linear warm-up then cosine decay to min_lr, one schedule step per optimizer step."""
    lr, lo, warm, total = 1e-3, 1e-4, 2, 6
    opt = OptimizerOptions(lr=lr, min_lr=lo, lr_warmup_steps=warm, lr_decay_steps=total, lr_decay_style="cosine")
    pol = make(cfg, init=init, opt=opt)
    seen = [pol.learning_rate()]
    for _ in range(total + 1):
        pol.train_step(C.batch(samples[:2]))
        seen.append(pol.learning_rate())
    expect = [
        lr * k / warm if k <= warm else lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * (k - warm) / (total - warm)))
        for k in range(total + 2)
    ]
    expect[-1] = lo  # past the decay: min_lr
    results["schedule/max_lr_diff"] = max(abs(a - b) for a, b in zip(seen, expect))
    pol.close(destroy_process_group=False)


def packed_check(pol, share, ref, ref_grads, results) -> None:
    """Sequence packing (block-diagonal attention) gives the padded batch's loss and gradients (dapo: a
    global token mean, independent of how sequences are grouped into micro-batches)."""
    padded = pol.batching
    pol.batching = PACKED
    report = pol.forward_backward(share)
    C.gather_dp_grads(pol)
    results["dp2_dapo_packed/loss"] = abs(report["loss"] - ref["loss"])
    results["dp2_dapo_packed/grads"] = C.max_diff(pol, ref_grads, "grad")
    results["dp2_dapo_packed/logprobs"] = C.list_diff(pol.compute_logprobs(C.batch(share)), [ref["logprobs"][i] for i in _share_index(pol, share)])
    pol.batching = padded


LAYOUTS = {  # the same 3 groups of 4 completions, laid out in micro-batches five ways
    "in_order": GROUP_PADDED,  # one group per micro-batch: the reference's layout
    "in_order_mb3": BatchingOptions(micro_batch_size=3),  # micro-batches straddle groups
    "by_length": BatchingOptions(micro_batch_size=3, group_by_length=True),
    "packed": PACKED,
    "shared": GROUP_SHARED,
}


def _direct_loss(pol, samples, loss_type: str, max_len: int) -> float:
    """The reference's step loss computed directly from full-batch log-probs: the loss of each group of
    4 (its micro-batch) normalised as the reference does, averaged over the groups (bnpo, grpo,
    dr_grpo), or the token mean of the batch (dapo)."""
    from megatron_ghpo.algo.losses import per_token_policy_loss

    lp = pol.compute_logprobs(C.batch(samples))
    ref = pol.compute_logprobs(C.batch(samples), reference=True)
    per_seq, tokens = [], []
    for s, a, r in zip(samples, lp, ref):
        l, _ = per_token_policy_loss(torch.tensor([a], dtype=torch.float64), torch.tensor([s.old_logprobs], dtype=torch.float64),
                                     torch.tensor([s.advantage], dtype=torch.float64), beta=BETA,
                                     ref_logprobs=torch.tensor([r], dtype=torch.float64))  # fmt: skip
        m = torch.tensor(s.completion_mask, dtype=torch.float64)
        per_seq.append(float((l[0] * m).sum()))
        tokens.append(float(m.sum()))
    groups = [range(g, g + 4) for g in range(0, len(samples), 4)]
    if loss_type == "bnpo":
        return sum(sum(per_seq[i] for i in g) / sum(tokens[i] for i in g) for g in groups) / len(groups)
    if loss_type == "grpo":
        return sum(x / n for x, n in zip(per_seq, tokens)) / len(samples)
    if loss_type == "dr_grpo":
        return sum(per_seq) / (len(samples) * max_len)
    return sum(per_seq) / sum(tokens)


def layout_check(name: str, pol, results) -> None:
    """Every loss type gives the same step loss and gradients in every micro-batch layout (in order,
    straddling groups, length-grouped, packed, shared-prompt rows), equal to the reference's loss
    computed directly (bnpo: the token mean of each group, averaged over groups); shared-prompt rows
    read each prompt once per group."""
    samples = C.grouped_samples()
    samples = C.with_old_logprobs(samples, pol.compute_logprobs(C.batch(samples)))
    before_batching, before_algo = pol.batching, pol.algorithm
    max_len = max(len(s.completion_ids) for s in samples)
    for loss_type in ("bnpo", "grpo", "dr_grpo", "dapo"):
        pol.algorithm = AlgorithmOptions(loss_type=loss_type, beta=BETA, loss_unit_size=4, max_completion_length=max_len)
        seen = {}
        for key, batching in LAYOUTS.items():
            pol.batching = batching
            report = pol.forward_backward(samples)
            seen[key] = (report, {n: t.detach().clone().float() for n, _p, t in C.global_items(pol, "grad")})
        rep_a, g_a = seen["in_order"]
        direct = _direct_loss(pol, samples, loss_type, max_len)
        results[f"{name}_layouts/{loss_type}/direct"] = abs(rep_a["loss"] - direct)
        results[f"{name}_layouts/{loss_type}/scale_loss"] = abs(direct)
        results[f"{name}_layouts/{loss_type}/scale_grads"] = C.all_max(max(g.abs().max().item() for g in g_a.values()))
        for key, (rep_b, g_b) in seen.items():
            results[f"{name}_layouts/{loss_type}/{key}/loss"] = abs(rep_a["loss"] - rep_b["loss"])
            results[f"{name}_layouts/{loss_type}/{key}/grads"] = C.all_max(max((g_a[n] - g_b[n]).abs().max().item() for n in g_a))
        results[f"{name}_layouts/input_tokens_shared"] = seen["shared"][0]["input_tokens"]
        results[f"{name}_layouts/input_tokens_padded"] = rep_a["input_tokens"]
    pol.batching, pol.algorithm = before_batching, before_algo


def _share_index(pol, share) -> list[int]:
    d, per = pol.layout.dp_rank, len(share)
    return list(range(d * per, (d + 1) * per))


def temperature_check(pol, samples, results) -> None:
    """Vocabulary-parallel log-probs and entropy at temperature 0.7 equal a plain softmax over the
    gathered (unpadded) vocabulary."""
    tau = 0.7
    lp, ent = pol.compute_logprobs(C.batch(samples), temperature=tau, entropy=True)
    worst_lp = worst_ent = 0.0
    for i, s in enumerate(samples):
        seq = torch.tensor([s.prompt_ids + s.completion_ids[:-1]])
        logits = pol.full_logits(seq)[0, len(s.prompt_ids) - 1 :] / tau
        logp = torch.log_softmax(logits.double(), dim=-1)
        direct = logp.gather(-1, torch.tensor(s.completion_ids).unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        worst_lp = max(worst_lp, (torch.tensor(lp[i]).double() - direct).abs().max().item())
        worst_ent = max(worst_ent, (torch.tensor(ent[i]).double() - entropy).abs().max().item())
    results["tp2/temperature_logprobs"] = worst_lp
    results["tp2/entropy"] = worst_ent


def nan_check(pol, samples, results) -> None:
    """A NaN advantage makes the loss NaN: the update must be skipped, counted, and harmless."""
    before = {n: t.clone() for n, _p, t in C.global_items(pol, "param")}
    lr_before = pol.learning_rate()
    bad = [C.TrainSample(**s.__dict__) for s in samples]
    bad[3].advantage = float("nan")
    m = pol.train_step(C.batch(bad))
    changed = max((t - before[n]).abs().max().item() for n, _p, t in C.global_items(pol, "param"))
    results["nan/loss_is_nan"] = float(math.isnan(m["train/loss"]))
    results["nan/update_skipped"] = m["train/update_skipped"]
    results["nan/skipped_steps"] = m["train/skipped_steps"]
    results["nan/max_weight_change"] = C.all_max(changed)
    results["nan/lr_unchanged"] = float(pol.learning_rate() == lr_before)
    m2 = pol.train_step(C.batch(samples))
    results["nan/next_step_updated"] = 1.0 - m2["train/update_skipped"]
    results["nan/next_step_skipped_steps"] = m2["train/skipped_steps"]


def scenario_world4(out: Path, results: dict) -> None:
    cfg = C.tiny_config()
    init = out / "init"
    samples = initial_model(cfg, init)
    ref, g_ref, w_ref = reference(cfg, init, samples, results)
    pol = make(cfg, tp=2, pp=2, init=init)
    compare("tp2pp2", ref, pol, run(pol, samples), results, weights_ref=w_ref, grads_ref=g_ref)
    layout_check("tp2pp2", pol, results)
    pol.close(destroy_process_group=False)


def scenario_vpp(out: Path, results: dict) -> None:
    """PP=2 x VPP=2 (interleaved 1F1B) on a 4-layer untied model; scales under ``vpp_scale/``."""
    cfg = C.tiny_config(layers=4, tied=False)
    init = out / "init_vpp"
    samples = initial_model(cfg, init)
    ref, g_ref, w_ref = reference(cfg, init, samples, results, scale_prefix="vpp_scale")
    pol = make(cfg, pp=2, vpp=2, init=init)
    compare("pp2vpp2", ref, pol, run(pol, samples), results, weights_ref=w_ref, grads_ref=g_ref)
    pol.close(destroy_process_group=False)


SCENARIOS = {"world2": scenario_world2, "world4": scenario_world4}


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    scenario, out = argv[0], Path(argv[1])
    results: dict[str, float] = {}
    SCENARIOS[scenario](out, results)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        (out / "result.json").write_text(json.dumps(results, indent=1, sort_keys=True))
