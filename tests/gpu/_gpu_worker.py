"""Single-GPU checks of the Transformer Engine layer spec and FP8, run by test_policy_gpu.py.

``python _gpu_worker.py <out_dir>``; writes ``result.json``. Light top-level imports on purpose
(the checkpoint writer's spawn-context manager re-imports this file).
"""

import sys
from pathlib import Path

# Local spec parameter name -> TE spec name (TE fuses the pre-attention/pre-MLP norms into the
# following linear layer); every other name is shared.
LOCAL_TO_TE = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def copy_local_to_te(local, te) -> None:
    import torch

    src = dict(local.named_parameters())
    dst = dict(te.named_parameters())
    with torch.no_grad():
        for name, p in src.items():
            tname = name
            for a, b in LOCAL_TO_TE.items():
                if name.endswith(a):
                    tname = name[: -len(a)] + b
            dst.pop(tname).copy_(p)
    if dst:
        raise AssertionError(f"TE parameters without a local counterpart: {sorted(dst)}")


def main(out: Path) -> None:
    import json
    import math
    import random

    import torch
    from transformers import Qwen2Config

    from megatron_ghpo.policy.optimizer import OptimizerOptions
    from megatron_ghpo.policy.options import ModelOptions, ParallelOptions
    from megatron_ghpo.policy.policy import MegatronPolicy
    from megatron_ghpo.records import TrainBatch, TrainSample

    cfg = Qwen2Config(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05,
                      max_position_embeddings=512).to_dict()
    rng = random.Random(0)
    samples = [TrainSample(prompt_ids=[rng.randrange(1000) for _ in range(rng.randint(8, 20))],
                           completion_ids=[rng.randrange(1000) for _ in range(n)], advantage=rng.uniform(-1, 1),
                           completion_mask=[1] * n) for n in (9, 17, 12, 30)]
    batch = TrainBatch(samples=samples)
    tokens = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    par = ParallelOptions(seed=7, timeout_s=300)
    opt = OptimizerOptions(lr=1e-4)
    res: dict[str, float] = {}

    def build(impl: str, *, bf16: bool = False, fp8=None) -> MegatronPolicy:
        model = ModelOptions(transformer_impl=impl, bf16=bf16, fp8=fp8)
        return MegatronPolicy(cfg, parallel=par, model=model, optimizer=opt, random_init=True)

    local = build("local")
    ref_logits = local.full_logits(tokens)
    res["scale/logits"] = ref_logits.abs().max().item()
    for name, bf16, fp8 in (("te_fp32", False, None), ("te_bf16", True, None), ("te_fp8", True, "hybrid")):
        if fp8 and torch.cuda.get_device_capability() < (8, 9):
            res["fp8_skipped"] = 1.0
            continue
        pol = build("transformer_engine", bf16=bf16, fp8=fp8)
        res[f"{name}/is_te"] = float(pol.model_chunks[0].config.transformer_impl == "transformer_engine")
        copy_local_to_te(local.model_chunks[0], pol.model_chunks[0])
        pol.optimizer.reload_model_params()
        res[f"{name}/logits"] = (pol.full_logits(tokens) - ref_logits).abs().max().item()
        for step in range(2):
            m = pol.train_step(batch)
            res[f"{name}/loss{step}"] = m["train/loss"]
            res[f"{name}/grad_norm{step}"] = m["train/grad_norm"]
            res[f"{name}/skipped{step}"] = m["train/update_skipped"]
        res[f"{name}/finite"] = float(all(math.isfinite(v) for k, v in res.items() if k.startswith(name)))
        pol.close(destroy_process_group=False)
    (out / "result.json").write_text(json.dumps(res, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
