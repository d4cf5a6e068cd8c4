"""`aphro serve [MODEL]`: the OpenAI-compatible server (engine.serve)."""

from __future__ import annotations

import click
from rich.markup import escape

from aphro_cli.main import console, err_console, handle_errors
from aphro_cli.options import check_validated_model, strict_option, with_engine_options

DEFAULT_MODEL = "llama"  # a spec in model_specs/: a tiny random-weight Llama is built
DEFAULT_NAME = "tiny-llama"


@click.command()
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; set --api-key then).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: a free one, printed at start).")
@click.option("--api-key", envvar="APHRO_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every route but /health.")
@click.option("--served-model-name", "served_model_names", multiple=True,
              help="The model name clients send (repeatable; default: MODEL as given).")
@click.option("--chat-template", default=None,
              help="A Jinja chat template, or a file holding one (default: the checkpoint's).")
@click.option("--shutdown-timeout", type=click.FloatRange(0), default=30.0, show_default=True,
              help="On SIGTERM: seconds in-flight requests may take before they are aborted.")
@click.option("--max-request-bytes", type=click.IntRange(1), default=16 << 20,
              show_default=True, help="Largest request body (413 above).")
@click.option("--max-header-bytes", type=click.IntRange(1024), default=16 << 10,
              show_default=True, help="Largest request line + headers.")
@click.option("--max-n", type=click.IntRange(1), default=128, show_default=True,
              help="Largest n (completions per prompt).")
@click.option("--max-stop", type=click.IntRange(0), default=16, show_default=True,
              help="Most stop strings (and stop token ids) per request.")
@click.option("--max-prompts", type=click.IntRange(1), default=1024, show_default=True,
              help="Most prompts in one /v1/completions request.")
@strict_option
@with_engine_options
@handle_errors
def serve(model, host, port, api_key, served_model_names, chat_template, shutdown_timeout,
          max_request_bytes, max_header_bytes, max_n, max_stop, max_prompts, strict, engine):
    """Serve MODEL over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions,
    /v1/models, /tokenize, /detokenize, /tokenizer_info, /health, /metrics.

    MODEL is a local HF checkpoint folder or a registered architecture or spec (a tiny
    random-weight checkpoint is built for it). Without MODEL a tiny random-weight Llama is
    served, so `aphro serve` works at once with nothing to download.
    """
    from engine.config import EngineConfig
    from engine.serve.chat import SIMPLE_CHAT_TEMPLATE, find_chat_template
    from engine.serve.launch import run_server
    from engine.serve.serving import ServeOptions, ServerLimits
    from engine.validate.tiny import tiny_or_folder

    def say(msg: str) -> None:
        console.print(escape(msg), highlight=False, soft_wrap=True)

    names = tuple(served_model_names) or (model or DEFAULT_NAME,)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]warning:[/] listening on {escape(host)} without --api-key: "
                          "anyone who can reach this port can use the model", soft_wrap=True)
    limits = ServerLimits(max_n=max_n, max_stop=max_stop, max_prompts=max_prompts,
                          max_body_bytes=max_request_bytes, max_header_bytes=max_header_bytes)
    with tiny_or_folder(model or DEFAULT_MODEL, engine["seed"], False, say) as (path, source):
        template = find_chat_template(path, chat_template)
        if template is None and source == "tiny":
            template = SIMPLE_CHAT_TEMPLATE  # aphro's tiny tokenizers have none
        if template is None:
            say("this checkpoint has no chat template: /v1/chat/completions answers 400 "
                "(give --chat-template FILE)")
        check_validated_model(path, strict)
        config = EngineConfig.create(str(path), **engine)
        run_server(config, ServeOptions(names, api_key, template, limits), host, port,
                   shutdown_timeout, say)
