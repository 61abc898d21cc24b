"""Moving KV blocks between vLLM engines: the connector, transports and framing."""
