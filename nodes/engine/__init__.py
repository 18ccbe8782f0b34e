"""The engine: continuous batching, caches, the forward pass, prefill pacing and the lane."""
