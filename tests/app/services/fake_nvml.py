"""A stand-in for pynvml: a few fake GPUs, any call can be made to fail."""

from __future__ import annotations

from types import SimpleNamespace


class FakeNVMLError(Exception):
    """Plays pynvml.NVMLError."""


class FakeNvml:
    """``gpus``: dicts with name, used, total and optionally util, uuid (mutable between
    samples). ``fail``: pynvml function name -> exception that call raises."""

    def __init__(self, gpus=(), fail=None):
        self.gpus = [dict(g) for g in gpus]
        self.fail = dict(fail or {})
        self.calls: dict[str, int] = {}

    def _call(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.fail:
            raise self.fail[name]

    def nvmlInit(self):
        self._call("nvmlInit")

    def nvmlShutdown(self):
        self._call("nvmlShutdown")

    def nvmlDeviceGetCount(self):
        self._call("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        self._call("nvmlDeviceGetHandleByIndex")
        return ("handle", i)

    def nvmlDeviceGetName(self, h):
        self._call("nvmlDeviceGetName")
        return self.gpus[h[1]]["name"].encode()  # old pynvml returns bytes

    def nvmlDeviceGetUUID(self, h):
        self._call("nvmlDeviceGetUUID")
        return self.gpus[h[1]].get("uuid", f"GPU-fake-{h[1]}")

    def nvmlDeviceGetMemoryInfo(self, h):
        self._call("nvmlDeviceGetMemoryInfo")
        g = self.gpus[h[1]]
        return SimpleNamespace(used=g["used"], total=g["total"], free=g["total"] - g["used"])

    def nvmlDeviceGetCudaComputeCapability(self, h):
        self._call("nvmlDeviceGetCudaComputeCapability")
        return self.gpus[h[1]]["capability"]  # a KeyError where a GPU has none: the call failed

    def nvmlDeviceGetUtilizationRates(self, h):
        self._call("nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=self.gpus[h[1]].get("util", 0), memory=0)


GIB = 1 << 30


def two_gpus() -> FakeNvml:
    return FakeNvml([
        dict(name="NVIDIA H100 80GB HBM3", used=30 * GIB, total=80 * GIB, util=87, uuid="GPU-aaaa-0001",
             capability=(9, 0)),
        dict(name="NVIDIA RTX 4090", used=1 * GIB, total=24 * GIB, util=3, uuid="GPU-bbbb-0002"),
    ])


def no_driver() -> FakeNvml:
    return FakeNvml(fail={"nvmlInit": FakeNVMLError("NVML Shared Library Not Found")})
