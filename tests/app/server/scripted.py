"""A scripted engine behind a real EngineHost and a live server, for answers whose *format*
matters (tool calls) where a random-weight model can't write one: the engine tokenizes
each request's scripted answer with the fixture's real tokenizer and streams it token by
token from its own thread, as the engine does; everything above it (the host, the
server, the openai client) is the real path. It records each prompt it was given.

The fixture model's tokenizer carries a small Hermes/Qwen-style chat template that
renders tools, assistant tool calls and tool results (``TOOL_TEMPLATE``)."""

from __future__ import annotations

import threading
import time

import pytest

from engine.api import FinishedEvent, Timings, TokenEvent, Usage
from engine.tokenizer import Tokenizer
from tests.app.model_info_fixtures import fake_info
from tests.app.server.conftest import API_KEY, LiveServer
from tests.app.services.fake_engine import fake_loads

TOOL_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions. Their signatures are within <tools></tools>:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each call, return a JSON object within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response id="{{ message.tool_call_id }}">
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def _finished(rid: str, reason: str, prompt: int, completion: int) -> FinishedEvent:
    return FinishedEvent(rid, reason, Usage(prompt, completion), Timings(0.1, 1.0, 1.0, 100.0, 2.0))


class ScriptedEngine:
    """Just enough of Engine for the host and the server. ``answers``: the texts the next
    requests write (one each, in order; "Hello." when none is left; ``(text, error)``:
    write ``text``, then fail with ``error``); ``prompts``: the token ids of every prompt
    submitted."""

    def __init__(self, folder: str) -> None:
        self.tokenizer = Tokenizer.from_pretrained(folder)
        self.model_info = fake_info("scripted", path=folder, vocab_size=self.tokenizer.vocab_size,
                                    weight_bytes=1000, kv_cache_bytes=100)
        self.max_model_len = 4096
        self.answers: list = []
        self.prompts: list[list[int]] = []
        self.params: list = []  # every request's SamplingParams
        self._aborted: set[str] = set()
        self._lock = threading.Lock()

    def submit(self, request, on_event=None):
        self.prompts.append(list(request.prompt_token_ids))
        self.params.append(request.params)
        answer = self.answers.pop(0) if self.answers else "Hello."
        thread = threading.Thread(target=self._write, args=(request, answer, on_event), daemon=True)
        thread.start()
        return _Handle(request.request_id)

    def _write(self, request, answer, on_event) -> None:
        answer, error = answer if isinstance(answer, tuple) else (answer, None)
        rid, ids = request.request_id, self.tokenizer.encode(answer, add_special_tokens=False)
        limit = request.params.max_tokens
        written = ""
        for k, token in enumerate(ids[:limit]):
            if rid in self._aborted:
                on_event(_finished(rid, "abort", len(self.prompts[-1]), k))
                return
            text = self.tokenizer.decode(ids[:k + 1])
            on_event(TokenEvent(rid, text[len(written):], (token,)))
            written = text
            time.sleep(0.001)
        reason = "error" if error else "length" if len(ids) > limit else "stop"
        fin = _finished(rid, reason, len(request.prompt_token_ids), min(len(ids), limit))
        on_event(FinishedEvent(fin.request_id, fin.reason, fin.usage, fin.timings, error=error) if error else fin)

    def prompt_text(self, k: int = -1) -> str:
        return self.tokenizer.decode(self.prompts[k], skip_special_tokens=False)

    def abort(self, rid: str) -> None:
        self._aborted.add(rid)

    def shutdown(self) -> None:
        pass

    def stats(self):
        return None


class _Handle:
    def __init__(self, rid: str) -> None:
        self.request_id = rid
        self.dropped_messages = 0


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory, tokenizer_files):
    """A folder with the fixture tokenizer and ``TOOL_TEMPLATE`` as its chat template."""
    folder = tmp_path_factory.mktemp("tool-tokenizer")
    for name, data in tokenizer_files.items():
        (folder / name).write_bytes(data)
    (folder / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def scripted(tool_model):
    """(the ScriptedEngine, an openai client of a live server over it)."""
    import openai

    from app.server import create_app
    from app.commands.serve import load_model
    from app.services.engine_host import EngineHost

    made = []
    _, check = fake_loads({})

    def factory(model, progress=None, should_stop=None, **options):
        made.append(ScriptedEngine(model))
        return made[-1]

    host = EngineHost(engine_factory=factory, model_check=check)
    load_model(host, {"model": str(tool_model), "device": "cpu"})
    try:
        with LiveServer(create_app(host, api_key=API_KEY)) as live:
            with openai.OpenAI(base_url=f"{live.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
                yield made[0], c
    finally:
        assert host.shutdown()
