"""The decode pool: a process hosting a vLLM engine that consumes transferred KV."""
