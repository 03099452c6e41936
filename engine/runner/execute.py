"""The native runner's step: a ``RunnerInput`` in, the sampled tokens out.

Four ways to run a step, tried in order: a pure decode step by CUDA-graph replay (greedy
batches pipelined: the next step is launched before the host sees this one's tokens, from
this step's argmax on the device; with a grammar's mask applied first where a row has one), or
on a CPU the decode rows by one C call (``engine.runner.cpu_step``; up to ``CPU_STEP_ROWS``;
a mixed step's prompt rows eagerly beside them); one prompt or chunk by prompt-graph replay;
else eagerly with decode rows first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.runner.io import RunnerInput, RunnerOutput, StepRow
from engine.runner.request_state import KeptRequest, RequestStateMixin
from engine.runner.sampler import NOT_A_NUMBER, flag_not_a_number


#: The most decode rows a CPU step runs in its one C call (``engine.runner.cpu_step``)
#: rather than as one eager batched step. On 2 cores with the default model (2026-12-07)
#: the C call gives 287-318 tok/s in all at 4 to 64 sequences (one C call per sequence
#: gave 164-176), where the eager step gave 59.5 at 4, 91.7 at 16, 135.2 at 32 and 182.4 at 64.
CPU_STEP_ROWS = 64


def is_decode_row(row: StepRow, kept: KeptRequest) -> bool:
    """One token at or past its request's prompt: a decode row (a prompt's last token alone,
    the rest of it cached, reads as a prompt, as it would cold)."""
    return len(row.token_ids) == 1 and row.start >= kept.prompt_len


class NativeExecuteMixin(RequestStateMixin):
    """``execute`` for ModelRunner, which provides the model, the KV cache, the graphs,
    ``_metadata`` and the pipelining state (``_ahead``, ``_pinned``, ``_ring``,
    ``steps_ahead_used``)."""

    @torch.inference_mode()
    def execute(self, inp: RunnerInput) -> RunnerOutput:
        """Run one step: compute every row's tokens into the KV cache and sample the next
        token of each row with ``sample=True`` (in row order). A step with no rows only
        takes in its new and finished requests.

        Preempted requests keep their state here: their RNG goes on where it was (their
        tokens stay; only their K/V is recomputed), and a step launched ahead for them
        can't be taken (they come back with a prompt step, which drops it)."""
        self._update_requests(inp)
        rows = inp.rows
        if not rows:
            return RunnerOutput([], None)
        if self.graphs is not None:
            graph_out = self._execute_graph(inp)
            if graph_out is not None:
                return graph_out
        elif self.cpu_step is not None:
            cpu_out = self._execute_cpu(rows)
            if cpu_out is not None:
                return cpu_out
        if self.prompt_graphs is not None and len(rows) == 1:
            graph_out = self._execute_prompt_graph(rows[0])
            if graph_out is not None:
                return graph_out
        self._ahead = None
        logits = self._forward_rows(rows)
        if logits is None:
            return RunnerOutput([], None)
        return self.sample(logits, [row for row in rows if row.sample])

    def _forward_rows(self, rows) -> torch.Tensor | None:
        """The eager forward of ``rows``: the logits of the rows with ``sample`` (in order),
        None when no row samples."""
        ids: list[int] = []
        positions: list[int] = []
        tables, starts, qlens = [], [], []
        # Decode rows (one token at or past its request's prompt) first, so that attention can
        # send them to its decode kernel; a prompt's last token alone (the rest of it cached)
        # reads as a prompt, as it would cold. Sampling below follows the input's order again.
        decode = [is_decode_row(row, k) for row, k in zip(rows, self._kept(rows))]
        order = sorted(range(len(rows)), key=lambda i: not decode[i])
        last_row = [0] * len(rows)
        end = 0
        for i in order:
            row = rows[i]
            tokens, start = row.token_ids, row.start
            n = len(tokens)
            ids.extend(tokens)
            positions.extend(range(start, start + n))
            tables.append(row.block_table)
            starts.append(start)
            qlens.append(n)
            end += n
            last_row[i] = end - 1
        meta = self._metadata(tables, starts, qlens, num_decode=sum(decode))
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, self.kv_caches, meta)

        picked = [last_row[i] for i, row in enumerate(rows) if row.sample]
        if not picked:
            return None
        return self.model.compute_logits(hidden[picked])

    def _execute_cpu(self, rows) -> RunnerOutput | None:
        """A step with decode rows on a CPU with the C decode step: every decode row in one C
        call (``run_rows``: each weight read once for all; far faster than one eager batched
        step, whose ~900 small torch ops cost more than the weights), the prompt rows of a
        mixed step eagerly beside them.
        A decode row is one token at or past its request's prompt: a prompt's last token alone
        (the rest of it cached) still reads as a prompt, as it would cold, and a decoding
        request's rows take the C step whether or not others' prompts share the step.
        None: no such rows, or more than ``CPU_STEP_ROWS`` (all eager)."""
        kept = self._kept(rows)
        decode = [i for i, (row, k) in enumerate(zip(rows, kept)) if row.sample and is_decode_row(row, k)]
        if not decode or len(decode) > CPU_STEP_ROWS:
            return None
        self._ahead = None
        if len(rows) == 1:
            row = rows[0]
            return self.sample(self.cpu_step.run(row.token_ids[0], row.start, row.block_table), rows, kept)
        c_logits = self.cpu_step.run_rows([rows[i] for i in decode])  # one C call for every decode row
        if len(decode) == len(rows):
            return self.sample(c_logits, rows, kept)
        at = {i: j for j, i in enumerate(decode)}
        others = [row for i, row in enumerate(rows) if i not in at]
        eager = self._forward_rows(others) if others else None
        sampled = [i for i, row in enumerate(rows) if row.sample]
        logits = torch.empty((len(sampled), c_logits.shape[-1]), dtype=torch.float32)
        taken = 0
        for j, i in enumerate(sampled):
            if i in at:
                logits[j] = c_logits[at[i]]
            else:
                logits[j] = eager[taken]
                taken += 1
        return self.sample(logits, [rows[i] for i in sampled], [kept[i] for i in sampled])

    def _execute_graph(self, inp: RunnerInput) -> RunnerOutput | None:
        """A pure decode step (one new token per row, all sampled) by graph replay.

        Greedy batches are pipelined: the next step is launched on the GPU (its input ids
        copied there from this step's argmax) *before* the host waits for this step's
        tokens, so the host's bookkeeping (scheduler, detokenizer, events) overlaps the
        GPU's work. Rows with a grammar (structured output) too: this step's logits are
        masked first (the grammars took the previous step's tokens), and the launched step
        keeps its logits; its masks are filled when the engine asks for it, once the
        grammars have this step's tokens, while it still runs. The launched-ahead step is
        used only if the engine then asks for exactly it (same requests, positions and
        tokens); otherwise it is dropped, which is harmless: it only wrote K/V, at slots
        that the real step rewrites with the same values or that belong to no committed
        token (and a grammar only takes the tokens of steps that were used).
        """
        rows = inp.rows
        ahead, self._ahead = self._ahead, None
        if len(rows) > self.graphs.max_batch:
            return None
        bs = self.block_size
        ids, positions, slots, seq_lens, tables = [], [], [], [], []
        for row in rows:
            tokens = row.token_ids
            if len(tokens) != 1 or not row.sample:
                return None
            p = row.start
            ids.append(tokens[0])
            positions.append(p)
            table = row.block_table
            slots.append(table[p // bs] * bs + p % bs)
            seq_lens.append(p + 1)
            tables.append(table)
        kept = self._kept(rows)
        ahead_ok = self.launch_ahead and all(k.launch_ahead for k in kept)
        grammars = [k.grammar for k in kept]
        masked = any(k.params.structured is not None for k in kept)  # (a rank other than 0 keeps no grammar)
        rids = [row.request_id for row in rows]
        hits = ahead.rows_for(rids, positions, ids) if ahead_ok and ahead is not None else None
        tokens = logits = None
        if hits is not None:
            # This step was launched ahead (for these requests, perhaps among others that
            # have finished since): take its rows (its tokens, or its logits to mask).
            self.steps_ahead_used += 1
            every = hits == list(range(len(ahead.request_ids)))
            pick = None if every else torch.tensor(hits, device=self.logits_device)
            if ahead.logits is None:
                host, event = ahead.host, ahead.event
                tokens = ahead.tokens if every else ahead.tokens[pick]
            else:
                logits = ahead.logits if every else ahead.logits[pick]
        else:
            logits = self.graphs.run(ids, positions, slots, seq_lens, tables)
            if not ahead_ok:
                return self.sample(logits, rows, kept)
        allowed = None
        if tokens is None:
            if masked and self.samples:  # the grammars have taken the previous step's tokens: their masks now
                from engine.runner.grammar import apply_token_bitmask, grammar_masks

                allowed = grammar_masks(grammars, logits.shape[1])
                logits = logits.to(torch.float32, copy=True)
                apply_token_bitmask(logits, allowed[0], allowed[1])
            tokens = logits.argmax(dim=-1)
            if self.tp is not None:  # the step launched from them: rank 0's (its masks) on every rank
                self.tp.broadcast(tokens)
            host, event = self._stage(flag_not_a_number(logits, tokens))
        nxt = self._next_positions(kept, tables, positions, inp.num_waiting) if ahead_ok else None
        launched = None
        if nxt is not None:
            nslots = [t[q // bs] * bs + q % bs for t, q in zip(tables, nxt)]
            logits2 = self.graphs.run(tokens, nxt, nslots, [q + 1 for q in nxt], tables)
            if masked:  # argmax once the host has the next masks (the next step)
                launched = _Ahead(rids, nxt, None, None, None, logits=logits2.clone())
            else:
                tokens2 = logits2.argmax(dim=-1)
                host2, event2 = self._stage(flag_not_a_number(logits2, tokens2))
                launched = _Ahead(rids, nxt, tokens2, host2, event2)
        event.synchronize()
        values = host.tolist()
        token_list = values if hits is None or logits is not None else [values[r] for r in hits]
        if allowed is not None:  # this step's tokens move the grammars on
            for i in allowed[1]:
                if token_list[i] != NOT_A_NUMBER:  # (a row that broke ends)
                    grammars[i].advance(token_list[i])
        if launched is not None:
            launched.inputs = token_list
            self._ahead = launched
        return RunnerOutput(token_list, None)

    def _execute_prompt_graph(self, row: StepRow) -> RunnerOutput | None:
        """One request's prompt or chunk (more than one token) by prompt-graph replay;
        None when it is longer than every kept bucket (it runs eagerly then)."""
        n = len(row.token_ids)
        if n <= 1 or n > self.prompt_graphs.max_tokens:
            return None
        logits = self.prompt_graphs.run(row.token_ids, row.start, row.block_table)
        if logits is None:
            return None
        self._ahead = None
        if not row.sample:
            return RunnerOutput([], None)
        return self.sample(logits, [row])

    def _next_positions(self, kept: list[KeptRequest], tables: list[list[int]],
                        positions: list[int], num_waiting: int) -> list[int] | None:
        """Positions of the step after this one, if it is worth launching ahead: every
        request already holds a block for its next slot (the scheduler's lookahead), and
        no request is about to be admitted in place of one that finishes now (that step
        would mix in a prefill and run eagerly, wasting the launched one)."""
        bs = self.block_size
        nxt = []
        ending = False
        for k, table, p in zip(kept, tables, positions):
            q = p + 1
            if q // bs >= len(table) or q >= self.graphs.max_model_len:
                return None
            ending |= q + 1 >= k.max_len  # the token sampled now is its last one
            nxt.append(q)
        if ending and (num_waiting > 0 or len(nxt) == 1):
            return None
        return nxt

    def _stage(self, tokens: torch.Tensor):
        """Copy sampled ids to pinned host memory without waiting; returns (view, event)."""
        if self._pinned is None:
            self._pinned = [torch.empty(self.graphs.max_batch, dtype=torch.long, pin_memory=True)
                            for _ in range(2)]
        buf = self._pinned[self._ring][: tokens.shape[0]]
        self._ring ^= 1
        buf.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        if self.placement is None:
            event.record()
        else:
            with torch.cuda.device(tokens.device):  # a layer split's logits may be on another GPU
                event.record()
        return buf, event


@dataclass(slots=True)
class _Ahead:
    """A decode step launched before the host saw the previous step's tokens."""

    request_ids: list[str]
    positions: list[int]
    tokens: torch.Tensor | None  # its argmax (None: a grammar's mask comes first, from ``logits``)
    host: torch.Tensor | None
    event: object
    inputs: list[int] | None = None  # its input ids: the previous step's tokens
    logits: torch.Tensor | None = None  # kept for masking when a row has a grammar

    def rows_for(self, request_ids: list[str], positions: list[int], ids: list[int]) -> list[int] | None:
        """Row of each requested sequence in this launched step, if it computed exactly
        what is now asked (same position, same input token) for every one of them, in
        the same order; else None."""
        index = {rid: i for i, rid in enumerate(self.request_ids)}
        rows, last = [], -1
        for rid, p, tok in zip(request_ids, positions, ids):
            i = index.get(rid)
            if i is None or i <= last or self.positions[i] != p or self.inputs is None \
                    or self.inputs[i] != tok:
                return None
            rows.append(i)
            last = i
        return rows
