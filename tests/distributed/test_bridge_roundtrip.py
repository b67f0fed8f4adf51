"""HF -> Megatron checkpoint -> loaded at TP x PP (x EP) -> HF, bit for bit, for tiny Qwen2, Llama,
Qwen3 and Qwen3-MoE models.

Models (built locally, random, every bias and norm perturbed so layout mistakes show): tied and
untied embeddings, GQA and MHA, vocabularies not divisible by the padding multiple (128 x TP), one
4-layer model for the virtual pipeline, and a ~16 MB model for the memory bound; Qwen3 with q/k
RMSNorm and a head_dim other than hidden / heads; a 4-layer Qwen3-MoE (4 experts, top-2, layer 1
dense) for expert parallelism. Three launches cover every layout: 1 rank (import + TP1 PP1 +
logits vs HF + rejected inputs), 2 ranks (TP2, PP2, PP2 x VPP2, DP2 at TP1 PP1; MoE also EP2 over
DP and EP2 inside TP2), 4 ranks (TP2 x PP2; MoE also TP2 x PP2 x EP2 and TP2 x EP2 x ETP2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megatron_ghpo.bridge.launch import run_ranks

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_bridge_worker.py")
MODELS = [
    # name, arch, heads, kv heads, tied, vocab, layers, hidden, ffn (a "bf16" name: weights stored in bf16)
    ("qwen2_tied_gqa", "qwen2", 4, 2, True, 500, 2, 64, 128),
    ("qwen2_bf16_untied_gqa", "qwen2", 4, 2, False, 420, 2, 64, 128),
    ("qwen2_untied_mha", "qwen2", 4, 4, False, 390, 2, 64, 96),
    ("llama_tied_mha", "llama", 4, 4, True, 450, 2, 64, 128),
    ("llama_untied_gqa_4l", "llama", 8, 2, False, 520, 4, 64, 128),
    ("qwen3_untied_gqa_hd24", "qwen3", 4, 2, False, 470, 2, 64, 128),
    ("qwen3_moe_tied_4l", "qwen3_moe", 4, 2, True, 430, 4, 64, 96),
]
FAMILY_KWARGS = {
    "qwen3_untied_gqa_hd24": {"head_dim": 24},  # 4 heads x 24 != hidden 64
    "qwen3_moe_tied_4l": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                          "mlp_only_layers": (1,)},  # fmt: skip
}
MEMORY_MODEL = ("qwen2_memory", "qwen2", 4, 2, False, 4000, 2, 256, 1024)
BUCKET = 64 * 1024
MEMORY_BUCKET = 4 * 1024 * 1024  # about a quarter of the 15.5 MiB memory model
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MEGATRON_GHPO_NO_PROGRESS": "1"}


def _perturb(hf_dir: Path, bf16: bool) -> None:
    """Give biases non-zero values (HF initialises them to 0, which would hide a bias layout bug);
    optionally store every weight in bf16 (and say so in config.json)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = hf_dir / "model.safetensors"
    sd = load_file(str(path))
    g = torch.Generator().manual_seed(7)
    for k, v in sd.items():
        if k.endswith(".bias"):
            v = v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        sd[k] = v.to(torch.bfloat16) if bf16 else v
    save_file(sd, str(path), metadata={"format": "pt"})
    if bf16:
        cfg = json.loads((hf_dir / "config.json").read_text())
        cfg["dtype"] = "bfloat16"
        (hf_dir / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    from megatron_ghpo.models.tiny import build_tiny_model, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("bridge")
    build_tiny_tokenizer(root / "tok")
    specs = []
    for i, (name, arch, heads, kv, tied, vocab, layers, hidden, ffn) in enumerate([*MODELS, MEMORY_MODEL]):
        hf_dir = root / name
        build_tiny_model(hf_dir, arch=arch, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                         num_kv_heads=kv, intermediate_size=ffn, tie_word_embeddings=tied, seed=i, tokenizer_dir=root / "tok",
                         **FAMILY_KWARGS.get(name, {}))  # fmt: skip
        _perturb(hf_dir, bf16="bf16" in name)
        specs.append({"name": name, "hf_dir": str(hf_dir), "ckpt": str(root / f"{name}.ckpt"), "vocab": vocab,
                      "layers": layers, "memory": name == MEMORY_MODEL[0], "first": name == "llama_untied_gqa_4l",
                      "moe": arch == "qwen3_moe"})  # fmt: skip
    return {"root": root, "models": specs, "bad": _bad_inputs(root, Path(specs[0]["hf_dir"]))}


def _bad_inputs(root: Path, good: Path) -> list[dict]:
    """HF folders with an unknown extra tensor and with a missing tensor."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    cases = []
    for case, expect in (("extra", "model.layers.0.self_attn.q_norm.weight"), ("missing", "model.layers.1.mlp.up_proj.weight")):
        d = root / f"bad_{case}"
        shutil.copytree(good, d)
        sd = load_file(str(d / "model.safetensors"))
        if case == "extra":
            sd[expect] = torch.ones(16)
        else:
            del sd[expect]
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        cases.append({"name": case, "hf_dir": str(d), "ckpt": str(root / f"bad_{case}.ckpt"), "expect": expect})
    return cases


def _launch(task: str, args: dict, world: int, out: Path, timeout: float) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    run_ranks(task, {**args, "out": str(out)}, world, timeout_s=timeout, entry=[sys.executable, str(WORKER)],
              quiet_rank0=True, extra_env=ENV)  # fmt: skip
    records = []
    for r in range(world):
        for rec in json.loads((out / f"rank{r}.json").read_text()):
            records.append({"rank": r, **rec})
    return records


def _assert_all_ok(records: list[dict], expected_checks: set[str]) -> None:
    failed = [r for r in records if not r["ok"]]
    assert not failed, "failed checks:\n" + "\n".join(json.dumps(r)[:1500] for r in failed)
    seen = {r["check"] for r in records}
    assert expected_checks <= seen, f"checks that never ran: {expected_checks - seen}"


def _report_memory(records: list[dict]) -> None:
    for r in records:
        if r["check"] == "export_memory":
            print(f"[memory] layout={r['layout']} {r.get('transport', 'auto'):10} rank={r['rank']} peak_extra={r['peak_extra'] / 2**20:.2f} MiB "
                  f"<= bucket {r['bucket_bytes'] / 2**20:.2f} + largest {r['largest'] / 2**20:.2f} MiB "
                  f"(model on this rank {r['model_bytes_this_rank'] / 2**20:.2f} MiB)")  # fmt: skip


@pytest.fixture(scope="module")
def imported(models) -> dict:
    """Launch 1 (one rank): convert every model; TP1 PP1 round trip, logits vs HF, rejected inputs."""
    records = _launch("import", {"models": models["models"], "bad": models["bad"], "bucket_bytes": BUCKET,
                                 "memory_bucket_bytes": MEMORY_BUCKET}, 1, models["root"] / "out_import", 300)  # fmt: skip
    return {**models, "records": records}


def test_import_and_tp1_pp1_round_trip(imported):
    records = imported["records"]
    _report_memory(records)
    for r in records:
        if r["check"] == "megatron_logits_vs_hf":
            print(f"[logits] {r['model']}: max |Megatron - transformers| = {r['max_abs_diff']:.3g}")
    _assert_all_ok(records, {"export_keys", "export_bit_exact", "megatron_logits_vs_hf", "export_memory", "import_rejects"})
    assert sum(r["check"] == "export_bit_exact" for r in records) == len(imported["models"])
    assert sum(r["check"] == "import_rejects" for r in records) == 2
    for m in imported["models"]:
        ckpt = Path(m["ckpt"])
        assert (ckpt / "hf" / "config.json").is_file() and (ckpt / "hf" / "tokenizer.json").is_file()
        assert (ckpt / "ghpo_policy.json").is_file() and (ckpt / "bridge.json").is_file()


@pytest.mark.parametrize(
    "world,layouts",
    [(2, [[2, 1, None], [1, 2, None], [1, 2, 2], [1, 1, None], [1, 1, None, 2, 1], [2, 1, None, 2, 1]]),
     (4, [[2, 2, None], [2, 2, None, 2, 1], [2, 1, None, 2, 2]])],
    ids=["2ranks-tp2-pp2-vpp2-dp2-ep2", "4ranks-tp2xpp2-ep2-etp2"],
)  # fmt: skip
def test_round_trip_at_layouts(imported, world, layouts):
    out = imported["root"] / f"out_layouts_{world}"
    records = _launch("layouts", {"models": imported["models"], "layouts": layouts, "bucket_bytes": BUCKET,
                                  "memory_bucket_bytes": MEMORY_BUCKET}, world, out, 480)  # fmt: skip
    _report_memory(records)
    _assert_all_ok(records, {"export_keys", "export_bit_exact", "export_memory"})
    flags = ("keep_buffer", "consumer_keeps", "cast_bf16", "live_import")
    for layout in layouts:
        tp, pp, vpp, *expert = layout
        done = {r["model"] for r in records if r["check"] == "export_bit_exact" and r["layout"] == layout}
        want = {m["name"] for m in imported["models"] if not (vpp and m["layers"] % (pp * vpp)) and (m["moe"] or not expert)}
        assert done == want, f"layout {layout}: compared {sorted(done)}, expected {sorted(want)}"
        # shm needs every expert inside the TP group (EP x ETP dividing TP); otherwise it must refuse
        # (a one-rank TP x PP group shares nothing and takes the collective path).
        shm_ok = not expert or tp % (expert[0] * expert[1]) == 0 or tp * pp == 1
        for transport in ("collective", "shm") if shm_ok else ("collective",):
            ranks = {r["rank"] for r in records if r["check"] == "export_bit_exact" and r["layout"] == layout
                     and r.get("transport") == transport and not {"destination", *flags} & r.keys()}
            assert ranks == set(range(world)), f"{layout} {transport}: every rank must receive every tensor, got ranks {ranks}"
        if not shm_ok:
            refused = {r["rank"] for r in records if r["check"] == "shm_rejects_experts_outside_tp" and r["layout"] == layout}
            assert refused == set(range(world)), f"{layout}: shm must refuse experts outside TP on every rank, got {refused}"
        if expert:
            live = {r["rank"] for r in records if r.get("live_import") and r["layout"] == layout and r["check"] == "export_bit_exact"}
            assert live == set(range(world)), f"{layout}: direct HF import at EP must round-trip on every rank, got {live}"
    if world == 2:
        assert any(r["check"] == "export_first_nonreceiver_empty" for r in records)
    variants = {k for r in records if r["check"] == "export_bit_exact" for k in flags if k in r}
    assert variants == set(flags)
