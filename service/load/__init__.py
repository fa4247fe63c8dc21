"""Load generation against an OpenAI-compatible chat endpoint: the gateway, or vLLM directly.

`client` runs a workload (who asks, how often, for how long) and records every request;
`stub_engine` is a stand-in for vLLM that streams at once, for measuring the gateway's own cost.
Used by `fedpersona load`, the benchmarks under `benchmarks/` and the suite's smoke test.
"""
