"""What ``hearth bench`` runs: one validated options dataclass (no torch import).

The engine's side is one ``EngineConfig`` (``BenchOptions.engine``), built from the load
options given (``load``: ``Engine.load``'s keywords, the same names and rules as
everywhere else) by ``engine.config.load_config``, and sized by ``for_device`` for the
suites chosen.

Sizes left as ``None`` get defaults that depend on the device (``for_device``): the
protocol sizes of BENCHMARKS.md on CUDA, small ones on CPU so the ``tiny`` shape finishes
in seconds; so do the engine's ``max_model_len``, ``max_num_seqs`` and
``max_num_batched_tokens`` where ``load`` leaves them out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.config import EngineConfig, config_from_options
from engine.errors import InvalidRequestError
from engine.sampling_params import MAX_SEED

SUITES = ("decode", "prefill", "throughput")
BASELINES = ("hf", "llamacpp")

# name: (CUDA default, CPU default). CUDA values are the protocol of BENCHMARKS.md.
_DEVICE_DEFAULTS = {
    "batch": ((1, 64), (1, 4)),
    "prompt_len": (128, 32),
    "output_len": (256, 16),
    "prefill_lens": ((128, 512, 2048, 8192), (32, 128)),
    "num_requests": (512, 12),
    "min_len": (128, 8),
    "max_len": (1024, 48),
    "hf_num_requests": (64, 6),
    "repeats": (3, 2),
}
# Engine sizes: at least these, more where the suites need it (CUDA, CPU).
# A throughput run keeps up to this many sequences in flight (CUDA, CPU): every request of
# the 512-request protocol at once on a GPU, as an offline batch job would. Measured on an
# H100 with the 8B shape: 9.0k output tok/s at 512 against 6.8k at 256, where late
# admissions leave a long tail of small batches.
_MIN_NUM_SEQS = (512, 64)
_MIN_BATCHED_TOKENS = (8192, 2048)  # token budget per step


@dataclass(slots=True)
class BenchOptions:
    """Options of one benchmark run; validated on construction (InvalidRequestError).

    Exactly one of ``shape`` (a name from ``engine.shapes``, random weights) or ``model``
    (anything ``Engine.load`` accepts) is given. ``baseline="hf"`` also runs transformers
    on the same weights and inputs. ``load``: the engine's load options (``Engine.load``'s
    keywords: device, dtype, attention, kv_cache_dtype, max_num_seqs, ...); ``engine`` is
    the one ``EngineConfig`` built from them (sized for the suites by ``for_device``).
    """

    suites: tuple[str, ...] = ("decode",)
    shape: str | None = None
    model: str | None = None
    revision: str | None = None
    baseline: str | None = None
    load: Mapping[str, Any] = field(default_factory=dict)
    batch: tuple[int, ...] | None = None  # decode batch sizes
    prompt_len: int | None = None  # decode prompt length
    output_len: int | None = None  # decode new tokens
    prefill_lens: tuple[int, ...] | None = None
    num_requests: int | None = None  # throughput
    min_len: int | None = None  # throughput prompt and output lengths: uniform in [min, max]
    max_len: int | None = None
    hf_num_requests: int | None = None  # throughput requests the baseline runs (a rate)
    repeats: int | None = None  # timed repeats after a warm-up; the median counts
    seed: int = 0
    engine: EngineConfig = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.suites, str):
            self.suites = tuple(self.suites.split(","))
        suites = []
        for s in self.suites:
            for name in (SUITES if s == "all" else [s]):
                if name not in SUITES:
                    raise InvalidRequestError(
                        f"unknown suite {name!r}; choose from {', '.join(SUITES)} (or all)."
                    )
                if name not in suites:
                    suites.append(name)
        if not suites:
            raise InvalidRequestError(f"no suite given; choose from {', '.join(SUITES)}.")
        self.suites = tuple(suites)
        if (self.shape is None) == (self.model is None):
            raise InvalidRequestError("give exactly one of --shape (random weights) or --model.")
        if self.shape is not None:
            from engine.shapes import shape_config

            shape_config(self.shape)  # raises with the list of known shapes
            if self.revision is not None:
                raise InvalidRequestError("--revision applies to Hub models, not to --shape; drop it.")
        self.load = dict(self.load)
        for name in ("model", "revision"):
            if name in self.load:
                raise InvalidRequestError(f"give the bench's {name} as BenchOptions.{name}, not in its load options.")
        # The one EngineConfig: every load option checked here, by the engine's own rules.
        self.engine = config_from_options(self.model_name, revision=self.revision, **self.load)
        if self.baseline not in (None, *BASELINES):
            raise InvalidRequestError(
                f"unknown baseline {self.baseline!r}; the supported baselines are: {', '.join(BASELINES)}."
            )
        for name in ("batch", "prefill_lens"):
            val = getattr(self, name)
            if val is not None:
                val = tuple(int(v) for v in val)
                if not val or min(val) < 1:
                    raise InvalidRequestError(f"--{name.replace('_', '-')} needs positive integers.")
                setattr(self, name, val)
        for name in ("prompt_len", "num_requests", "min_len", "max_len", "hf_num_requests"):
            val = getattr(self, name)
            if val is not None and val < 1:
                raise InvalidRequestError(f"--{name.replace('_', '-')} must be positive, got {val}.")
        if self.output_len is not None and self.output_len < 2:
            raise InvalidRequestError("--output-len must be at least 2 (decode speed is measured "
                                      "after the first token).")
        if self.repeats is not None and self.repeats < 1:
            raise InvalidRequestError(f"--repeats must be at least 1, got {self.repeats}.")
        if self.min_len is not None and self.max_len is not None and self.min_len > self.max_len:
            raise InvalidRequestError(f"--min-len ({self.min_len}) is above --max-len ({self.max_len}).")
        if not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequestError(f"--seed must be an integer from 0 to {MAX_SEED} (2**64 - 1), got {self.seed}.")

    @property
    def model_name(self) -> str:
        """What ``Engine.load`` gets: ``shape:<name>`` or the model as given."""
        return f"shape:{self.shape}" if self.shape is not None else self.model

    def for_device(self, on_cuda: bool) -> "BenchOptions":
        """A copy with every unset size filled in for the device (CUDA: the protocol), and
        ``engine`` sized to run them: a context that holds every request, enough sequences
        per step for the largest batch (and the throughput run), a token budget that takes
        the longest prefill as one chunk."""
        pick = 0 if on_cuda else 1
        fill = {k: v[pick] for k, v in _DEVICE_DEFAULTS.items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **fill)
        if out.min_len > out.max_len:
            raise InvalidRequestError(
                f"--min-len {out.min_len} is above --max-len {out.max_len}; give both."
            )
        sizes: dict[str, Any] = {}
        if out.load.get("max_num_seqs") is None:
            # Only throughput needs many sequences in flight; fewer means fewer CUDA graphs to capture.
            floor = min(_MIN_NUM_SEQS[pick], out.num_requests) if "throughput" in out.suites else 1
            sizes["max_num_seqs"] = max(floor, max(out.batch))
        if out.load.get("max_num_batched_tokens") is None:
            need = max(out.prefill_lens) if "prefill" in out.suites else 0
            sizes["max_num_batched_tokens"] = max(_MIN_BATCHED_TOKENS[pick], need)
        need = self.needed_context(out)
        given = out.load.get("max_model_len")
        if given is None:
            sizes["max_model_len"] = need
        elif given < need:
            raise InvalidRequestError(
                f"--max-model-len {given} is too short for the chosen suites, which "
                f"need {need} tokens; raise it or shorten the prompts / outputs."
            )
        out.load = {**out.load, **sizes}
        out.engine = config_from_options(out.model_name, revision=out.revision, **out.load)
        sched = out.engine.scheduler
        if "decode" in out.suites and max(out.batch) > sched.max_num_seqs:
            raise InvalidRequestError(
                f"decode batch {max(out.batch)} is above --max-num-seqs {sched.max_num_seqs}, so it "
                "would not run as one batch; raise --max-num-seqs."
            )
        if "prefill" in out.suites and max(out.prefill_lens) > sched.max_num_batched_tokens:
            raise InvalidRequestError(
                f"a {max(out.prefill_lens)}-token prefill would be split into chunks of "
                f"--max-num-batched-tokens {sched.max_num_batched_tokens}; raise that to at least "
                f"{max(out.prefill_lens)} so TTFT measures one forward."
            )
        return out

    @staticmethod
    def needed_context(o: "BenchOptions") -> int:
        """The shortest context (tokens) that holds every request of the chosen suites."""
        need = 16
        if "decode" in o.suites:
            need = max(need, o.prompt_len + o.output_len)
        if "prefill" in o.suites:
            need = max(need, max(o.prefill_lens) + 1)
        if "throughput" in o.suites:
            need = max(need, 2 * o.max_len)
        return need
