"""``hearth doctor``: versions, devices and memory, and which backends can run here."""

from __future__ import annotations

from engine.api import doctor_info


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _status(reasons: list[str]) -> str:
    return "ok" if not reasons else "unavailable: " + "; ".join(reasons)


def run_doctor(args) -> int:
    info = doctor_info()
    print("Hearth doctor")
    print(f"  python        {info['python']} ({info['platform']})")
    for dist, ver in info["versions"].items():
        print(f"  {dist:<13} {ver}")
    print("devices")
    print(f"  cpu           {info['cpu']['name']}, RAM available {_gib(info['cpu']['ram_available_bytes'])}")
    print(f"  cpu kernel    {info['cpu_kernel']['summary']}")
    for d in info["cuda"]:
        print(f"  cuda:{d['index']}        {d['name']}, {_gib(d['free_bytes'])} free of {_gib(d['total_bytes'])}")
    if not info["cuda"]:
        print(f"  cuda          {info['cuda_note']}")
    for link in info.get("gpu_links", []):
        print(f"  cuda:{link['a']} <-> cuda:{link['b']}  {link['link']}")
    if info.get("gpu_links_note"):
        print(f"  links         {info['gpu_links_note']}")
    print("multi-device (--devices ... --split MODE)")
    layer = "layer         ok: " + ("GPUs then the CPU (the CPU last takes what the GPUs can't hold)"
                                   if info["cuda"] else "two CPU segments (cpu,cpu) to try it; GPUs when there are some")
    print(f"  {layer}" if not info["split_modes"]["layer"] else f"  layer         {_status(info['split_modes']['layer'])}")
    print(f"  tensor        {_status(info['split_modes']['tensor'])}")
    print(f"attention backends (on {info['attention_device']})")
    for name, reasons in info["attention"].items():
        print(f"  {name:<13} {_status(reasons)}")
    for title, key in (("weights dtypes", "dtypes"), ("KV-cache dtypes", "kv_cache_dtypes"),
                       ("quantization", "quantization")):
        print(title)
        for name, reasons in info[key].items():
            caveats = info.get("caveats", {}).get(key, {}).get(name)
            print(f"  {name:<13} {_status(reasons)}" + (f" ({'; '.join(caveats)})" if caveats else ""))
    print("models")
    print(f"  default       {info['default_model']}")
    print(f"  cache         {info['cache_dir']}")
    print("  fallback      architectures without a native implementation run through transformers "
          "(labelled 'transformers-fallback')")
    return 0
