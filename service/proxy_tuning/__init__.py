"""FedPT serving: a vLLM V1 logits processor that steers the large model with proxy experts.

At every decoding step of a request that names an expert, the processor adds
`alpha * (expert(x) - small_base(x))` to the large model's logits, where `expert` is the small
base model with a federatedly tuned LoRA merged in (arXiv 2410.00362, proxy-tuning).

Modules, from pure to I/O:
- `state.py`      per-request bookkeeping over vLLM's persistent batch (add / remove / move)
- `decoder.py`    incremental small-model forward passes over many requests' KV caches
- `lora_rows.py`  experts as per-row LoRA on the one small model (base and experts in one batch)
- `experts.py`    naming, validating, loading and caching experts (their LoRA factors)
- `settings.py`   the processor's pydantic settings (env `FEDPERSONA_...`)
- `errors.py`     its domain errors (`ValueError`s: vLLM answers them as HTTP 400)
- `processor.py`  the vLLM `LogitsProcessor` that ties them together (the only vLLM import)

Nothing here imports vLLM at package import time, so the pure parts are testable without it.
"""
