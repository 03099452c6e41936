"""``hearth quantize``: a model quantized by Hearth, written in a published layout that
vLLM and transformers load too (compressed-tensors pack-quantized by default, GPTQ or AWQ;
fp8 as compressed-tensors float-quantized, llm-compressor's FP8_DYNAMIC scheme),
so the next load reads the quantized weights instead of quantizing again.

The model is loaded on ``device`` with the chosen quantization exactly as a chat load does
(each layer quantized as its float tensor streams in), then every quantized projection is
split back into its checkpoint modules (q/k/v, gate/up) and written through
``engine.quant.formats``; every other tensor (norms, embedding, a float head) is copied from
the source checkpoint unchanged. The folder is written beside its target and renamed into
place, so a cancelled or failed run leaves nothing half-written.

A random-weight shape (``shape:llama-8b``) has no checkpoint and no tokenizer: its other
tensors come from the loaded model itself, its config.json is the shape's (naming it, so
the folder loads as a shape again), and calibration reads the text's UTF-8 bytes as token
ids. Such a checkpoint is for speed runs only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InvalidRequestError, ModelLoadError

LAYOUTS = ("compressed-tensors", "gptq", "awq")
_TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "*.model", "vocab*", "merges.txt",
                    "chat_template*", "generation_config.json")


@dataclass(frozen=True, slots=True)
class QuantizeResult:
    out_dir: Path
    layout: str
    quantization: str
    layers: int  # quantized checkpoint modules written
    weight_bytes: int  # bytes of the written safetensors file


def _split(module, name: str) -> list[tuple[str, object]]:
    """(checkpoint module name, its rows of ``module``'s QuantizedWeight) for each shard."""
    return _split_weight(module, name, module.quantized_weight())


def _refuse_existing(out_dir: str | Path) -> None:
    """Refuse an ``out_dir`` that exists or can't be written, before any work is done (a
    quantization found that out only at its end)."""
    import os
    import tempfile

    if not str(out_dir).strip():  # (Path("") is the current folder, which exists: said as " exists")
        raise InvalidRequestError("--out is empty: give the new folder to write, e.g. --out ./my-model-int4.",
                                  options=("out",))
    out = Path(out_dir).expanduser()
    if os.path.lexists(out):  # (a dangling link too)
        raise InvalidRequestError(f"{out_dir} exists: pick a new folder (--out), or delete it first.",
                                  options=("out",))
    base = out.absolute().parent
    try:  # a probe where it will write: permissions, a read-only or pseudo file system
        while not os.path.lexists(base) and base != base.parent:  # (a dangling link is tried: mkdir fails there)
            base = base.parent  # (the folders missing are made when it writes)
        Path(tempfile.mkdtemp(prefix=".hearth-probe-", dir=base)).rmdir()
    except OSError as e:
        raise InvalidRequestError(f"cannot write {out_dir}: {e.strerror or e} in {base}. Pick a folder you can "
                                  "write (--out).", options=("out",)) from None


def quantize_model(model: str, out_dir: str | Path, *, quantization: str = "int4", layout: str | None = None,
                   group_size: int | None = None, device: str = "cpu", calibrate: str | None = None,
                   progress: Callable[[str], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> QuantizeResult:
    """Quantize ``model`` (a folder, Hub id or the default) and write it to ``out_dir``.
    ``calibrate="gptq"`` (fp8 only) rounds the fp8 weights by GPTQ on the bundled
    calibration text instead of to the nearest value (int4 names its calibrated methods:
    ``quantization="gptq"`` or ``"awq"``)."""
    from engine.config import load_config
    from engine.layers.quant_linear import QuantizedLinear, QuantizedTiedHead
    from engine.loader.engine_loader import load_model
    from engine.runner.lifecycle import release_runner

    say = progress or (lambda _msg: None)
    _refuse_existing(out_dir)
    from engine import choices

    with contextlib.suppress(InvalidRequestError):  # (an unknown name is refused below, with what this writes)
        quantization = choices.canonical("quantization", quantization)  # e4m3 is fp8 here too, as elsewhere
    if quantization == "fp8-gptq":  # the registry's name for fp8 --calibrate gptq
        quantization, calibrate = "fp8", calibrate or "gptq"
    if layout is None:  # the method's own layout (AWQ, GPTQ), else what llm-compressor writes
        layout = quantization if quantization in ("awq", "gptq") else "compressed-tensors"
    if layout not in LAYOUTS:
        raise InvalidRequestError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}.",
                                  options=("layout",))
    if quantization not in ("int4", "int8", "awq", "gptq", "fp8"):
        raise InvalidRequestError(f"hearth quantize writes int4, int8 (round-to-nearest), awq, gptq, fp8 or "
                                  f"fp8-gptq, not {quantization!r}.", options=("quantization",))
    if quantization == "fp8" and layout != "compressed-tensors":
        raise InvalidRequestError("fp8 checkpoints are written as compressed-tensors (float-quantized): drop "
                                  "--format, or pick that one.", options=("layout",))
    if calibrate is not None:
        if calibrate != "gptq":
            raise InvalidRequestError(f"unknown calibration {calibrate!r}: the one there is, is gptq.",
                                      options=("calibrate",))
        if quantization != "fp8":
            raise InvalidRequestError(f"--calibrate gptq applies to fp8; integer weights calibrate as --quant gptq "
                                      f"or --quant awq (int4), not --quant {quantization} --calibrate gptq.",
                                      options=("calibrate",))
        if group_size is not None:
            raise InvalidRequestError("fp8 has one scale per output channel: drop --group-size.",
                                      options=("quant_group_size",))
        return calibrated_model(model, out_dir, method="gptq", fp8=True, device=device, progress=progress,
                                should_stop=should_stop, layout=layout)
    if quantization in ("awq", "gptq"):
        load_config(model, device=device, quantization=quantization, quant_group_size=group_size)  # before calibrating
        return calibrated_model(model, out_dir, method=quantization, group_size=group_size, device=device,
                                progress=progress, should_stop=should_stop, layout=layout)
    if layout == "awq" and quantization != "int4":
        raise InvalidRequestError("AWQ checkpoints hold 4-bit weights: use --quant int4, or another layout.",
                                  options=("layout",))
    out_dir = Path(out_dir).expanduser()
    config = load_config(model, device=device, dtype="float32" if device == "cpu" else "auto",
                         quantization=quantization, quant_group_size=group_size, attention="torch",
                         float_head=True,  # one format in the file: the head stays as the checkpoint has it
                         num_blocks=4, max_model_len=64, enforce_eager=True)
    # writing: casting to fp8 needs no fp8 tensor cores, so the CPU writes fp8 checkpoints too
    with _from_the_original(quantization):
        loaded = load_model(config, progress=say, should_stop=should_stop, writing=True)
    try:
        modules = [(n, m) for n, m in loaded.runner.model.named_modules()
                   if isinstance(m, QuantizedLinear) and not isinstance(m, QuantizedTiedHead)]
        parts = [(ckpt, qw) for n, m in modules for ckpt, qw in _split(m, n)]
        return _write(loaded, parts, {}, out_dir, layout, quantization, say, should_stop)
    finally:
        release_runner(loaded.runner)


def _write(loaded, parts, floats: dict, out_dir: Path, layout: str, quantization: str, say, should_stop,
           note: dict | None = None) -> QuantizeResult:
    """Write ``parts`` ((checkpoint module, QuantizedWeight)) in ``layout``, the float
    parameters ``floats`` overrides, and every other tensor of the loaded model's checkpoint
    (a shape's: of the loaded model). ``note`` goes into config.json's ``hearth_quantized``."""
    from safetensors.torch import save_file

    from engine.errors import LoadCancelledError
    from engine.loader.weights import iter_weights
    from engine.quant.formats import is_symmetric, quantization_config, write_checkpoint_weight, write_gptq

    out_dir = Path(out_dir).expanduser()
    path = None if loaded.info.path is None else Path(loaded.info.path)  # None: a shape, no files
    tensors: dict[str, torch.Tensor] = {}
    written = set()
    bits = group = None
    sym = True
    desc_act = any(qw.perm is not None for _c, qw in parts)
    gptq_format = "gptq"
    if layout == "gptq" and any(int(z.min()) < 1 for z in _zero_points(parts)):
        gptq_format = "gptq_v2"  # v1 stores zero - 1 and can't hold a zero point of 0
    for ckpt, qw in parts:
        if should_stop is not None and should_stop():
            raise LoadCancelledError("quantizing cancelled")
        qw = _cpu(qw)
        bits, group = qw.bits, qw.group_size
        sym = sym and is_symmetric(qw)
        if layout == "gptq":
            out = write_gptq(qw, checkpoint_format=gptq_format, name=ckpt)
        else:
            out = write_checkpoint_weight(qw, layout, sym=None, name=ckpt)
        for key, t in out.items():
            tensors[f"{ckpt}.{key}"] = t.contiguous()
        written.add(ckpt)
    others = iter_weights(path) if path is not None else _shape_tensors(loaded, written)
    for name, t in others:
        module, _, key = name.rpartition(".")
        if not (key == "weight" and module in written):  # a written module's bias is kept (Qwen2's q/k/v)
            tensors[name] = floats[name].cpu().to(t.dtype).contiguous() if name in floats else t.contiguous()
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8")) if path is not None else _shape_config(loaded)
    per_channel = all(qw.group_size == qw.in_features for _ckpt, qw in parts)
    fp8 = any(qw.fmt == "e4m3" for _ckpt, qw in parts)
    rounded = (note or {}).get("gptq")  # the GPTQ run's settings, where GPTQ rounded the weights
    qc = quantization_config("fp8" if fp8 else layout, bits, None if per_channel else group, sym, desc_act,
                             not_converted=("lm_head",), gptq=rounded)
    if layout == "gptq":
        qc["checkpoint_format"] = gptq_format
    cfg["quantization_config"] = qc
    cfg["hearth_quantized"] = {"method": quantization, "by": "hearth quantize", **(note or {})}
    _refuse_existing(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    made = [p for p in out_dir.absolute().parents if not p.exists()]  # by mkdir below: removed if it fails
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # safetensors writes 0600 (through a temporary file): give it the mode any new file
        # gets here (the folder's, made under the umask, less execute), as config.json has
        os.chmod(tmp / "model.safetensors", tmp.stat().st_mode & 0o666)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        for pattern in _TOKENIZER_GLOBS if path is not None else ():  # a shape has no tokenizer
            for f in path.glob(pattern):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        tmp.rename(out_dir)
    except OSError as e:
        raise ModelLoadError(f"cannot write the quantized model into {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out_dir.exists():  # failed or cancelled: no empty folders left on the way to it either
            for p in made:  # (the deepest first)
                with contextlib.suppress(OSError):
                    p.rmdir()
    size = (out_dir / "model.safetensors").stat().st_size
    say(f"wrote {len(written)} quantized layers ({layout}) into {out_dir}")
    return QuantizeResult(out_dir, layout, quantization, len(written), size)


def _shape_config(loaded) -> dict:
    """config.json of a folder written from the random-weight shape ``loaded``: the shape's
    own config, naming the shape (so the folder loads as a shape: token ids, no tokenizer)."""
    from engine.loader.shape_model import SHAPE_CONFIG_KEY, shape_model_config

    shape, cfg = shape_model_config(loaded.info.name)  # "shape:<name>": only a shape loads without files
    return {**cfg, SHAPE_CONFIG_KEY: shape}


def _shape_tensors(loaded, written: set[str]):
    """(checkpoint name, tensor) of every tensor of the random-weight shape ``loaded`` (it
    has no checkpoint to copy them from): its parameters under the names its loader takes,
    a fused projection's rows split into its shards, a quantized module not written as such
    (an embedding quantized with the head) dequantized; the weights of modules in ``written``
    skipped (their biases are kept)."""
    import torch

    from engine.layers.weight_loader import checkpoint_targets

    net = loaded.runner.model
    dtype = getattr(torch, loaded.info.dtype)
    targets, _aliases = checkpoint_targets(net)  # a tied head's alias isn't stored, as in a checkpoint
    for name, target in targets.items():
        module, _, key = name.rpartition(".")
        if key == "weight" and module in written:
            continue
        owner = target.module if target.module is not None else net.get_submodule(target.param_name.rpartition(".")[0])
        if target.param is not None:
            t = target.param.detach()
        elif target.key == "weight" and hasattr(owner, "quantized_weight"):
            t = owner.quantized_weight().dequantize(dtype)
        else:  # pragma: no cover - every quantized module's float source is one "weight"
            raise InvalidRequestError(f"cannot write {name} of {loaded.info.name}: quantize it with "
                                      "another method (--quant int4).", options=("quantization",))
        if target.shard_id is not None:
            start, rows = owner.shard_offsets[target.shard_id]
            t = t.narrow(0, start, rows)
        yield name, t.cpu()


def _cpu(qw):
    from engine.quant.qweight import QuantizedWeight

    c = lambda t: None if t is None else t.cpu()  # noqa: E731
    return QuantizedWeight(qw.bits, qw.group_size, c(qw.qweight), c(qw.scales), c(qw.mins), c(qw.perm), fmt=qw.fmt)


@contextlib.contextmanager
def _from_the_original(method: str):
    """A pre-quantized source refused as ``hearth quantize`` would say it: it writes from the
    unquantized original (a load's advice, ``--quant auto``, doesn't apply here)."""
    from engine.quant.transform import AlreadyQuantizedError

    try:
        yield
    except AlreadyQuantizedError as e:
        raise InvalidRequestError(f"this checkpoint is already quantized with {e.found}: hearth quantize writes "
                                  f"{method} from the model's unquantized original; point --model at that.",
                                  options=("model",)) from None


def _zero_points(parts):
    """The unsigned zero points each weight is written with (int8's shifted by 128: a
    symmetric int8 weight's are 128, which GPTQ v1 holds)."""
    from engine.quant.formats.packing import unsigned_zero_points

    for ckpt, qw in parts:
        yield unsigned_zero_points(_cpu(qw), ckpt)


#: Calibration: sequences of this many tokens of the bundled calibration text (about 66k
#: tokens of SmolLM2's tokenizer), at most this many of them.
CALIBRATION_SEQ_LEN = 512
CALIBRATION_SEQUENCES = 64
#: GPTQ's damping (a fraction of the Hessian's mean diagonal) and true-sequential order
#: (each linear of a layer quantized on the inputs of the ones before it already quantized:
#: about 2.5x the calibration time). On SmolLM2-135M at group 64 (64 x 512 tokens; perplexity
#: on 4k held-out tokens, reference 24.53, round-to-nearest 30.22): damp 0.01 26.46, 0.1
#: 26.10, 0.3 26.12; act-order 26.21; true-sequential 25.83
#: (benchmarks/results/2026-12-01-i14-quality-proxy-smollm2-g64-v2.json).
GPTQ_DAMP = 0.1
GPTQ_TRUE_SEQUENTIAL = True
#: The methods a float model is calibrated for (into a checkpoint of the models cache at its
#: first load): the calibration method and whether it rounds onto fp8.
CALIBRATED = {"awq": ("awq", False), "gptq": ("gptq", False), "fp8-gptq": ("gptq", True)}
#: GPTQ's damping for fp8 weights (``hearth quantize --quant fp8 --calibrate gptq``).
GPTQ_FP8_DAMP = 0.01
#: Bump when calibration's results change (the algorithms, their options): cached
#: calibrated checkpoints made by an older Hearth are then made again. 2: GPTQ's per-token
#: weighted Hessians, true-sequential.
CALIBRATION_VERSION = "calibration-2"


def calibrated_model(model: str | None, out_dir: str | Path, *, method: str, group_size: int | None = None,
                     device: str = "cpu", progress: Callable[[str], None] | None = None,
                     should_stop: Callable[[], bool] | None = None, layout: str | None = None,
                     fp8: bool = False) -> QuantizeResult:
    """GPTQ or AWQ of ``model`` (float weights) on the bundled calibration text, written as
    a GPTQ or AWQ checkpoint (``layout``: the method's own by default) into ``out_dir``.
    ``fp8`` (GPTQ only): GPTQ onto float8 e4m3 with per-channel scales, written as
    ``--quant fp8``'s compressed-tensors checkpoint."""
    from engine.config import load_config
    from engine.layers.linear import Linear
    from engine.loader.engine_loader import load_model
    from engine.loader.shape_model import TokenIdsOnlyTokenizer, byte_token_ids
    from engine.quant.calibrate import calibrate, check_calibration, split_calibration_ids
    from engine.quant.transform import auto_group
    from engine.runner.lifecycle import release_runner
    from resources.texts import calibration_text_path

    say = progress or (lambda _msg: None)
    _refuse_existing(out_dir)
    layout = layout or ("compressed-tensors" if fp8 else method)
    if layout not in ("gptq", "awq", "compressed-tensors"):
        raise InvalidRequestError(f"unknown layout {layout!r}", options=("layout",))
    config = load_config(model, device=device, dtype="float32" if device == "cpu" else "auto", quantization="none",
                         attention="torch", num_blocks=4, max_model_len=CALIBRATION_SEQ_LEN, enforce_eager=True)
    with _from_the_original("fp8 (GPTQ)" if fp8 else method):
        loaded = load_model(config, progress=say, should_stop=should_stop)
    try:
        net = loaded.runner.model
        g = None if fp8 else group_size or auto_group(net)
        try:
            check_calibration(net, method, 4, g, fp8)
        except ValueError as e:  # a group size that doesn't divide some layer: the user's choice
            if fp8:  # a layer fp8's products can't take
                raise InvalidRequestError(f"fp8: {e}.", options=("quantization",)) from None
            raise InvalidRequestError(f"{method}: {e} (--group-size), or leave it on auto.",
                                      options=("quant_group_size",)) from None
        label = "fp8 (GPTQ)" if fp8 else method
        text = calibration_text_path().read_text(encoding="utf-8")
        note = None
        if isinstance(loaded.tokenizer, TokenIdsOnlyTokenizer):
            # A random-weight shape has no tokenizer: the text's bytes stand in for tokens,
            # as in `hearth compare`'s prompts. The weights are noise anyway: speed only.
            ids = byte_token_ids(text, loaded.info.vocab_size)
            what = "token ids made of the bundled text's UTF-8 bytes (a random-weight shape has no tokenizer)"
            note = {"calibration": "the bundled calibration text's UTF-8 bytes as token ids (random-weight "
                                   "shape, no tokenizer): for speed runs only"}
        else:
            ids = loaded.tokenizer.encode(text, add_special_tokens=False)
            what = "tokens of the bundled text"
        seqs = split_calibration_ids(ids, CALIBRATION_SEQ_LEN, CALIBRATION_SEQUENCES)
        say(f"{label}: calibrating on {len(seqs)} x {CALIBRATION_SEQ_LEN} {what}")
        if next(net.parameters()).device.type == "cpu":
            from engine.choices import CPU_CALIBRATION_NOTE

            say(f"note: {CPU_CALIBRATION_NOTE}")
        options = {"fp8": True} if fp8 else {"group_size": g}
        if method == "gptq":
            options.update(damp=GPTQ_FP8_DAMP if fp8 else GPTQ_DAMP, true_sequential=GPTQ_TRUE_SEQUENTIAL)
        result = calibrate(net, seqs, method=method, should_stop=should_stop,
                           progress=lambda done, total: say(f"{label}: layer {done} of {total} quantized"),
                           **options)
        parts = []
        for name, qw in result.weights.items():
            module = net.get_submodule(name)
            parts += _split_weight(module, name, qw)
        floats = dict(result.float_params)
        # A fused bias the folds changed goes back to its checkpoint shards (q/k/v, gate/up).
        for name in [n for n in floats if n.endswith(".bias")]:
            module = net.get_submodule(name.rpartition(".")[0])
            if isinstance(module, Linear) and getattr(module, "checkpoint_shards", None):
                value = floats.pop(name)
                parent = name.rpartition(".")[0].rpartition(".")[0]
                for ckpt, shard in module.checkpoint_shards.items():
                    start, rows = module.shard_offsets[shard]
                    floats[f"{parent}.{ckpt}.bias"] = value[start:start + rows]
        if fp8:
            note = {**(note or {}), "rounding": "gptq", "damp": GPTQ_FP8_DAMP,
                    "calibration_tokens": len(seqs) * CALIBRATION_SEQ_LEN}
        elif method == "gptq":  # (a GPTQ layout's config records them: what GPTQ ran with)
            note = {**(note or {}), "gptq": {"damp_percent": GPTQ_DAMP, "true_sequential": GPTQ_TRUE_SEQUENTIAL},
                    "calibration_tokens": len(seqs) * CALIBRATION_SEQ_LEN}
        return _write(loaded, parts, floats, out_dir, layout, "fp8" if fp8 else method, say, should_stop, note)
    finally:
        release_runner(loaded.runner)


def _split_weight(module, name: str, qw) -> list[tuple[str, object]]:
    """(checkpoint module name, rows of ``qw``) per shard of ``module`` (a fused one: q/k/v)."""
    from engine.quant.qweight import QuantizedWeight

    shards = getattr(module, "checkpoint_shards", None)
    if not shards:
        return [(name, qw)]
    parent = name.rpartition(".")[0]
    out = []
    for ckpt, shard_id in shards.items():
        start, rows = module.shard_offsets[shard_id]
        cut = lambda t: None if t is None else t.narrow(0, start, rows).contiguous()  # noqa: E731
        out.append((f"{parent}.{ckpt}" if parent else ckpt,
                    QuantizedWeight(qw.bits, qw.group_size, cut(qw.qweight), cut(qw.scales), cut(qw.mins), qw.perm,
                                    fmt=qw.fmt)))
    return out
