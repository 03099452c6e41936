"""Layer split in one process (issue 18): two CPU "devices" give the same tokens and
logits as one device on every fixture family, batched, with prefix hits, preemption and
quantized weights; the placement puts each part where the plan says; bad options are
refused with clear errors. (Moves between real devices: the gpu-marked test at the end.)"""

from __future__ import annotations

import pytest
import torch

from engine.api import Engine, InvalidRequestError, Request, SamplingParams
from engine.config import load_config
from engine.errors import HearthError

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
LOGPROBS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5)


def ids_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (n,), generator=g).tolist()


def load(path, **kw) -> Engine:
    kw.setdefault("num_blocks", 96)
    kw.setdefault("max_model_len", 256)
    return Engine.load(str(path), dtype="float32", **kw)


def run(engine: Engine, prompts, params=GREEDY):
    handles = [engine.submit(Request(prompt_token_ids=p, params=params)) for p in prompts]
    return [h.result() for h in handles]


@pytest.mark.parametrize("family", ["llama3", "llama-tied", "mistral", "qwen2", "qwen3"])
def test_two_cpu_segments_match_one_device(tiny_models, family):
    prompts = [ids_of(n, seed=n) for n in (5, 37, 70)]
    one = load(tiny_models[family], device="cpu")
    try:
        want = run(one, prompts, LOGPROBS)
    finally:
        one.shutdown()
    split = load(tiny_models[family], devices="cpu,cpu")
    try:
        info = split.model_info
        assert info.layer_split["layers"] == [[0, 1], [1, 2]]
        assert info.layer_split["devices"] == ["cpu", "cpu"]
        got = run(split, prompts, LOGPROBS)
    finally:
        split.shutdown()
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.token_id == lb.token_id
            assert la.logprob == pytest.approx(lb.logprob, abs=1e-4)


