"""The serving core: requests in, scheduled steps, outputs out. Plain Python and numpy; the
model runs behind the executor (engine.distributed).

    llm.py             LLM: the offline API
    llm_engine.py      LLMEngine: add_request / abort_request / step
    scheduler.py       continuous batching, chunked prefill, preemption by recompute
    block_manager.py   paged KV blocks, ref counts, prefix caching
    sequence.py        one sequence's tokens and state
    sampling_params.py SamplingParams, validated
    batch.py           StepBatch (one step as flat host arrays) and RunnerOutput
    detokenizer.py     incremental detokenization, stop strings
    outputs.py         RequestOutput, CompletionOutput, EngineStats
"""
