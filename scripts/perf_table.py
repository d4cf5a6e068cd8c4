#!/usr/bin/env python3
"""Markdown tables of benchmark result files (schema aphro.bench/1), for docs/PERF.md:

    python scripts/perf_table.py FILES...

FILES are what `aphro bench throughput --json F`, `aphro bench latency --json F` (a record a
line) and `aphro bench serve --save-result F` write. One table per kind, a row per record, each
under a header line naming the card, the date, the commit and the command (a column of commands
where the rows' differ).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tree this script is in

from engine.bench.results import read_records, tpot_roofline_ratio
from engine.errors import AphroError


def _f(v, fmt: str = ",.1f") -> str:
    return "-" if v is None else format(v, fmt)


def _row_by_name(record: dict, name: str) -> dict:
    return next((r for r in record["results"]["rows"] if r.get("name") == name), {})


def _throughput(r: dict) -> list[str]:
    w, roof = r["workload"], r["roofline"] or {}
    engine, cb, gen = (_row_by_name(r, n) for n in ("aphro", "HF generate_batch", "HF generate"))
    lens = (str(w["min_input_len"]) if w["min_input_len"] == w["max_input_len"]
            else f"{w['min_input_len']}-{w['max_input_len']}")
    return [r["model"]["name"], f"{w['num_prompts']} x {lens} / {w['output_len']}",
            _f(engine.get("output_tok_s")), _f(cb.get("output_tok_s")), _f(cb.get("ratio"), ".2f"),
            _f(gen.get("output_tok_s")), _f(gen.get("ratio"), ".2f"),
            _f(roof.get("output_tok_s"), ",.0f"), _f(roof.get("fraction"), ".2f")]


def _latency(r: dict) -> list[str]:
    w, res, roof = r["workload"], r["results"], r["roofline"] or {}
    t = res["tpot"]
    return [r["model"]["name"], str(w["batch_size"]), str(w["tp"]),
            f"{w['input_len']} / {w['output_len']}", _f(res["ttft"]["p50_ms"], ".2f"),
            f"{t['p50_ms']:.3f} / {t['p90_ms']:.3f} / {t['p99_ms']:.3f}",
            _f(roof.get("tpot_ms"), ".3f"), _f(tpot_roofline_ratio(r), ".2f")]


def _serve(r: dict) -> list[str]:
    w, res = r["workload"], r["results"]
    shape = f"{w['num_prompts']} x {w['random_input_len']} / {w['random_output_len']}"
    return [r["model"]["name"], shape, str(w["request_rate"]), str(w["max_concurrency"] or "-"),
            f"{res['completed']} / {res['failed']}", _f(res["output_throughput"]),
            _f(res["median_ttft_ms"], ".2f"), _f(res["p99_ttft_ms"], ".2f"),
            _f(res["median_tpot_ms"], ".2f"), _f(res["median_itl_ms"], ".2f")]


COLUMNS = {
    "throughput": (["model", "prompts x in / out", "aphro tok/s", "HF generate_batch tok/s",
                    "aphro / it", "HF generate tok/s", "aphro / it", "roofline tok/s",
                    "fraction"], _throughput),
    "latency": (["model", "batch", "TP", "in / out", "TTFT ms p50", "TPOT ms p50 / p90 / p99",
                 "roofline TPOT ms", "TPOT / roofline"], _latency),
    "serve": (["model", "prompts x in / out", "rate", "concurrency", "ok / failed",
               "output tok/s", "TTFT ms median", "TTFT ms p99", "TPOT ms median",
               "ITL ms median"], _serve),
}


def card(hw: dict) -> str:
    mem = f", {hw['memory_bytes'] / 2**30:.0f} GiB" if hw.get("memory_bytes") else ""
    rates = ""
    if hw.get("copy_bandwidth_gbs") is not None:
        rates = (f", copy {hw['copy_bandwidth_gbs'] / 1e3:.2f} TB/s, bf16 matmul "
                 f"{hw['matmul_tflops']:.0f} TFLOP/s")
    return f"{hw['name']}{mem}{rates}"


def _distinct(values) -> str:
    return ", ".join(dict.fromkeys(values))


def tables(records: list[dict]) -> str:
    out = []
    for kind, (columns, row) in COLUMNS.items():
        rs = [r for r in records if r["kind"] == kind]
        if not rs:
            continue
        commands = list(dict.fromkeys(r["command"] for r in rs))
        header = (f"**{kind}** · card: {_distinct(card(r['hardware']) for r in rs)} · date: "
                  f"{_distinct(r['date'][:10] for r in rs)} · commit: "
                  f"{_distinct(str(r['commit']) for r in rs)}")
        if len(commands) == 1:
            header += f" · command: `{commands[0]}`"
            columns = list(columns)
        else:
            columns = [*columns, "command"]
        out += [header, "", "| " + " | ".join(columns) + " |",
                "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
        for r in rs:
            cells = row(r) + ([] if len(commands) == 1 else [f"`{r['command']}`"])
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        records = [rec for path in argv for rec in read_records(path)]
    except AphroError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tables(records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
