"""The llama.cpp baseline (``--baseline llamacpp``): the same GGUF file through
llama-cpp-python, the same token ids, the same process, the same threads.

llama-cpp-python is an optional extra (``pip install llama-cpp-python``); without it the
baseline is refused with that instruction. It runs batch-1 only (one sequence: llama.cpp's
server batches, its Python ``Llama`` does not):

- decode: ``eval`` the prompt (time to first token: the prompt's eval and the first greedy
  pick), then ``decode`` more tokens one at a time; tok/s = (new - 1) / (time after the first).
- prefill: ``eval`` of the prompt, logits of its last position only; median of repeats.

Greedy picks are ``argmax`` of llama.cpp's logits; EOS is ignored, as for Hearth.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

from engine.errors import InvalidRequestError


def _llama_module():
    import os

    import engine

    # llama.cpp's OpenMP runtime (its own libgomp, read when the library loads) runs with the
    # policy the user had, not the passive one Hearth sets for torch's (engine/__init__.py):
    # the baseline runs as it would on its own.
    ours = os.environ.get("OMP_WAIT_POLICY")
    if engine.USER_OMP_WAIT_POLICY is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = engine.USER_OMP_WAIT_POLICY
    try:
        import llama_cpp
    except ImportError:
        raise InvalidRequestError(
            "the llamacpp baseline needs llama-cpp-python: pip install llama-cpp-python "
            "(it builds llama.cpp; a few minutes).", options=("baseline",)) from None
    finally:
        if ours is not None:
            os.environ["OMP_WAIT_POLICY"] = ours
    return llama_cpp


def _threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


class LlamaCppBaseline:
    """One ``llama_cpp.Llama`` over ``gguf`` with a ``n_ctx`` context, CPU threads as torch's."""

    def __init__(self, gguf: Path, n_ctx: int, n_threads: int | None = None) -> None:
        llama_cpp = _llama_module()
        self.path = Path(gguf)
        self.threads = n_threads or _threads()
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=self.threads,
                                   n_threads_batch=self.threads, n_batch=min(n_ctx, 2048), logits_all=False,
                                   verbose=False, n_gpu_layers=0)
        self.vocab_size = self.llm.n_vocab()
        self.version = getattr(llama_cpp, "__version__", "?")

    def weight_bytes(self) -> int:
        return self.path.stat().st_size

    def _eval(self, ids: list[int]) -> int:
        """Evaluate ``ids`` after a reset; the greedy next token."""
        self.llm.reset()
        self.llm.eval(ids)
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def decode(self, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        """(decode tok/s after the first token, time to first token ms, the greedy tokens)."""
        t0 = time.perf_counter()
        out = [self._eval(prompt)]
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            self.llm.eval([out[-1]])
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
        t2 = time.perf_counter()
        return (new_tokens - 1) / (t2 - t1), 1e3 * (t1 - t0), out

    def prefill_ms(self, prompt: list[int]) -> float:
        t0 = time.perf_counter()
        self._eval(prompt)
        return 1e3 * (time.perf_counter() - t0)

    def close(self) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None
        self.llm = None


def gguf_file(model: str | None) -> Path:
    """The GGUF file a ``--model`` names (``None``/``default``: the bundled one); refused
    for anything else, since llama.cpp reads GGUF files only."""
    from engine.loader.resolve import default_gguf_path, is_gguf_file

    if model is None or model.strip() == "default":
        return default_gguf_path()
    path = Path(model).expanduser()
    if path.is_file() and is_gguf_file(path):
        return path.resolve()
    raise InvalidRequestError(
        f"--baseline llamacpp needs a GGUF file as --model (or the default model); {model!r} is not one.",
        options=("baseline",))


def run_llamacpp(opts, workload, say) -> dict:
    """The decode (batch 1) and prefill suites through llama.cpp, as ``_run_hf`` does them."""
    res: dict = {"decode": {}, "prefill": {}, "throughput": None, "threads": 0}
    if opts.shape is not None:
        raise InvalidRequestError("--baseline llamacpp runs a GGUF file: give --model, not --shape.",
                                  options=("baseline",))
    if "decode" in opts.suites and any(b != 1 for b in opts.batch):
        raise InvalidRequestError("--baseline llamacpp decodes one sequence: use --batch 1.", options=("baseline",))
    n_ctx = opts.engine.model.max_model_len or 4096
    base = LlamaCppBaseline(gguf_file(opts.model), n_ctx, int(os.environ.get("HEARTH_LLAMACPP_THREADS", 0)) or None)
    try:
        res["threads"], res["version"], res["weight_bytes"] = base.threads, base.version, base.weight_bytes()
        if "decode" in opts.suites:
            rates, ttfts, tokens = [], [], {}
            for r in range(opts.repeats + 1):
                prompt = workload.decode_prompts(1, opts.prompt_len, r)[0]
                rate, ttft, out = base.decode(prompt, opts.output_len)
                tokens[(r, 0)] = out
                if r:
                    rates.append(rate)
                    ttfts.append(ttft)
            res["decode"][1] = (statistics.median(rates), statistics.median(ttfts), tokens)
            say(f"llama.cpp decode batch 1: {res['decode'][1][0]:.1f} tok/s ({base.threads} threads)")
        if "prefill" in opts.suites:
            for n in opts.prefill_lens:
                ms = [base.prefill_ms(workload.prefill_prompt(n, r)) for r in range(opts.repeats + 1)]
                res["prefill"][n] = statistics.median(ms[1:])
                say(f"llama.cpp prefill {n} tokens: {res['prefill'][n]:.1f} ms")
    finally:
        base.close()
    return res
