"""One table of quantizations side by side: the 8B shape's batch-1 decode and weight bytes
(``bench-8b-bs1-<quant>.json``, ``hearth bench``) and SmolLM2's perplexity and weight bytes
(``eval-smollm2-cuda-<quant>.json``, ``hearth eval --json``), as ``benchmarks/gpu_session.sh
bnb`` and ``bnb-quality`` write them; ratios are to bf16 of the same files.

    python benchmarks/quant_table.py DIR [DIR ...] [--json OUT]

Prints a Markdown table (what the README quotes); ``--json`` writes the rows it read,
``{"rows": [...]}``, eval rows given ``suite: "eval"``, for benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ORDER = ("bf16", "int8", "int4", "bnb-int8", "bnb-nf4", "bnb-nf4-dq")


def read(dirs: list[Path]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(quant -> the batch-1 decode row, quant -> the eval row), the last file read winning."""
    decode, evals = {}, {}
    for d in dirs:
        for f in sorted(d.glob("bench-8b-bs1-*.json")):
            for row in json.loads(f.read_text())["rows"]:
                if row.get("suite") == "decode" and row.get("engine") == "hearth" and row.get("batch") == 1:
                    decode[f.stem.removeprefix("bench-8b-bs1-")] = row
        for f in sorted(d.glob("eval-smollm2-cuda-*.json")):
            text = f.read_text().strip()
            if text:
                evals[f.stem.removeprefix("eval-smollm2-cuda-")] = {"suite": "eval", **json.loads(text)}
    return decode, evals


def table(decode: dict[str, dict], evals: dict[str, dict]) -> str:
    quants = [q for q in ORDER if q in decode or q in evals] + sorted((set(decode) | set(evals)) - set(ORDER))
    base_tok = decode.get("bf16", {}).get("decode_tok_s")
    base_ppl = evals.get("bf16", {}).get("perplexity")
    lines = ["| | 8B decode, batch 1 | vs bf16 | CUDA graphs | 8B weights | SmolLM2 perplexity | vs bf16 "
             "| SmolLM2 weights |", "|---|---|---|---|---|---|---|---|"]
    for q in quants:
        d, e = decode.get(q, {}), evals.get(q, {})
        tok, ppl = d.get("decode_tok_s"), e.get("perplexity")
        graphs = {True: "yes", False: "no (eager)"}.get(d.get("cuda_graphs"), "")
        cells = [q, f"{tok:.1f} tok/s" if tok else "",
                 f"{tok / base_tok:.2f}x" if tok and base_tok else "", graphs,
                 f"{d['weight_bytes'] / 1e9:.2f} GB" if d.get("weight_bytes") else "",
                 f"{ppl:.3f}" if ppl else "",
                 f"{(ppl / base_ppl - 1) * 100:+.1f}%" if ppl and base_ppl and q != "bf16" else "",
                 f"{e['weight_bytes'] / 1e6:.0f} MB" if e.get("weight_bytes") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    card = next((r.get("card") for r in decode.values() if r.get("card")), "?")
    lines.append(f"\n({card}; decode: `hearth bench --shape llama-8b --suite decode --batch 1`; perplexity: "
                 "`hearth eval` of the bundled SmolLM2 GGUF's float conversion, windows and stride 1,024)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--json", type=Path, default=None, help="write the rows read, {\"rows\": [...]}")
    args = p.parse_args(argv)
    decode, evals = read(args.dirs)
    if not decode and not evals:
        print(f"no bench-8b-bs1-*.json or eval-smollm2-cuda-*.json in {', '.join(map(str, args.dirs))}")
        return 1
    print(table(decode, evals))
    if args.json:
        rows = [{**r, "quant": q} for q, r in decode.items()] + list(evals.values())
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
