"""Chat templates: rendered as transformers renders them (its apply_chat_template is the
reference), found where checkpoints keep them, and sandboxed."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.checkpoint.files import load_tokenizer
from engine.errors import ConfigError, RequestError
from engine.serve.chat import ChatTemplate, find_chat_template, special_tokens_of

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
FANCY = """{{ bos_token }}
{%- if messages[0]['role'] != 'system' %}{{ raise_exception('a system message comes first') }}
{%- endif %}
{%- for message in messages %}
  {%- if loop.index0 > 5 %}{% break %}{% endif %}
  [{{ message['role'] | upper }}] {{ message['content'] | trim }}{{ eos_token }}
{%- endfor %}
{%- if tools %}{{ tools | tojson }}{% endif %}
{%- if add_generation_prompt %}[ASSISTANT]{% endif %}"""
MESSAGES = [{"role": "system", "content": "Be brief. "},
            {"role": "user", "content": "  What is a paged KV cache?"},
            {"role": "assistant", "content": "Blocks."}, {"role": "user", "content": "Thanks"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return load_tokenizer(tiny_llama_dir)


@pytest.mark.parametrize("template", [CHATML, FANCY])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_matches_transformers(tokenizer, template, add_generation_prompt):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    ours = ChatTemplate(template, special_tokens_of(tokenizer)).render(
        MESSAGES, add_generation_prompt, tools=tools)
    theirs = tokenizer.apply_chat_template(MESSAGES, chat_template=template, tools=tools,
                                           tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
    assert ours == theirs


def test_template_errors_are_request_errors_and_the_sandbox_holds(tokenizer):
    specials = special_tokens_of(tokenizer)
    with pytest.raises(RequestError, match="a system message comes first"):
        ChatTemplate(FANCY, specials).render(MESSAGES[1:])
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(RequestError):
        ChatTemplate(escape, specials).render(MESSAGES)
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for %}", specials)


def test_where_templates_are_found(tmp_path, tiny_llama_dir):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, folder)
    assert find_chat_template(folder) is None  # aphro's tiny tokenizer has none
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T{{ 1 }}"},
                               {"name": "default", "template": "D{{ 1 }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert find_chat_template(folder) == "D{{ 1 }}"
    (folder / "chat_template.jinja").write_text(CHATML)
    assert find_chat_template(folder) == CHATML
    (tmp_path / "mine.jinja").write_text(FANCY)
    assert find_chat_template(folder, str(tmp_path / "mine.jinja")) == FANCY
    assert find_chat_template(folder, "{{ messages[0]['content'] }}") == \
        "{{ messages[0]['content'] }}"
    with pytest.raises(ConfigError, match="no such file"):
        find_chat_template(folder, str(tmp_path / "missing.jinja"))
