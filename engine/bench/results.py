"""The one result schema every benchmark writes ("aphro.bench/1"): `bench throughput`, `bench
latency` and `bench serve` each produce a record

    {"schema": "aphro.bench/1", "kind": "throughput" | "latency" | "serve",
     "command": the command line, "commit": the git commit (or null), "date": UTC ISO 8601,
     "hardware": {...}, "model": {...}, "workload": {...}, "results": {...},
     "roofline": {...} | null}

so that docs/PERF.md tables come from result files (scripts/perf_table.py). RESULT_SCHEMA is the
JSON Schema of a record; `validate` checks one against it (jsonschema when it is installed,
else the required keys and their types). NaN figures are written as null.
"""

from __future__ import annotations

import datetime
import json
import math
import subprocess
from pathlib import Path

from engine.errors import ConfigError

SCHEMA_ID = "aphro.bench/1"
KINDS = ("throughput", "latency", "serve")
_NUM = {"type": ["number", "null"]}
_OBJ = {"type": "object"}

RESULT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": SCHEMA_ID,
    "type": "object",
    "required": ["schema", "kind", "command", "commit", "date", "hardware", "model", "workload",
                 "results", "roofline"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "kind": {"enum": list(KINDS)},
        "command": {"type": "string"},
        "commit": {"type": ["string", "null"]},
        "date": {"type": "string"},
        "hardware": {  # what measure_hardware returns; a client's host for serve
            "type": "object", "required": ["device", "name"],
            "properties": {"device": {"type": "string"}, "name": {"type": "string"},
                           "memory_bytes": {"type": ["integer", "null"]},
                           "copy_bandwidth_gbs": _NUM, "matmul_tflops": _NUM}},
        "model": {"type": "object", "required": ["name"],
                  "properties": {"name": {"type": "string"},
                                 "parameters": {"type": ["integer", "null"]},
                                 "weight_bytes": {"type": ["integer", "null"]}}},
        "workload": _OBJ,
        "results": _OBJ,
        "roofline": {"type": ["object", "null"]},
    },
}


def git_commit() -> str | None:
    """The short commit of the source tree this code runs from, '+dirty' when it has local
    changes; None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


def _clean(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def make_record(kind: str, *, hardware: dict, model: dict, workload: dict, results: dict,
                roofline: dict | None, command: str) -> dict:
    """A record of the schema, stamped with the commit, the date and `command`, the command line
    (aphro_cli.bench_engine.command_line: secrets such as --api-key redacted)."""
    record = {"schema": SCHEMA_ID, "kind": kind, "command": command, "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "hardware": hardware, "model": model, "workload": workload, "results": results,
              "roofline": roofline}
    record = _clean(record)
    validate(record)
    return record


def validate(record: dict) -> None:
    """Raise ConfigError naming what in `record` does not fit RESULT_SCHEMA."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        try:
            jsonschema.validate(record, RESULT_SCHEMA)
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "the record"
            raise ConfigError(f"not an {SCHEMA_ID} result ({where}): {e.message}") from None
        return
    missing = [k for k in RESULT_SCHEMA["required"] if k not in record]
    if missing or record.get("schema") != SCHEMA_ID or record.get("kind") not in KINDS:
        raise ConfigError(f"not an {SCHEMA_ID} result: missing {missing}, schema "
                          f"{record.get('schema')!r}, kind {record.get('kind')!r}")


def to_json(record: dict) -> str:
    return json.dumps(_clean(record), indent=2)


def write_record(record: dict, path: str | Path) -> None:
    Path(path).write_text(to_json(record) + "\n")


def read_records(path: str | Path) -> list[dict]:
    """The records of a result file: one JSON record (throughput, serve) or one a line (latency
    appends a line per run); ConfigError when one does not fit the schema."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    try:
        records = [json.loads(text)]
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: neither a JSON record nor JSON lines ({e})") from None
    for record in records:
        if not isinstance(record, dict):
            raise ConfigError(f"{path}: not an {SCHEMA_ID} result (a JSON object)")
        try:
            validate(record)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if not records:
        raise ConfigError(f"{path}: no result record in the file")
    return records


def tpot_roofline_ratio(record: dict) -> float | None:
    """A latency record's measured TPOT p50 over its roofline bound (1.0: at the bound); None
    without a roofline or a figure (what `bench latency` and docs/PERF.md print)."""
    roof = record.get("roofline") or {}
    tpot = record["results"].get("tpot", {}).get("p50_ms")
    return tpot / roof["tpot_ms"] if roof.get("tpot_ms") and tpot is not None else None


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary_ms(values_s: list[float]) -> dict:
    """Seconds -> {"n", "mean_ms", "p50_ms", "p90_ms", "p99_ms"}."""
    ms = [v * 1e3 for v in values_s]
    out = {"n": len(ms), "mean_ms": sum(ms) / len(ms) if ms else math.nan}
    for q in (50, 90, 99):
        out[f"p{q}_ms"] = percentile(ms, q)
    return out
