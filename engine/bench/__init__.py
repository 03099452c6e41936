"""``hearth bench``: decode, prefill and throughput suites, with a transformers baseline.

This package is the bench's public face (``BenchOptions``, ``run_bench``): ``hearth bench``
(app/commands/bench.py) reaches it here, not through ``engine.api``. It is a client of
``engine.api``: it loads and drives the public ``Engine`` and watches its steps through
``Engine.add_step_listener``; for the transformers baseline it also uses the engine's
device, shape and model-resolution helpers. ``engine.api`` never imports it (no import
cycle), and importing it loads no torch (``hearth``'s parser imports it).

``run_bench(options)`` returns flat rows in the BENCHMARKS.md shape. With
``baseline="hf"`` transformers runs first on the same inputs (and, for random-weight
shapes, builds the weights Hearth then loads), is freed, and Hearth runs after it, so
the two never hold GPU memory at the same time while Hearth sizes its KV pool.

Method (BENCHMARKS.md): warm up first, synchronise the device before host clocks (the
engine hands back sampled ids as host integers, so its steps are synchronised), take
the median of ``repeats``. Per suite:

- decode: ``batch`` prompts of ``prompt_len`` random ids, ``output_len`` greedy tokens,
  EOS ignored. Batch 1: the request's own decode rate (tokens after the first / time
  since the first). Batch N: aggregate tokens/s from the step in which the last request
  got its first token to the end (``StepProbe.aggregate_decode_tok_s``, from the engine's
  per-step ``StepInfo``). ``match_tokens``: the fewest leading greedy tokens Hearth and
  transformers agree on over all prompts.
- prefill: TTFT of one prompt with max_tokens=1, run as one chunk.
- throughput: ``num_requests`` requests with prompt and output lengths uniform in
  [min_len, max_len], all submitted at once; output tokens / wall time, run once after a
  short warm-up (hundreds of requests are their own average). ``kv_waste_pct``: mean over
  engine steps of (allocated - used) / allocated KV slots.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from typing import TYPE_CHECKING, Callable

from engine.bench.options import SUITES, BenchOptions
# The serve suite's engine side (hearth bench --suite serve drives the HTTP side from app/).
from engine.bench.serving import RequestTiming, latency_summary, run_offline_serving, serve_prompts

if TYPE_CHECKING:  # torch and numpy load when a run starts, not when `hearth` parses its command
    from engine.api import ModelInfo
    from engine.bench.rows import RowMaker
    from engine.bench.workload import Workload

__all__ = ["BenchOptions", "run_bench", "SUITES", "RequestTiming", "latency_summary", "run_offline_serving",
           "serve_prompts"]

log = logging.getLogger("hearth.bench")


def run_bench(options: BenchOptions, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Run the chosen suites (and the baseline); return the rows, baseline beside Hearth."""
    from engine.api import Engine
    from engine.bench.rows import RowMaker, quant_name
    from engine.bench.workload import Workload
    from engine.device import resolve_device, resolve_dtype

    say = progress or log.info
    model_cfg = options.engine.model  # validated with the rest of the load options
    device = resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype, device)
    opts = options.for_device(device.type == "cuda")
    _check_context(opts)

    hf_res, weights, workload, hf_bytes = None, None, None, None
    if opts.baseline == "llamacpp":
        from engine.bench.llamacpp_baseline import run_llamacpp

        say("llama.cpp baseline: the same GGUF file through llama-cpp-python")
        workload = Workload(_gguf_vocab(opts), opts.seed)
        hf_res = run_llamacpp(opts, workload, say)
        hf_bytes = hf_res["weight_bytes"]
    elif opts.baseline == "hf":
        hf = _load_hf(opts, device, dtype, say)
        try:
            workload = Workload(hf.vocab_size, opts.seed)
            hf_res = _run_hf(hf, workload, opts, say)
            hf_bytes = hf.weight_bytes()
            if opts.shape is not None:
                weights = hf.cpu_state_dict()  # Hearth loads exactly these
        finally:
            hf.close()

    say(f"loading {opts.model_name} into Hearth")
    # The one EngineConfig, on the device the baseline ran on ("auto" resolved once).
    config = dataclasses.replace(opts.engine, model=dataclasses.replace(opts.engine.model, device=str(device)))
    engine = Engine.from_config(config, progress=say)
    try:
        if weights is not None:
            engine.runner.model.load_weights(weights.items(), source="the transformers baseline's weights")
            del weights
        workload = workload or Workload(engine.model_info.vocab_size, opts.seed)
        hearth_res = _run_hearth(engine, workload, opts, say)
        info = engine.model_info
    finally:
        engine.shutdown()
    # model_info.name: "shape:<name>", the Hub repo id, or a local folder's / GGUF file's name.
    maker = RowMaker(info.name, device, dtype, info.attention, info.quantization)
    # the baseline's own weights: llama.cpp runs the GGUF file's, transformers the load dtype's
    own = "gguf" if opts.baseline == "llamacpp" else quant_name(dtype)
    return _rows(maker, opts, info, hearth_res, hf_res, hf_bytes, baseline=opts.baseline or "hf", baseline_quant=own)


