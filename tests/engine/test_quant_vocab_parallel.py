"""A quantized embedding and LM head over tensor-parallel ranks, module by module
(``engine.layers.quant_parallel``), with a vocabulary no rank count divides: the ranks'
lookups summed and their logits side by side are one process's (int8 per row, int4 in
groups of 32, fp8), each rank's rows past the vocabulary zero; and how the ranks agree on
their CUDA graphs (``engine.runner.bring_up._agree_graphs``) with stand-in ranks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.layers.parallel import TPGroup, VocabParallelEmbedding, VocabParallelLMHead
from engine.layers.quant_linear import QuantizedLinear, QuantizedVocabEmbedding
from engine.layers.quant_parallel import (QuantizedVocabParallelEmbedding, QuantizedVocabParallelHead,
                                          QuantizedVocabParallelTiedHead)
from engine.layers.weight_loader import WeightShapeError
from engine.quant.sources import rtn

VOCAB, HIDDEN = 37, 64


def loaded(module, weight):
    module.to_empty(device="cpu")
    module.load_part("weight", weight, None)
    assert not module._pending
    return module


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("world", [2, 3, 5])
def test_the_ranks_rows_are_one_process_rows(method, world):
    torch.manual_seed(world)
    weight = torch.randn(VOCAB, HIDDEN)
    source = rtn(method, 32) if method == "int4" else rtn(method)
    with torch.device("meta"):
        whole_embed = QuantizedVocabEmbedding(VOCAB, HIDDEN, source, torch.float32)
        whole_head = QuantizedLinear(HIDDEN, VOCAB, source, dtype=torch.float32)
    whole_embed, whole_head = loaded(whole_embed, weight), loaded(whole_head, weight)
    ids = torch.tensor([0, 1, 12, 13, 36, 25, 7, 36])
    x = torch.randn(3, HIDDEN)
    lookups, logits = 0, []
    for rank in range(world):
        tp = TPGroup(rank, world, sizing=True)  # no group: each rank's partial result as it is
        with torch.device("meta"):
            embed = QuantizedVocabParallelEmbedding(VocabParallelEmbedding(VOCAB, HIDDEN, tp), source)
            head = QuantizedVocabParallelHead(VocabParallelLMHead(HIDDEN, VOCAB, tp), source)
        embed, head = loaded(embed, weight), loaded(head, weight)
        real = max(0, min(embed.num_embeddings, VOCAB - embed.start))
        for m in (embed, head):  # rows past the vocabulary: zero
            assert not m.qweight.float()[real:].any() and not m.scales.float()[real:].any()
        lookups = lookups + embed(ids)
        logits.append(head.kernel(x, head, None))
        tied = QuantizedVocabParallelTiedHead(embed)
        assert torch.equal(tied.kernel(x, tied, None), logits[-1])
    torch.testing.assert_close(lookups, whole_embed(ids), rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(logits, dim=1)[:, :VOCAB], whole_head(x), rtol=1e-6, atol=1e-5)


def test_a_stored_matrix_of_another_size_is_refused():
    from engine.quant.sources import Canonical

    tp = TPGroup(1, 2, sizing=True)
    full = rtn("int8").to_weight({"weight": torch.randn(VOCAB + 3, HIDDEN)}, VOCAB + 3, HIDDEN)
    with torch.device("meta"):
        embed = QuantizedVocabParallelEmbedding(VocabParallelEmbedding(VOCAB, HIDDEN, tp),
                                                Canonical(8, 0, has_mins=False, label="int8"))
    embed.to_empty(device="cpu")
    embed.load_part("qweight", full.qweight, None)
    embed.load_part("scales", full.scales, None)
    with pytest.raises(WeightShapeError):
        embed.finish_loading()


class _Ranks:
    """Stand-in ranks: ``agree_min`` answers with the smallest of each value over ``others``
    and this rank's; ``broadcast`` gives rank 0's routes."""

    def __init__(self, others, routes0):
        self.others, self.routes0 = others, routes0

    def agree_min(self, values, device):
        return [min(v, *(o[i] for o in self.others)) for i, v in enumerate(values)]

    def broadcast(self, t):
        return torch.tensor(self.routes0)


def _runner(prompt_buckets):
    from engine.runner.prompt_graphs import PromptGraphs

    prompts = object.__new__(PromptGraphs)
    prompts.graphs = {q: f"graph {q}" for q in prompt_buckets}
    prompts.logits = {q: f"logits {q}" for q in prompt_buckets}
    return SimpleNamespace(device="cpu", prompt_graphs=prompts,
                           graphs=SimpleNamespace(routes={1: 1, 2: 4, 4: 4}))


def test_every_rank_keeps_the_prompt_buckets_all_kept_and_rank_0s_routes():
    from engine.runner.bring_up import _agree_graphs

    runner = _runner([16, 32, 64, 128])
    assert _agree_graphs(runner, _Ranks([[1, 2], [1, 3]], [1, 2, 4]), None) is None
    assert sorted(runner.prompt_graphs.graphs) == [16, 32] == sorted(runner.prompt_graphs.logits)
    assert runner.graphs.routes == {1: 1, 2: 2, 4: 4}
    runner = _runner([16])
    assert _agree_graphs(runner, _Ranks([[1, 0]], [1, 2, 4]), None) is None
    assert runner.prompt_graphs is None  # a rank kept none: none replays a prompt
    runner = _runner([16, 32])
    assert "another tensor-parallel rank" in _agree_graphs(runner, _Ranks([[0, 0]], [1, 2, 4]), None)
    assert runner.graphs is None and runner.prompt_graphs is None
