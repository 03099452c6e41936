"""``ModelInfo``: what ``Engine.model_info`` says about the loaded model and how it loaded.

A typed record with a JSON form (``to_dict`` / ``from_dict``) that keeps the keys of the
dict it replaced: ``hearth bench`` rows, ``hearth generate --json``, the desktop app and
the coming server all read the same fields. Optional fields (``None``) are left out of the
JSON form, as the dict left out keys a load never set.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The loaded model: which one, where, in what, and what the load set up.

    Every load sets the fields up to ``cuda_graphs``; the rest are set where they apply
    (``fallback_reason`` on the transformers fallback; the CUDA-graph and batch-1 matmul
    fields on a GPU; ``prompt_attention_lengths`` where the engine prepared prompt
    attention at load).
    """

    name: str  # what Hearth shows: a repo id, a .gguf file's name, a folder's name, "shape:<name>"
    ref: str  # what was asked for ("default", a repo id, a path): loading it again gives this model
    path: str | None  # the local folder loaded (None: a benchmark shape, no files; a calibrated shape: its checkpoint)
    source: str  # "default" | "hub" | "local" | "gguf" | "shape"
    model_type: str | None  # config.json's model_type
    vocab_size: int
    device: str  # "cpu", "cuda:0"
    dtype: str  # the weights dtype: "float32", "bfloat16", "float16"
    attention: str  # the backend that runs ("torch", "triton", "flash-attn"; "transformers" on the fallback)
    max_model_len: int  # the context in tokens
    implementation: str  # "native" | "transformers-fallback"
    kv_cache_dtype: str  # "float32", "bfloat16", "float16", "float8_e4m3fn"
    weight_bytes: int
    kv_cache_bytes: int
    num_kv_blocks: int
    cuda_graphs: bool  # decode steps replay CUDA graphs
    quantization: str = "none"  # the weights' quantization (a name of the choices registry)
    # What the quantization holds, in words: "int4 g32: 210 layers (GGUF Q4_1, kept); int8
    # g32: embedding/head (Q8_0, kept)"; GGUF types Hearth has no kernel for say "dequantized".
    quant_detail: str | None = None
    fallback_reason: str | None = None  # why the model runs on the transformers fallback
    batch1_matmul: dict[str, str] | None = None  # projection kind -> "cublas" | "triton gemv ..."
    batch1_tune_s: float | None = None  # seconds the load spent choosing them (their compiles included)
    cuda_graph_bytes: int | None = None  # the graphs' private memory pool
    prompt_graph_tokens: int | None = None  # one prompt (chunk) up to this many tokens replays a graph
    prompt_graph_ms: dict[int, list[float]] | None = None  # bucket -> [replay ms, eager ms] at load
    cuda_graph_routes: dict[int, int] | None = None  # batch bucket -> the larger graph that runs it
    cuda_graphs_off: str | None = None  # why decode runs without CUDA graphs
    prompt_attention_lengths: int | None = None  # prompt lengths whose attention work was prepared
    pdl: bool | None = None  # GPU loads: the decode step's Triton kernels launch with PDL (hearth_kernels/pdl.py)
    cpu_decode: bool | str | None = None  # CPU loads: True if batch-1 decode runs in one C call, else why not
    cpu_head: bool | str | None = None  # CPU loads: True if a float32 LM head runs the C kernel (a row's logits
    # the same bits whatever shares the step, up to 64 sampled rows: with quantized projections, which are so already, a request's
    # answer; a float32 model's projections are torch's sgemm, whose bits still depend on the rows), else why not
    # A layer split (--devices a,b --split layer): {"devices": [...], "layers": [[start, stop], ...],
    # "attention": [...], "embedding": device, "head": device}; ``device`` is then the first one.
    layer_split: dict[str, Any] | None = None
    # Tensor parallel (--split tensor): world (ranks), devices (one per rank), backend (gloo, nccl; None at world 1).
    tensor_parallel: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every field, less optional ones that are ``None``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _OPTIONAL:
                continue
            out[f.name] = dict(value) if isinstance(value, dict) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelInfo":
        """Read the JSON form (or the loader's dict). Keys it doesn't know are ignored (a
        newer Hearth's); JSON's string keys of the per-bucket maps become ints again.

        Raises:
            ValueError: a field every load sets is missing.
        """
        known = {f.name for f in fields(cls)}
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise ValueError(f"model info lacks {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in known}
        for name in ("prompt_graph_ms", "cuda_graph_routes"):
            if values.get(name) is not None:
                values[name] = {int(k): (list(v) if isinstance(v, (list, tuple)) else int(v))
                                for k, v in values[name].items()}
        return cls(**values)


_REQUIRED = tuple(f.name for f in fields(ModelInfo) if f.default is MISSING)
_OPTIONAL = frozenset(f.name for f in fields(ModelInfo) if f.default is None)