def split_columns(info) -> dict:
    """``split`` (none, layer, tensor) and ``num_devices`` of a load's ``ModelInfo``."""
    if info.tensor_parallel:
        return {"split": "tensor", "num_devices": info.tensor_parallel["world"]}
    if info.layer_split:
        return {"split": "layer", "num_devices": len(info.layer_split["devices"])}
    return {"split": "none", "num_devices": 1}


def _gguf_vocab(opts: BenchOptions) -> int:
    """The vocabulary of the GGUF file the llama.cpp baseline reads (its token ids)."""
    from gguf import GGUFReader

    from engine.bench.llamacpp_baseline import gguf_file

    return len(GGUFReader(str(gguf_file(opts.model))).fields["tokenizer.ggml.tokens"].data)


def _check_context(opts: BenchOptions) -> None:
    if opts.shape is None:
        return  # Engine.load checks a real model's context itself
    from engine.shapes import shape_config

    max_pos = int(shape_config(opts.shape)["max_position_embeddings"])
    if opts.engine.model.max_model_len > max_pos:
        from engine.api import InvalidRequestError

        raise InvalidRequestError(
            f"shape {opts.shape!r} has a {max_pos}-token context but the chosen suites need "
            f"{opts.engine.model.max_model_len}: use shorter --prompt-len/--output-len, --prefill-lens or --max-len."
        )


def _load_hf(opts: BenchOptions, device, dtype, say):
    from engine.bench.hf_baseline import HFBaseline

    if opts.shape is not None:
        from engine.shapes import shape_config

        say(f"transformers baseline: building shape {opts.shape} (random weights, seed {opts.seed})")
        return HFBaseline.from_shape(shape_config(opts.shape), device, dtype, opts.seed)
    from engine.loader.resolve import resolve_model

    resolved = resolve_model(opts.model, opts.revision, progress=say)
    say(f"transformers baseline: loading {resolved.name}")
    return HFBaseline.from_folder(resolved.path, device, dtype)


def _run_hf(hf, workload: Workload, opts: BenchOptions, say) -> dict:
    res: dict = {"decode": {}, "prefill": {}, "throughput": None}
    if "decode" in opts.suites:
        for b in opts.batch:
            rates, ttfts, tokens = [], [], {}
            for r in range(opts.repeats + 1):  # repeat 0 warms up
                rate, ttft, out = hf.decode(workload.decode_prompts(b, opts.prompt_len, r), opts.output_len)
                tokens.update({(r, i): ids for i, ids in enumerate(out)})
                if r:
                    rates.append(rate)
                    ttfts.append(ttft)
            res["decode"][b] = (statistics.median(rates), statistics.median(ttfts), tokens)
            say(f"hf decode batch {b}: {res['decode'][b][0]:.1f} tok/s")
    if "prefill" in opts.suites:
        for n in opts.prefill_lens:
            ms = [hf.prefill_ms(workload.prefill_prompt(n, r)) for r in range(opts.repeats + 1)]
            res["prefill"][n] = statistics.median(ms[1:])
            say(f"hf prefill {n} tokens: {res['prefill'][n]:.1f} ms")
    if "throughput" in opts.suites:
        reqs = workload.throughput_requests(opts.num_requests, opts.min_len, opts.max_len)
        reqs = reqs[:opts.hf_num_requests]
        res["throughput"] = hf.throughput(reqs)
        res["throughput_lens"] = _mean_lens(reqs)
        say(f"hf throughput ({len(reqs)} requests): {res['throughput'][0]:.1f} tok/s")
    return res


def _run_hearth(engine, workload: Workload, opts: BenchOptions, say) -> dict:
    from engine.bench import hearth_suites as hs

    res: dict = {"decode": {}, "prefill": {}, "throughput": None}
    if "decode" in opts.suites:
        for b in opts.batch:
            res["decode"][b] = hs.decode(engine, workload, b, opts.prompt_len, opts.output_len, opts.repeats)
            say(f"hearth decode batch {b}: {res['decode'][b].decode_tok_s:.1f} tok/s")
    if "prefill" in opts.suites:
        for n in opts.prefill_lens:
            res["prefill"][n] = hs.prefill(engine, workload, n, opts.repeats)
            say(f"hearth prefill {n} tokens: {res['prefill'][n]:.1f} ms")
    if "throughput" in opts.suites:
        reqs = workload.throughput_requests(opts.num_requests, opts.min_len, opts.max_len)
        warm = workload.throughput_requests(min(8, opts.num_requests), opts.min_len, opts.max_len,
                                            stream=1)
        res["throughput"] = hs.throughput(engine, reqs, warm)
        res["throughput_lens"] = _mean_lens(reqs)
        say(f"hearth throughput ({len(reqs)} requests): {res['throughput'].output_tok_s:.1f} tok/s")
    return res


