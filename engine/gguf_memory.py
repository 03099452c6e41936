"""What a GGUF file takes in memory once Hearth loads it, before it is downloaded.

Torch-free (but ``kept_on("cpu")``, which asks the engine's own rule: the loader and the C
kernel's check, a build the first time; the app asks it off the GUI thread), for the fit
estimate (``app/services/fit.py``, through ``engine.api``). A load
with quantization ``gguf``, or ``auto`` where a fast kernel runs them (``kept_on``), keeps
the file's Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K tensors quantized, each as int8 or int4
codes with a float16 scale (and min) per group (``engine/quant/gguf_blocks.py``,
``engine/quant/gguf_kquants.py``): the same bits for Q8_0 and Q4_1, more for the others
(Q4_K's 6-bit sub-block scales become float16 pairs, Q5_K's and Q6_K's codes a byte each).
Every other type is dequantized into the load's float dtype. So the file's size is not what
loads: llama.cpp's Q4_K_M mix of Llama-3.1-8B is a 4.92 GB file and 6.00 GB in memory.

The Hub doesn't say which tensor types a GGUF file holds, only its size and, by the
convention every GGUF publisher follows, its llama.cpp file type in the name
(``...-Q4_K_M.gguf``). ``memory_ratio`` turns that label into bytes in memory per byte of
file, from the share of the file each tensor type holds in that mix; a type Hearth doesn't
keep, or no label, is sized as floats by the caller.
"""

from __future__ import annotations

import re

#: bits per weight in the file (ggml's block: bytes x 8 / weights)
FILE_BITS = {"Q8_0": 34 * 8 / 32, "Q4_0": 18 * 8 / 32, "Q4_1": 20 * 8 / 32,
             "Q4_K": 144 * 8 / 256, "Q5_K": 176 * 8 / 256, "Q6_K": 210 * 8 / 256}
#: bits per weight as Hearth keeps each type: the codes, and a float16 scale (and a float16
#: min: Q4_0's is -8 x scale) per group of 32 (Q6_K: 16)
KEPT_BITS = {"Q8_0": 8 + 16 / 32, "Q4_0": 4 + 32 / 32, "Q4_1": 4 + 32 / 32,
             "Q4_K": 4 + 32 / 32, "Q5_K": 8 + 32 / 32, "Q6_K": 8 + 16 / 16}
#: a q/k/v group whose members are kept in different forms runs as one matmul in one form
#: that holds each (``engine.loader.gguf.kept_quantized``): int8 codes with float16 scales
#: and mins, in groups of 16 beside a Q6_K v, of 32 beside a Q5_K one
_SHARED_G16_BITS = 8 + 32 / 16
_SHARED_G32_BITS = 8 + 32 / 32

#: llama.cpp's mixes, by file-type label: the share of the file's bytes in each part, from
#: its quantization rules applied to Llama-3.1-8B (the sums match its published file sizes:
#: Q4_0 4.65, Q4_K_S 4.68, Q4_K_M 4.91, Q5_K_M 5.72, Q6_K 6.6 GB...). Below 8 bits the output
#: head is Q6_K; the ``_M`` mixes give half the layers' v and down Q6_K, so those layers' q, k
#: and v share v's groups of 16 (Q4_K_S: the first eighth's v and down are Q5_K, groups of 32);
#: the ``_L`` files (bartowski's) are the ``_M`` mix with a Q8_0 embedding and head. A part is
#: a tensor type, or (type, bits in memory) where it is held in a shared form. Other models'
#: shares differ by a few percent.
MIXES: dict[str, dict] = {
    "Q8_0": {"Q8_0": 1.0},
    "Q6_K": {"Q6_K": 1.0},
    "Q6_K_L": {"Q6_K": 0.8368, "Q8_0": 0.1632},
    "Q4_0": {"Q4_0": 0.9074, "Q6_K": 0.0926},
    "Q4_1": {"Q4_1": 0.9159, "Q6_K": 0.0841},
    "Q4_K_S": {"Q4_K": 0.8609, "Q6_K": 0.0920, "Q5_K": 0.0345, ("Q4_K", _SHARED_G32_BITS): 0.0101,
               ("Q5_K", _SHARED_G32_BITS): 0.0025},
    "Q4_K_M": {"Q4_K": 0.7058, "Q6_K": 0.2446, ("Q4_K", _SHARED_G16_BITS): 0.0384, ("Q6_K", _SHARED_G16_BITS): 0.0112},
    "Q4_K_L": {"Q4_K": 0.5981, "Q8_0": 0.2105, "Q6_K": 0.1454, ("Q4_K", _SHARED_G16_BITS): 0.0356,
               ("Q6_K", _SHARED_G16_BITS): 0.0104},
    "Q5_K_S": {"Q5_K": 0.9229, "Q6_K": 0.0771},
    "Q5_K_M": {"Q5_K": 0.7402, "Q6_K": 0.2099, ("Q5_K", _SHARED_G16_BITS): 0.0403, ("Q6_K", _SHARED_G16_BITS): 0.0096},
    "Q5_K_L": {"Q5_K": 0.6409, "Q8_0": 0.1845, "Q6_K": 0.1274, ("Q5_K", _SHARED_G16_BITS): 0.0381,
               ("Q6_K", _SHARED_G16_BITS): 0.0091},
}
#: other names of those files: llama.cpp's short type names for its ``_M`` mixes
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
#: llama.cpp file types Hearth dequantizes at load (named in notes as they are)
DEQUANTIZED = ("Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q5_0", "Q5_1", "IQ1_S", "IQ1_M", "IQ2_XXS",
               "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0",
               "TQ2_0", "F16", "BF16", "F32")
