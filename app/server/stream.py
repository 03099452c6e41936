"""The SSE side of a streaming request: the choices' events merged in the order they come,
written as OpenAI's chunks, ending with ``data: [DONE]``; a client that goes away mid-stream
aborts its requests at once (not at the next token)."""

from __future__ import annotations

import asyncio

from starlette.responses import StreamingResponse

from app.server.errors import sse_error
from app.server.service import Choice, OpenAIService, failure
from app.server.shapes import DONE, Chunks


async def sse(service: OpenAIService, choices: list[Choice], chunks: Chunks, n: int):
    """The stream's bytes. Whatever ends it (the last choice, a failure, the client
    leaving: then ``aclose``), every choice still running is aborted. Events that arrive
    together (a busy server's backlog) go out in one write, still one SSE chunk per token
    step: fewer trips through the middleware and the socket when the loop is behind."""
    single = len(choices) == 1
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, choice: Choice) -> None:
        async for ev in choice.events:
            merged.put_nowait((index, ev, choice.events.at))

    async def burst() -> list[tuple[int, object, float]]:
        """(choice, event, when it left the engine): the next event, and every other one
        already here."""
        if single:  # read the choice's own queue: no pump task in between
            events = choices[0].events
            first = await events.__anext__()
            return [(0, first, events.at), *((0, ev, at) for ev, at in events.ready())]
        out = [await merged.get()]
        while not merged.empty():
            out.append(merged.get_nowait())
        return out

    pumps = [] if single else [asyncio.ensure_future(pump(i, c)) for i, c in enumerate(choices)]
    try:
        for i in range(len(choices)):
            opening = chunks.opening(i)
            if opening:
                yield opening
        left = len(choices)
        while left:
            out = []
            for index, ev, at in await burst():
                choice = choices[index]
                text = choice.take(ev, at)
                if text is not None:  # every token step is a chunk, as OpenAI streams (even one
                    # that adds no text yet): a client sees, and can time, each token
                    piece = chunks.text(index, text, choice.take_logprobs())
                    if piece:  # None: a tool call's text, held until the call is whole
                        out.append(piece)
                elif choice.finish is not None and choice.finish is ev:
                    left -= 1
                    error = failure(choice)
                    if error is not None:  # the 200 has gone: say it in the stream (SDKs raise it)
                        yield b"".join([*out, sse_error(error.status, error.message, error.code), DONE])
                        return
                    out.append(chunks.finish(index, ev, choice.take_logprobs()))
            if out:
                yield b"".join(out)
        if chunks.include_usage:
            yield chunks.usage([c.finish for c in choices], n)
        yield DONE
    finally:
        for p in pumps:
            p.cancel()
        service.done(choices, n)


async def echo_only_sse(chunks: Chunks, finishes: list, n: int):
    """The stream of completions' echo with max_tokens 0: each choice's prompt (its
    logprobs with it, when asked for), then its end (``length``); no engine request."""
    for i in range(len(finishes)):
        yield chunks.opening(i)
    yield b"".join(chunks.finish(i, fin) for i, fin in enumerate(finishes))
    if chunks.include_usage:
        yield chunks.usage(finishes, n)
    yield DONE


class EventStream(StreamingResponse):
    """A StreamingResponse that watches for the client leaving while it waits for tokens
    (starlette only notices on the next write) and always closes its iterator, so the
    iterator's clean-up (aborting the requests) runs as soon as the client is gone."""

    def __init__(self, content, on_close=None) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        # Also run when the iterator never started (the client left before the response
        # began): closing an unstarted generator skips its ``finally``.
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async def write() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        writer, watcher = asyncio.ensure_future(write()), asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, watcher):
                task.cancel()
            await asyncio.gather(writer, watcher, return_exceptions=True)
            try:
                await self.body_iterator.aclose()
            finally:
                if self.on_close is not None:
                    self.on_close()
        error = writer.exception() if writer.done() and not writer.cancelled() else None
        if error is not None and not isinstance(error, OSError):  # OSError: the client left mid-write
            raise error