def _mean_lens(reqs) -> tuple[int, int]:
    """Mean prompt and output length of throughput requests (the rows' prompt/output_len)."""
    return (round(statistics.fmean(len(q.prompt) for q in reqs)),
            round(statistics.fmean(q.output_len for q in reqs)))


def _rows(maker: RowMaker, opts: BenchOptions, info: ModelInfo, hearth: dict, hf: dict | None,
          hf_bytes: int | None, baseline: str = "hf", baseline_quant: str | None = None) -> list[dict]:
    """The rows, Hearth's and the baseline's; ``baseline_quant``: the number format of the
    baseline's weights (its rows' ``quant``; Hearth's is the maker's)."""
    from engine.bench.rows import leading_match

    rows = []
    wb = info.weight_bytes
    # How many devices ran the model, and how (issue 19's columns): none, layer or tensor.
    where = split_columns(info)
    impl = info.implementation
    kvd = info.kv_cache_dtype
    for b, h in hearth["decode"].items():
        extra = {}
        if hf is not None:
            hf_tokens = hf["decode"][b][2]
            extra["match_tokens"] = min(leading_match(ids, hf_tokens[k]) for k, ids in h.tokens.items())
        # What ran, where it decides the speed: the quantization's layers (a GGUF's kept and
        # dequantized types), the batch-1 matmul kernels, why graphs are off (None: left out).
        rows.append(maker.row("decode", "hearth", b, opts.prompt_len, opts.output_len,
                              decode_tok_s=h.decode_tok_s, ttft_ms=h.ttft_ms, weight_bytes=wb,
                              **extra, implementation=impl, kv_cache_dtype=kvd, cuda_graphs=info.cuda_graphs,
                              cuda_graphs_off=info.cuda_graphs_off, quant_detail=info.quant_detail,
                              batch1_matmul=info.batch1_matmul if b == 1 else None,
                              batch1_tune_s=info.batch1_tune_s if b == 1 else None,
                              pdl=info.pdl,
                              layer_split=info.layer_split, **where))
        if hf is not None:
            rate, ttft, _ = hf["decode"][b]
            rows.append(maker.row("decode", baseline, b, opts.prompt_len, opts.output_len, decode_tok_s=rate,
                                  ttft_ms=ttft, weight_bytes=hf_bytes, quant=baseline_quant, **extra, **_threads(hf)))
    for n, ms in hearth["prefill"].items():
        rows.append(maker.row("prefill", "hearth", 1, n, 1, ttft_ms=ms, weight_bytes=wb, implementation=impl,
                              kv_cache_dtype=kvd, **where))
        if hf is not None:
            rows.append(maker.row("prefill", baseline, 1, n, 1, ttft_ms=hf["prefill"][n], weight_bytes=hf_bytes,
                                  quant=baseline_quant, **_threads(hf)))
    if hearth["throughput"] is not None:
        t = hearth["throughput"]
        hf = hf if hf is not None and hf["throughput"] is not None else None
        rows.append(maker.row("throughput", "hearth", opts.engine.scheduler.max_num_seqs, *hearth["throughput_lens"],
                              output_tok_s=t.output_tok_s, kv_waste_pct=t.kv_waste_pct,
                              weight_bytes=wb, num_requests=opts.num_requests, min_len=opts.min_len,
                              max_len=opts.max_len, num_preemptions=t.num_preemptions,
                              implementation=impl, kv_cache_dtype=kvd, layer_split=info.layer_split, **where))
        if hf is not None:
            from engine.bench.hf_baseline import STATIC_BATCH

            rate, waste = hf["throughput"]
            n = min(opts.num_requests, opts.hf_num_requests)
            rows.append(maker.row("throughput", "hf", min(n, STATIC_BATCH), *hf["throughput_lens"],
                                  output_tok_s=rate, kv_waste_pct=waste, weight_bytes=hf_bytes, quant=baseline_quant,
                                  num_requests=n, min_len=opts.min_len, max_len=opts.max_len))
    return rows


def _threads(baseline: dict) -> dict:
    """The llama.cpp rows' thread count and version (what its speed depends on)."""
    if not baseline.get("threads"):
        return {}
    return {"threads": baseline["threads"], "llama_cpp_python": baseline.get("version")}
