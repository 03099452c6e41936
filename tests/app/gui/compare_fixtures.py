"""Shared pieces of the Compare page tests: a page over a bridge, set up for the tiny model,
and a comparison built by hand (deterministic outputs, for rendering)."""

from __future__ import annotations

from app.services.compare_plan import CompareConfig, ComparePlan
from app.services.compare_results import ComparisonResult, ConfigResult, PromptResult

PROMPTS = ("Once upon a time", "The capital of France is")
REF = ("The cat sat on the mat and looked at the door.", "Paris is the capital of France.")
OTHER = ("The cat sat on a red mat and looked at the door.", "Paris is the capital of France.")


class NoLibrary:
    """A library with nothing in it (the page's model list isn't what these tests are about)."""

    def scan(self):
        return []


def make_page(qtbot, bridge, gui_env, **kw):
    from app.gui.compare_page import ComparePage

    kw.setdefault("library", NoLibrary())
    page = ComparePage(bridge, gui_env["settings"], **kw)
    qtbot.addWidget(page)
    page.resize(1200, 800)
    page.show()
    qtbot.waitExposed(page)
    return page


def set_up_tiny(page, model: str, quants=("bf16", "int8", "int4"), prompts=PROMPTS, max_tokens: int = 6,
                eval_tokens: int = 48) -> None:
    """The setup of a quick comparison of the tiny model on the CPU."""
    s = page.setup
    s.set_model(model)
    s.device.setCurrentIndex(s.device.findData("cpu"))
    s.configs.set_configs([CompareConfig(q) for q in quants])
    s.sources["typed"].setChecked(True)
    s.typed.setPlainText("\n\n".join(prompts))
    s.max_tokens.setValue(max_tokens)
    s.perplexity.setChecked(eval_tokens > 0)
    if eval_tokens:
        s.eval_tokens.setValue(eval_tokens)
    assert s.problem is None, s.problem


def built_result(failed: bool = True, cancelled_last: bool = False) -> ComparisonResult:
    """bf16 (the reference), int8 (one prompt differs in words), then awq failed (or int4
    cancelled), with every number set: what a finished comparison looks like."""
    configs = [CompareConfig("bf16"), CompareConfig("int8"), CompareConfig("int4" if cancelled_last else "awq")]
    plan = ComparePlan(configs=tuple(configs), prompts=PROMPTS, model="tiny", max_tokens=16, eval_tokens=48)
    results = []
    for i, outputs in enumerate((REF, OTHER)):
        prompts = [PromptResult(p, text=t, token_ids=[ord(c) for c in t], finish_reason="stop", prompt_tokens=5,
                                ttft_ms=40.0 + 10 * i, decode_tok_s=90.0 + 20 * i,
                                agreement=1.0 if i == 0 else 0.75, prefix_agreement=1.0 if i == 0 else 0.5)
                   for p, t in enumerate(outputs)]
        results.append(ConfigResult(i, configs[i], prompts=prompts, load_s=1.5 + i, weight_bytes=(512 >> i) << 20,
                                    kv_bytes=16 << 20, peak_vram_bytes=(900 - 200 * i) << 20,
                                    peak_memory_source="process peak RSS (VmHWM)", perplexity=12.25 + i,
                                    perplexity_tokens=47, perplexity_window=1024, perplexity_stride=512,
                                    agreement=1.0 if i == 0 else 0.75, prefix_agreement=1.0 if i == 0 else 0.5,
                                    is_reference=i == 0, seconds=3.0, model="tiny", device="cpu", dtype="float32",
                                    attention_used="torch", quant_used=configs[i].quant, kv_dtype_used="float32"))
    if cancelled_last:
        results.append(ConfigResult(2, configs[2], status="cancelled", error="cancelled before it ran"))
    else:
        results.append(ConfigResult(2, configs[2], status="error",
                                    error="not enough memory for the weights: 9 GiB needed, 2 free"))
    return ComparisonResult(plan=plan, results=results, reference_index=0, cancelled=cancelled_last,
                            started="2025-01-31T10:00:00+00:00", seconds=9.0, model="tiny")
