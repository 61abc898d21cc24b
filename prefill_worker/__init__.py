"""The prefill pool: a process hosting a vLLM engine that produces KV for decode workers."""
