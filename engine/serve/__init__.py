"""The OpenAI-compatible server (`aphro serve`): an asyncio front over the same LLMEngine, which
runs in its own process (the engine core) so the HTTP loop and the engine never share a GIL.

    async_llm.py         AsyncLLM: the loop's handle on the core (commands down, outputs up a pipe)
    engine_core.py       the core process: owns the LLMEngine, steps, sends deltas per step
    streams.py           EngineRequest in, RequestStream (coalesced delta outputs) out
    protocol.py          pydantic v2 request models, OpenAI's error JSON
    serving.py           what the endpoints share: tokenizer, names, limits, request checks
    completions.py       POST /v1/completions (echo + logprobs: lm-eval's scoring requests)
    chat_completions.py  POST /v1/chat/completions
    chat.py              chat templates: where a checkpoint keeps them; jinja2 sandbox
    sse.py               server-sent events; aborting on client disconnect
    middleware.py        API key and body-size guard on the raw ASGI scope
    metrics.py           Prometheus metrics under vLLM's names (aphro: prefix)
    api_server.py        the FastAPI app and its routes
    launch.py            uvicorn on a bound socket; SIGTERM drains, then exits 0
"""
