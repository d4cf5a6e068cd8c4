"""The server's Prometheus metrics: vLLM's metric names under an `aphro:` prefix, written in the
Prometheus text format (version 0.0.4) by hand, so no registry or global state is involved.

`ServingMetrics.on_output` is called on the event loop for every output the engine streams;
`render` writes the counters, the engine's gauges and the histograms.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from engine.core.outputs import EngineStats, RequestOutput

PREFIX = "aphro:"
# vLLM's buckets
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)  # per bucket, not cumulative; last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, labels: str) -> list[str]:
        name = PREFIX + self.name
        out = [f"# HELP {name} {self.help}", f"# TYPE {name} histogram"]
        total = 0
        for bound, n in zip((*self.buckets, math.inf), self.counts):
            total += n
            le = '"+Inf"' if bound == math.inf else f'"{float(bound)!r}"'
            out.append(f"{name}_bucket{_braces(labels, 'le=' + le)} {total}")
        out += [f"{name}_sum{_braces(labels)} {self.sum!r}",
                f"{name}_count{_braces(labels)} {self.count}"]
        return out


@dataclass
class RequestTrack:
    """What the metrics remember about one engine request while it runs."""

    arrival: float  # time.monotonic() when the server handed it to the engine
    first_token_time: float | None = None
    last_token_time: float = 0.0
    num_tokens: int = 0
    num_preemptions: int = 0


@dataclass
class ServingMetrics:
    prefix_caching: bool = True
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    success: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    ttft: Histogram = field(default_factory=lambda: Histogram(
        "time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(
        "inter_token_latency_seconds", "Time between streamed tokens in seconds.", ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(
        "e2e_request_latency_seconds", "End-to-end request latency in seconds.",
        REQUEST_BUCKETS))
    queue: Histogram = field(default_factory=lambda: Histogram(
        "request_queue_time_seconds", "Time from arrival to the start of the engine step that "
        "computed the request's first token, in seconds.", REQUEST_BUCKETS))

    def on_output(self, track: RequestTrack, out: RequestOutput, now: float,
                  step_start: float) -> None:
        """Account one streamed output of a request (a delta: the tokens new since the last)."""
        new = sum(len(c.token_ids) for c in out.outputs)
        if new > 0:
            if track.first_token_time is None:
                track.first_token_time = now
                self.ttft.observe(now - track.arrival)
                self.queue.observe(max(0.0, step_start - track.arrival))
                self.prompt_tokens += len(out.prompt_token_ids)
                if self.prefix_caching:
                    self.prefix_cache_queries += len(out.prompt_token_ids)
                    self.prefix_cache_hits += out.metrics.get("num_cached_tokens", 0)
            else:
                self.itl.observe((now - track.last_token_time) / new)
            track.last_token_time = now
            track.num_tokens += new
            self.generation_tokens += new
        preemptions = out.metrics.get("num_preemptions", 0)
        self.preemptions += max(0, preemptions - track.num_preemptions)
        track.num_preemptions = max(preemptions, track.num_preemptions)
        if out.finished:
            self.on_finished(track, out.outputs[0].finish_reason or "abort", now)

    def on_finished(self, track: RequestTrack, reason: str, now: float) -> None:
        self.success[reason] = self.success.get(reason, 0) + 1
        self.e2e.observe(now - track.arrival)

    def render(self, stats: EngineStats, labels: dict[str, str]) -> str:
        """The Prometheus text exposition of every metric."""
        lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]):
            full = PREFIX + name
            lines.extend((f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"))
            for extra, value in samples:
                lines.append(f"{full}{_braces(lab, extra)} {value!r}")

        family("num_requests_running", "gauge", "Requests running on the engine.",
               [("", stats.num_requests_running)])
        family("num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
               [("", stats.num_requests_waiting)])
        family("kv_cache_usage_perc", "gauge", "KV-cache usage (1 means 100 percent).",
               [("", float(stats.kv_cache_usage))])
        family("prompt_tokens_total", "counter", "Prompt tokens processed.",
               [("", self.prompt_tokens)])
        family("generation_tokens_total", "counter", "Generated tokens.",
               [("", self.generation_tokens)])
        family("request_success_total", "counter", "Finished requests, by finish reason.",
               [(f'finished_reason="{_escape(r)}"', n) for r, n in self.success.items()])
        family("num_preemptions_total", "counter", "Preemptions (recompute) of sequences.",
               [("", self.preemptions)])
        family("prefix_cache_queries_total", "counter",
               "Prompt tokens looked up in the prefix cache.", [("", self.prefix_cache_queries)])
        family("prefix_cache_hits_total", "counter", "Prompt tokens served by the prefix cache.",
               [("", self.prefix_cache_hits)])
        for hist in (self.ttft, self.itl, self.e2e, self.queue):
            lines.extend(hist.lines(lab))
        return "\n".join(lines) + "\n"


def _braces(*parts: str) -> str:
    inner = ",".join(p for p in parts if p)
    return "{" + inner + "}" if inner else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
