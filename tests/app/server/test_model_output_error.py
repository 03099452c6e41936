"""A model whose output is not a number (NaN weights) gets OpenAI's 500 with the reason, for
an answer and for a prompt scored for echo (not a 503 "try again in a moment")."""

from __future__ import annotations

import shutil

import openai
import pytest
from safetensors.torch import load_file, save_file

from app.commands.serve import load_model
from app.server import create_app
from app.services.engine_host import EngineHost
from tests.app.server.conftest import API_KEY, LiveServer, tiny_options


@pytest.fixture(scope="module")
def nan_client(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nan-served") / "model"
    shutil.copytree(tiny_models["llama-tied"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"][1, 2] = float("nan")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    host = EngineHost()
    load_model(host, tiny_options(folder))
    try:
        with LiveServer(create_app(host, api_key=API_KEY)) as live, \
                openai.OpenAI(base_url=f"{live.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
            yield c, host.model_info.name
    finally:
        assert host.shutdown()


def test_an_answer_that_is_not_a_number_is_a_500_that_says_so(nan_client):
    client, model = nan_client
    with pytest.raises(openai.InternalServerError, match="not a number"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    with pytest.raises(openai.InternalServerError, match="not a number"):
        client.completions.create(model=model, prompt="Hello there", max_tokens=1, echo=True, logprobs=1)