_KNOWN = set(MIXES) | set(ALIASES) | set(DEQUANTIZED)
_SPELLINGS = {"FP16": "F16", "FP32": "F32"}
_SIZES = ("S", "M", "L", "XL", "XS", "XXS", "NL")

#: a llama.cpp file-type label in a file name: Q4_K_M, Q8_0, IQ4_XS, F16, BF16, TQ1_0, ...
_LABEL = re.compile(r"(?:^|[-_.])((?:I?Q\d(?:_[A-Z0-9]+)*)|(?:TQ\d_\d)|BF16|FP?16|FP?32)(?=[-_.]|$)", re.IGNORECASE)
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def split_part(file_name: str) -> tuple[int, int] | None:
    """(part, parts) of a split GGUF file's name (``...-00001-of-00003.gguf``), else None."""
    m = _SPLIT.search(file_name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def file_label(file_name: str) -> str | None:
    """The llama.cpp file type a GGUF file's name gives (``"Q4_K_M"``), upper case; None
    when the name has none. The last match wins (``model-q4_0-Q5_K_M.gguf`` -> Q5_K_M)."""
    stem = _SPLIT.sub(".gguf", file_name.rsplit("/", 1)[-1])  # a split file's part number aside
    stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    found = _LABEL.findall(stem)
    if not found:
        return None
    label = _SPELLINGS.get(found[-1].upper(), found[-1].upper())
    trimmed = label
    while trimmed not in _KNOWN and "_" in trimmed:  # a word after the type: Q4_K_M_IMATRIX
        trimmed, word = trimmed.rsplit("_", 1)
        if word in _SIZES:  # a mix llama.cpp doesn't make (unsloth's Q4_K_XL): unknown, not Q4_K
            return label
    return trimmed if trimmed in _KNOWN else label


def memory_ratio(label: str | None) -> float | None:
    """Bytes in memory per byte of a GGUF file of llama.cpp type ``label``, loaded with its
    own quantized weights kept; None for a type Hearth dequantizes (IQ*, Q2_K, Q3_K, Q5_0,
    ...) or an unknown label: size those as floats."""
    mix = MIXES.get(ALIASES.get(label or "", label or ""))
    if mix is None:
        return None
    total = 0.0
    for part, share in mix.items():
        kind, bits = part if isinstance(part, tuple) else (part, KEPT_BITS[part])
        total += share * bits / FILE_BITS[kind]
    return total


def kept_on(device_type: str, capability: tuple[int, int] | None = None) -> bool:
    """Whether ``auto`` keeps a GGUF file's quantized weights on a ``"cuda"`` device of
    compute ``capability`` (None: unknown, taken as able) or the ``"cpu"``: the rule of
    ``engine.loader.engine_loader.auto_keeps_gguf`` for a device that isn't this process's
    (the CPU: the C kernel builds and runs AVX2 here)."""
    from engine.choices import QUANT_MIN_CAPABILITY

    if device_type == "cuda":
        return capability is None or tuple(capability) >= QUANT_MIN_CAPABILITY
    from engine.loader.engine_loader import auto_keeps_gguf

    return auto_keeps_gguf("cpu")