def test_split_batches_prefix_hits_and_preemption(tiny_models):
    path = tiny_models["llama-tied"]
    shared = ids_of(40, seed=1)
    prompts = [shared + ids_of(n, seed=n) for n in (3, 9, 21)] + [ids_of(60, seed=7)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    one = load(path, device="cpu", num_blocks=128, block_size=8)
    try:
        want = [r.token_ids for r in run(one, prompts, params)]
    finally:
        one.shutdown()
    # Few blocks: four sequences of 100 tokens can't all be held, so some are preempted.
    split = load(path, devices="cpu,cpu", num_blocks=30, block_size=8, split_ratio="1,1")
    try:
        got = [r.token_ids for r in run(split, prompts, params)]
        again = run(split, prompts[:2], params)  # prefix-cache hits
        stats = split.stats()
    finally:
        split.shutdown()
    assert got == want
    assert [r.token_ids for r in again] == want[:2]
    assert all(r.cached_prompt_tokens > 0 for r in again)
    assert stats.num_preemptions > 0


def test_split_with_int8_weights(tiny_models):
    path = tiny_models["llama3"]
    prompts = [ids_of(n, seed=n) for n in (6, 33)]
    one = load(path, device="cpu", quantization="int8")
    try:
        want = [r.token_ids for r in run(one, prompts)]
    finally:
        one.shutdown()
    split = load(path, devices="cpu,cpu", quantization="int8")
    try:
        assert split.model_info.quantization == "int8"
        got = [r.token_ids for r in run(split, prompts)]
    finally:
        split.shutdown()
    assert got == want


def test_ratio_places_layers(tiny_models):
    from engine.runner.bring_up import build_on_meta
    from engine.runner.layer_split import plan_placement
    from engine.models.spec import ModelSpec
    import json

    cfg = json.loads((tiny_models["llama3"] / "config.json").read_text())
    cfg["num_hidden_layers"] = 8
    spec = ModelSpec.from_config(cfg)
    model = build_on_meta(spec, torch.float32, 256)
    config = load_config("x", devices="cpu,cpu", split_ratio="3,1")
    p = plan_placement(model, config, kv_token_bytes=spec.kv_bytes_per_token(4), max_model_len=256,
                       attention={"cpu": "torch", "cuda": "triton"})
    assert [list(r) for r in p.split.ranges] == [[0, 1, 2, 3, 4, 5], [6, 7]]
    assert p.device_of("model.layers.5.mlp.down_proj").type == "cpu"
    assert "cpu: layers 0-5 (torch), cpu: layers 6-7 (torch)" == p.describe()


def test_sized_by_room_puts_only_the_rest_on_the_cpu():
    from engine.split import plan_layer_split

    gib = 2**30
    from engine.split import head_device_index

    # 32 layers of 0.5 GiB, a 1 GiB embedding and a 1 GiB head; a 10 GiB GPU and the CPU:
    # the GPU holds the embedding, the head (the last GPU's) and the 16 layers it has room
    # for, the CPU the rest (partial offload).
    s = plan_layer_split(("cuda:0", "cpu"), 32, gib // 2, gib, gib, room=(10 * gib, 64 * gib))
    assert [len(r) for r in s.ranges] == [16, 16]
    assert s.bytes_per_device == (10 * gib, 8 * gib)
    assert head_device_index(("cuda:0", "cuda:1", "cpu")) == 1
    assert head_device_index(("cpu", "cpu")) == 1


@pytest.mark.parametrize("options, words", [
    (dict(devices="cpu,tpu"), "unknown device 'tpu'"),
    (dict(devices="cpu,cpu", split_ratio="1,0"), "positive"),
    (dict(devices="cpu,cpu", split_ratio="1,2,3"), "3 shares for 2 devices"),
    (dict(devices="cpu,cpu", split_ratio="a,b"), "one number per device"),
    (dict(split_ratio="1,1"), "needs --devices"),
    (dict(devices="cpu,cpu", split="diagonal"), "layer or tensor"),
    (dict(devices="cuda:0,cuda:0"), "twice"),
])
def test_bad_options_are_refused_clearly(options, words):
    with pytest.raises(InvalidRequestError, match=words):
        load_config("default", **options)


def test_unknown_gpu_and_too_many_devices_are_refused(tiny_models):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(InvalidRequestError, match="no CUDA GPU"):
        load(tiny_models["llama3"], devices="cuda:1,cpu")
    with pytest.raises(HearthError, match="fewer than the 3 devices"):
        load(tiny_models["llama3"], devices="cpu,cpu,cpu")


def test_every_layer_gets_its_own_devices_inputs(tiny_models):
    """Four layers over two distinct device objects (``cpu`` and ``cpu:0``: one memory, so
    the test runs anywhere, but the hops can't tell): the model's loop hands every layer the
    first device's positions, metadata and RoPE, and every layer of the second range must
    get its device's instead; the logits are those of the model without hops."""
    from types import SimpleNamespace

    from engine.layers.attention import get_backend
    from engine.layers.kernel_plan import KernelPlan, apply_kernel_plan
    from engine.models.spec import ModelSpec
    from engine.runner.bring_up import build_on_meta
    from engine.runner.layer_split import Placement, install_hops, materialize_placed_model, remove_hops
    from engine.runner.model_runner import ModelRunner
    from engine.split import LayerSplit
    import json

    cfg = json.loads((tiny_models["llama3"] / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    spec = ModelSpec.from_config(cfg)
    a, b = torch.device("cpu"), torch.device("cpu:0")
    placement = Placement(LayerSplit(("cpu", "cpu:0"), (range(0, 2), range(2, 4)), (0, 0)), (a, a, b, b), a, b,
                          {a: "torch", b: "torch"})
    model = build_on_meta(spec, torch.float32, 128)
    materialize_placed_model(model, placement)
    model.init_random(0, std=0.1)
    plan = KernelPlan.for_backend(get_backend("torch"))
    apply_kernel_plan(model, plan)
    install_hops(model, placement, {a: plan, b: plan})
    seen = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append((args[0], args[4], args[5])))
    fake = SimpleNamespace(block_size=16, device=a, graphs=None)

    def forward():
        caches = [torch.zeros(2, 2, 16, spec.num_kv_heads, spec.head_dim) for _ in range(4)]
        meta = ModelRunner._metadata(fake, [[0]], [0], [9])
        with torch.inference_mode():
            return meta, model.compute_logits(model(torch.arange(3, 12), torch.arange(9), caches, meta))

    meta, split_logits = forward()
    first, second = seen[:2], seen[2:4]
    assert all(m is meta and r is model.rotary for _, m, r in first)
    assert second[0][1] is not meta and second[0][2] is not model.rotary
    assert all(m is second[0][1] and r is second[0][2] for _, m, r in second)  # layer 3 too
    remove_hops(placement)
    seen.clear()
    _, plain_logits = forward()
    assert all(m is not None and r is model.rotary for _, m, r in seen)  # no hops left
    torch.testing.assert_close(split_logits, plain_logits, rtol=0, atol=0)


def test_bad_device_orders_and_modes_are_refused():
    with pytest.raises(InvalidRequestError, match="GPUs first and the CPU last"):
        load_config("default", devices="cpu,cuda:0")
    with pytest.raises(InvalidRequestError, match="--split tensor needs --devices"):
        load_config("default", split="tensor")


def test_the_gemv_tuner_takes_auto_cuda_for_cuda0():
    from engine.runner.gemv_tuning import same_device

    assert same_device(torch.device("cuda:0"), torch.device("cuda"))
    assert not same_device(torch.device("cuda:1"), torch.device("cuda"))
    assert not same_device(None, torch.device("cpu")) and same_device(torch.device("cpu"), torch.device("cpu"))


def _four_layers(tmp_path, tokenizer_files, family):
    from tests.conftest import family_configs, save_tiny

    cfg = family_configs()[family]
    cfg.num_hidden_layers = 4
    return save_tiny(cfg, tmp_path / family, tokenizer_files)


@pytest.mark.gpu
def test_gpu_and_cpu_segments_match_one_device(tiny_models, tmp_path, tokenizer_files):
    """The hop between real devices: the first half of the layers (and the embedding) on
    the GPU, the rest on the CPU, the norm and the head back on the GPU, against the GPU
    alone (float32, same tokens), with the segment graphs; 2-layer and 4-layer models."""
    prompts = [ids_of(n, seed=n) for n in (5, 37, 70)]
    for family in ("llama3", "llama-tied"):
        for path in (tiny_models[family], _four_layers(tmp_path, tokenizer_files, family)):
            _check_gpu_cpu(path, prompts)


def _check_gpu_cpu(path, prompts):
    from engine.api import prompt_logprobs

    if True:
        one = load(path, device="cuda", enforce_eager=True)
        try:
            want = run(one, prompts, LOGPROBS)
            want_score = [t.logprob for t in prompt_logprobs(one, prompts[1])]
        finally:
            one.shutdown()
        split = load(path, devices="cuda:0,cpu", split_ratio="1,1")
        try:
            assert split.model_info.layer_split["attention"] == ["triton", "torch"]
            assert split.model_info.layer_split["head"] == "cuda:0"  # back from the CPU's layer
            assert split.model_info.cuda_graphs, split.model_info.cuda_graphs_off
            got = run(split, prompts, LOGPROBS)
            assert split.runner.graphs.replays > 0  # decode steps replayed the segment graphs
            got_score = [t.logprob for t in prompt_logprobs(split, prompts[1])]  # the head's device
            assert got_score == pytest.approx(want_score, abs=2e-3)
        finally:
            split.shutdown()
        for a, b in zip(want, got):
            assert a.token_ids == b.token_ids
            for la, lb in zip(a.logprobs, b.logprobs):
                assert la.logprob == pytest.approx(lb.logprob, abs=2e-3)


class _FakeNvml:
    """pynvml's calls that ``gpu_links`` makes, for three GPUs: 0 and 1 joined by four
    NVLinks, 2 on PCIe (one host bridge away from both)."""

    class _Pci:
        def __init__(self, bus):
            self.busId = bus

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetPciInfo(self, h):
        return self._Pci(f"0000:0{h}:00.0".encode())

    def nvmlDeviceGetNvLinkState(self, h, link):
        if link >= 6:
            raise RuntimeError("NVML_ERROR_INVALID_ARGUMENT")
        return 1 if h in (0, 1) and link < 4 else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        return self._Pci(f"0000:0{1 - h}:00.0")

    def nvmlDeviceGetTopologyCommonAncestor(self, a, b):
        return 30

    NVML_P2P_CAPS_INDEX_NVLINK, NVML_P2P_STATUS_OK = 3, 0

    def nvmlDeviceGetP2PStatus(self, a, b, index):
        return 4  # NVML_P2P_STATUS_NOT_SUPPORTED


def test_doctor_names_each_gpu_pairs_link(monkeypatch):
    from engine.doctor import gpu_links

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    links, note = gpu_links(3, nvml=_FakeNvml())
    assert note is None
    assert links == [{"a": 0, "b": 1, "link": "NVLink x4"}, {"a": 0, "b": 2, "link": "PCIe, one host bridge"},
                     {"a": 1, "b": 2, "link": "PCIe, one host bridge"}]

    class Broken(_FakeNvml):
        def nvmlInit(self):
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    links, note = gpu_links(2, nvml=Broken())
    assert links == [] and "NVML unavailable" in note and "libnvidia-ml" in note
    assert gpu_links(1, nvml=_FakeNvml()) == ([], None)

    class Switched(_FakeNvml):  # HGX: every link ends at the NVSwitch
        def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
            return self._Pci("0000:ff:00.0")

        def nvmlDeviceGetP2PStatus(self, a, b, index):
            return 0 if {a, b} == {0, 1} else 4

    links, _ = gpu_links(3, nvml=Switched())
    assert [link["link"] for link in links] == ["NVLink (through NVSwitch)", "PCIe, one host bridge",
                                                 "PCIe, one host bridge"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert "may differ" in gpu_links(2, nvml=_FakeNvml())[1]


def test_expected_speed_reads_each_devices_weights_at_its_bandwidth():
    from engine.split import expected_decode_tok_s

    # 15 GB at 4 TB/s and 1 GB at 50 GB/s: 3.75 ms + 20 ms a token.
    got = expected_decode_tok_s({"cuda:0": 15e9, "cpu": 1e9}, {"cuda:0": 4e12, "cpu": 50e9})
    assert got == pytest.approx(1 / 0.02375)


def test_a_split_load_says_where_the_layers_go_and_how_fast_it_can_be(tiny_models):
    said = []
    e = Engine.load(str(tiny_models["llama3"]), devices="cpu,cpu", dtype="float32", num_blocks=32,
                    max_model_len=128, progress=said.append)
    try:
        info = e.model_info.to_dict()
    finally:
        e.shutdown()
    import re

    assert any(re.fullmatch(r"layer split: cpu: layers 0-0 \(torch, 0\.\d\d GiB of weights\), "
                            r"cpu: layers 1-1 \(torch\)", line) for line in said), said
    assert any(line.startswith("expected batch-1 decode at best: about ") for line in said)
    assert info["layer_split"]["expected_decode_tok_s"] > 0
    assert info["device"] == "cpu"


def test_segments_follow_the_placement():
    """GPU layers, CPU layers, then the head back on the GPU: three segments, the last one
    of no layers; the embedding with the first."""
    from types import SimpleNamespace

    from engine.runner.split_graphs import segments_of

    gpu, cpu = torch.device("cuda:0"), torch.device("cpu")
    p = SimpleNamespace(layer_devices=(gpu, gpu, gpu, cpu), embed=gpu, head=gpu)
    segs = segments_of(p, 4)
    assert [(s.device, s.start, s.stop, s.embeds, s.tail) for s in segs] == [
        (gpu, 0, 3, True, False), (cpu, 3, 4, False, False), (gpu, 4, 4, False, True)]
    p = SimpleNamespace(layer_devices=(gpu, torch.device("cuda:1")), embed=torch.device("cuda:1"),
                        head=torch.device("cuda:1"))  # tied: the embedding with the head
    segs = segments_of(p, 2)
    assert [(str(s.device), s.start, s.stop, s.embeds, s.tail) for s in segs] == [
        ("cuda:1", 0, 0, True, False), ("cuda:0", 0, 1, False, False), ("cuda:1", 1, 2, False, True)]


def test_the_gpu_list_reads_memory_from_nvml_by_pci_address(monkeypatch):
    """No CUDA context on every GPU for the load dialog's list: NVML answers, matched by PCI
    address (torch's cuda:1 may be NVML's 0); where NVML can't, torch does."""
    from types import SimpleNamespace

    from engine import doctor

    props = [SimpleNamespace(pci_domain_id=0, pci_bus_id=0x41, pci_device_id=0),
             SimpleNamespace(pci_domain_id=0, pci_bus_id=0x01, pci_device_id=0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU {i}")
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: asked.append(i) or (1, 2))

    class Nvml:
        def nvmlInit(self):
            pass

        def nvmlShutdown(self):
            pass

        def nvmlDeviceGetHandleByPciBusId(self, bus):
            if bus == "00000000:01:00.0":
                raise RuntimeError("NVML_ERROR_NOT_FOUND")
            return bus

        def nvmlDeviceGetMemoryInfo(self, handle):
            assert handle == "00000000:41:00.0"
            return SimpleNamespace(free=10, total=20)

    got = doctor.gpus(nvml=Nvml())
    assert got == [{"index": 0, "name": "GPU 0", "free_bytes": 10, "total_bytes": 20},
                   {"index": 1, "name": "GPU 1", "free_bytes": 1, "total_bytes": 2}]
    assert asked == [1]  # torch only for the GPU NVML couldn't find


def test_an_explicit_kv_size_that_cannot_fit_is_refused_before_the_weights_load(tiny_models):
    said = []
    with pytest.raises(HearthError, match=r"--kv-cache-memory: the layers on cpu would take .* ask for less"):
        Engine.load(str(tiny_models["llama3"]), devices="cpu,cpu", dtype="float32", max_model_len=512,
                    max_num_seqs=10**6, kv_cache_memory="100TiB", progress=said.append)
    assert not any(line.startswith("loading weights") for line in said)
    e = Engine.load(str(tiny_models["llama3"]), devices="cpu,cpu", dtype="float32", max_model_len=128,
                    kv_cache_memory="2MiB")
    try:
        assert 0 < e.model_info.kv_cache_bytes <= 2 * 2**20
    finally:
        e.shutdown()


def test_weights_per_device_count_a_tied_matrix_once(tiny_models):
    """Two CPU segments of the tied model hold exactly what the model holds (the head's
    matrix is the embedding's), which the fit check and the expected speed read."""
    from engine.layers.modules import module_bytes
    from engine.runner.bring_up import build_on_meta
    from engine.runner.layer_split import plan_placement, weight_bytes_per_device
    from engine.models.spec import ModelSpec
    import json

    spec = ModelSpec.from_config(json.loads((tiny_models["llama-tied"] / "config.json").read_text()))
    model = build_on_meta(spec, torch.float32, 128)
    p = plan_placement(model, load_config("x", devices="cpu,cpu", split_ratio="1,1"),
                       kv_token_bytes=spec.kv_bytes_per_token(4), max_model_len=128,
                       attention={"cpu": "torch", "cuda": "triton"})
    assert weight_bytes_per_device(model, p) == {torch.device("cpu"): module_bytes(model)}
