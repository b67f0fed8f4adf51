"""Per-step metrics: metrics.jsonl, one console line per step, wandb (offline by default), TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from megatron_ghpo.logging_utils import get_logger

logger = get_logger("metrics")

# Keys shown on the console line, in this order, when present.
CONSOLE_KEYS = ("train/loss", "train/reward", "train/acc", "ghpo/acc_unhinted", "ghpo/difficult_frac_stage0",
                "ghpo/generation_passes", "train/grad_norm", "perf/step_s", "perf/tokens_per_s")


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


class MetricsLogger:
    """Writes metrics on the logging rank only; construct it with ``enabled=False`` elsewhere."""

    def __init__(self, out_dir: str | Path, *, enabled: bool, report_to: list[str], run_name: str | None,
                 wandb_project: str, wandb_mode: str, config: dict | None = None, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._wandb = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step == 0 and self.path.exists():
            self.path.unlink()
        elif resume_step > 0 and self.path.exists():
            self._truncate_after(resume_step)
        if "wandb" in report_to and wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=run_name, mode=wandb_mode, config=config,
                                     dir=str(Path(out_dir)), resume="allow")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps the resumed run will redo (written after the checkpoint)."""
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, step: int, metrics: dict[str, Any], *, console: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in sorted(metrics.items())}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if console:
            shown = " ".join(f"{k.split('/', 1)[1]}={_fmt(row[k])}" for k in CONSOLE_KEYS if k in row)
            logger.info("step %d | %s", step, shown)
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
