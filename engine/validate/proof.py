"""A validation record from a parity check (and, with tp > 1, the sharding check): the proof
`aphro register` stores (engine.models.records.ValidationRecord).

`prove(check, architecture, target)` runs parity on `check` (a checkpoint folder, or a spec /
architecture checked on a tiny random checkpoint built once, in a temporary folder, for both
checks) with the default tolerances of the dtype and device, while `target` serves
`architecture` in this process, and returns the reports and the record they make.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from engine.models import registry
from engine.models.records import ValidationRecord
from engine.models.sources import checkpoint_hash, source_hashes
from engine.validate.parity import DEFAULT_PROMPTS, run_parity
from engine.validate.report import ParityReport
from engine.validate.sharding import ShardingReport, verify_sharding
from engine.validate.tiny import quiet_transformers, tiny_or_folder


@dataclass
class Proof:
    record: ValidationRecord
    report: ParityReport
    sharding: ShardingReport | None

    @property
    def passed(self) -> bool:
        return self.report.passed and (self.sharding is None or self.sharding.ok)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    try:
        aphro = version("aphro")
    except PackageNotFoundError:
        aphro = "unknown"
    return {"aphro": aphro, "torch": torch.__version__, "transformers": transformers.__version__}


def _finite(x: float) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def worst_errors(report: ParityReport) -> dict | None:
    """The worst figures over every run and prompt (None where a value was not finite)."""
    prompts = [p for run in report.runs for p in run.prompts]
    if not prompts:
        return None
    nan = any(math.isnan(p.max_abs) or math.isnan(p.max_kl) for p in prompts)
    return {"max_abs": None if nan else max(p.max_abs for p in prompts),
            "max_rel": None if nan else _finite(max(p.max_rel for p in prompts)),
            "max_kl": None if nan else _finite(max(p.max_kl for p in prompts)),
            "min_top1": min(p.top1_agreement for p in prompts),
            "greedy": f"{sum(p.greedy_ok for p in prompts)}/{len(prompts)}",
            "positions": sum(p.num_positions for p in prompts)}


def failure_reason(report: ParityReport, sharding: ShardingReport | None) -> str:
    """One line: what failed first."""
    if report.load is not None and not report.load_ok:
        counts = ", ".join(f"{len(report.load[k])} {k}" for k in ("missing", "unexpected",
                                                                  "misshaped") if report.load.get(k))
        return f"the checkpoint does not match the model ({counts} tensors)"
    if report.failure is not None:
        f = report.failure
        return f"engine failed in the {f.stage}: {f.error}" + (f" (in {f.module})" if f.module
                                                                 else "")
    if not report.passed:
        loc = report.localization
        if loc is not None and loc.first_divergence:
            return f"logits differ from HF; first divergence: {loc.first_divergence}"
        return "logits or greedy tokens out of tolerance"
    if sharding is not None and not sharding.ok:
        bad = sharding.failures()
        return (f"sharding over {sharding.tp} ranks: " + (f"{bad[0].name}: {bad[0].problem}"
                if bad else f"logits TP={sharding.tp} vs TP=1 differ by "
                f"{sharding.logits_max_abs:.1e}"))
    return ""


def _sharding_summary(s: ShardingReport) -> dict:
    return {"ok": s.ok, "params": len(s.params), "failed_params": len(s.failures()),
            "logits_max_abs": s.logits_max_abs, "logits_tolerance": s.logits_tolerance,
            "top1_agreement": s.top1_agreement}


def prove(check: str | Path, architecture: str, target: str, *, dtype: str = "auto",
          device: str = "auto", tp: int = 1, seed: int = 0, max_new_tokens: int = 16,
          chunked: bool = True, progress: Callable[[str], None] | None = None) -> Proof:
    """Parity (and the sharding check when tp > 1) of `target` serving `architecture`, on
    `check`. The record's status is "passed" or "failed"; bad arguments raise AphroError."""
    say = progress or (lambda msg: None)
    with registry.registered(architecture, target), \
            tiny_or_folder(check, seed, False, say) as (ckpt, kind), quiet_transformers():
        tiny = kind == "tiny"
        report = run_parity(ckpt, dtype=dtype, device=device, tp=tp, seed=seed,
                            max_new_tokens=max_new_tokens, chunked_prefill=chunked,
                            progress=say)
        report.model, report.source = str(check), kind
        report.checkpoint = None if tiny else str(ckpt)
        sharding = None
        if tp > 1:
            say(f"{check}: sharding over {tp} ranks")
            sharding = verify_sharding(ckpt, tp, report.device, dtype=report.dtype)
            sharding.model = str(check)
        digest = checkpoint_hash(ckpt, tiny)
    record = ValidationRecord(
        architecture=architecture, target=target,
        status="passed" if report.passed and (sharding is None or sharding.ok) else "failed",
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), versions=versions(),
        dtype=report.dtype, device=report.device, tp=tp,
        checkpoint={"kind": "tiny" if tiny else "folder",
                    "path": None if tiny else str(Path(ckpt).resolve()), "hash": digest},
        sources=source_hashes(target), tolerances=asdict(report.tolerances),
        worst=worst_errors(report),
        sharding=_sharding_summary(sharding) if sharding is not None else None,
        checks={"prompts": len(DEFAULT_PROMPTS), "max_new_tokens": max_new_tokens,
                "chunked_prefill": chunked, "seed": seed},
        reason=failure_reason(report, sharding))
    return Proof(record, report, sharding)
