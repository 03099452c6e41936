"""The server's limits that ``hearth serve``'s flags default to: a module with no imports,
so that building the CLI's parser loads no web framework."""

#: The default of ``--max-queue``: how many answers may wait for a place in the engine's
#: batch before new requests are refused (429). Big enough for bursts of a few hundred
#: streams (the engine runs 64 at once by default, so 256 waiting is about four batches
#: behind); past that a client is better off retrying later than holding a connection
#: open for minutes, and the server's memory stays bounded.
MAX_QUEUE = 256
#: The Retry-After (seconds) of a 429: a batch's worth of answers usually ends by then,
#: and the openai SDKs wait this long before their automatic retry.
RETRY_AFTER_S = 1
