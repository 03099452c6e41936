"""Pure-Python engine core: sequences, KV block accounting and scheduling (no torch)."""
