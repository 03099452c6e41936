"""Log-probabilities in OpenAI's shapes, from the engine's ``TokenLogprob``s (the chosen
token's log-probability under the model's raw distribution, and the ``top`` most likely).

Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal"}``;
completions: ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``,
where each step's ``top_logprobs`` holds the chosen token too (``logprobs`` + 1 entries
when it is not among the most likely), as OpenAI's legacy API and vLLM give them.
A token's text is its own decoding (one that holds part of a multi-byte character decodes
to U+FFFD); its ``bytes`` are the token's raw bytes, where the tokenizer can say them
(``Tokenizer.token_bytes``), so joining consecutive tokens' bytes rebuilds such a
character, as OpenAI's field promises; else its text's UTF-8."""

from __future__ import annotations


class Logprobs:
    """Formats one request's logprobs (``tokenizer`` names the tokens; cached per id)."""

    def __init__(self, chat: bool, tokenizer) -> None:
        self.chat = chat
        self._tokenizer = tokenizer
        self._names: dict[int, str] = {}
        self._bytes = getattr(tokenizer, "token_bytes", None)
        # Tokens the answer's (and echo's) text leaves out: BOS, chat markers. They take no
        # room there, so text_offset must not advance over them.
        self._unseen = getattr(tokenizer, "special_token_ids", frozenset())

    def name(self, token_id: int) -> str:
        text = self._names.get(token_id)
        if text is None:
            text = self._names[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.name(token_id)
        raw = self._bytes(token_id) if self._bytes is not None else text.encode("utf-8")
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def format(self, lps: list, offset: int = 0) -> dict:
        """The ``logprobs`` of a choice (or of one chunk's tokens); ``offset``: completions'
        text offset of the first token (the length of the text before it)."""
        if self.chat:
            content = [{**self._entry(lp.token_id, lp.logprob),
                        "top_logprobs": [self._entry(t, v) for t, v in lp.top]} for lp in lps]
            return {"content": content, "refusal": None}
        ids = [lp.token_id for lp in lps]
        return {"tokens": [self.name(i) for i in ids], "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [self._top(lp) for lp in lps], "text_offset": self.offsets(ids, offset)}

    def _top(self, lp) -> dict:
        """Completions' ``{token: logprob}`` of one step: the most likely, and the chosen
        token always among them (OpenAI's legacy rule, vLLM's too: ``logprobs`` + 1 entries
        when it is not one of the most likely; it comes last, as it is the least likely)."""
        top = {self.name(t): v for t, v in lp.top}
        if all(t != lp.token_id for t, _ in lp.top):
            top.setdefault(self.name(lp.token_id), lp.logprob)
        return top

    def offsets(self, ids: list[int], offset: int = 0, text_start: bool = False) -> list[int]:
        """Each token's ``text_offset``: the characters of the text before it, from ``offset``.
        The tokens' bytes go through one incremental UTF-8 decoder, so a character split
        between tokens counts once, when complete (the text holds it whole; a token's own
        decoding of half of it is U+FFFD), and tokens the text leaves out count nothing.
        ``text_start``: ``ids`` begin the text, where a sentencepiece decoder drops the first
        word's space ("▁Hello" is "Hello" there: its bytes' space takes no room)."""
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = []
        for token_id in ids:
            out.append(offset)
            if token_id in self._unseen:
                continue
            raw = self._bytes(token_id) if self._bytes is not None else None
            if raw is None:
                offset += len(self.name(token_id))
                continue
            chars = decoder.decode(raw)
            if text_start and chars:
                text_start = False
                if chars.startswith(" ") and not self.name(token_id).startswith(" "):
                    chars = chars[1:]
            offset += len(chars)
        return out

    def prompt(self, ids: list[int], scored: list) -> dict:
        """Completions' ``echo`` with logprobs: the prompt's tokens, the first unscored
        (``None``, as OpenAI gives it), the rest from ``engine.api.prompt_logprobs``."""
        if not ids:
            return self.format([])
        rest = self.format(scored)
        return {"tokens": [self.name(ids[0]), *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
                "top_logprobs": [None, *rest["top_logprobs"]],
                "text_offset": self.offsets([ids[0], *(lp.token_id for lp in scored)], text_start=True)}


def joined(head: dict, tail: dict) -> dict:
    """Two completions ``logprobs`` one after the other (the prompt's, then the answer's)."""
    return {key: head[key] + tail[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}

