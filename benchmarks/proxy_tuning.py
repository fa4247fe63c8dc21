"""Benchmark FedPT (federated proxy-tuning) against tuning the large model directly.

On tinyshakespeare users (one silo per speaking role, `fedpersona.trainer.data.shakespeare`) and
the TINY base
models (`fedpersona models bootstrap`):

1. Federated tuning, same data, rounds, steps and LoRA shape, once of the SMALL model (FedPT)
   and once of the LARGE model (FedAvg), each in its own process: client compute seconds,
   the process's peak RSS, bytes uploaded by clients.
2. Held-out perplexity (each user's `eval.jsonl`, assistant tokens, pooled over users) of the
   large base, large + proxy (`large + alpha * (expert - small)`, alpha fixed at 1.0, never
   tuned on evaluation data) and the directly tuned large model; gap closed
   `(ppl_base - ppl_proxy) / (ppl_base - ppl_tuned)`.
3. Decode throughput on a real vLLM server with the proxy logits processor: completion tokens/s
   of concurrent greedy requests without and with the expert, in one server run.

Prints a table, writes JSON and a PNG under benchmarks/results/. Usage:

    python benchmarks/proxy_tuning.py --home .fedpersona --corpus ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import torch  # noqa: E402
from fedpersona.adapters import AdapterStore  # noqa: E402
from fedpersona.adapters.manifest import model_name  # noqa: E402
from fedpersona.service.engine.config import EngineSettings, build_launch  # noqa: E402
from fedpersona.service.proxy_tuning.experts import merge_lora  # noqa: E402
from fedpersona.trainer.data.silo import IGNORE_INDEX, collate, load_examples  # noqa: E402
from fedpersona.trainer.learn.lora_train import adapter_from_params, load_tokenizer  # noqa: E402
from fedpersona.trainer.methods.base import LoraSpec, TrainConfig  # noqa: E402
from fedpersona.trainer.methods.fedpt import FedPT, FedPTResult, publish_experts, run_fedpt  # noqa: E402
from fedpersona.trainer.models.basemodel import ModelInfo  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(stderr=True)


def model_info(path: Path) -> ModelInfo:
    return ModelInfo(
        path=path, name=model_name(path), role=path.name, recipe_hash="", num_parameters=0
    )


# ----------------------------------------------------------------------------- 1. tuning


def _tune_child(args: dict[str, Any], queue: Any) -> None:
    torch.set_num_threads(args["threads"])
    info = model_info(Path(args["model"]))
    spec = LoraSpec(rank=args["rank"], alpha=2.0 * args["rank"])
    result = run_fedpt(
        small=info,
        silos={u: Path(p) for u, p in args["silos"].items()},
        rounds=args["rounds"],
        config=TrainConfig(**args["train"]),
        method=FedPT(spec=spec, max_rank=64),
    )
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((result, peak_kib * 1024))


def tune(
    model: Path, *, silos: dict[str, Path], opts: argparse.Namespace
) -> tuple[FedPTResult, int]:
    """Federated LoRA tuning of `model` in a fresh process: (result, its peak RSS bytes)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    args = {
        "model": str(model),
        "silos": {u: str(p) for u, p in silos.items()},
        "rounds": opts.rounds,
        "rank": opts.rank,
        "threads": opts.threads,
        "train": {
            "steps": opts.local_steps,
            "lr": opts.lr,
            "batch_size": opts.batch_size,
            "max_len": opts.max_len,
            "seed": opts.seed,
        },
    }
    proc = ctx.Process(target=_tune_child, args=(args, queue))
    proc.start()
    result, peak = queue.get()
    proc.join()
    return result, peak


# ----------------------------------------------------------------------------- 2. perplexity


def load_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


@torch.inference_mode()
def perplexities(
    *,
    large: Path,
    small: Path,
    tuned_large: torch.nn.Module,
    expert: torch.nn.Module,
    silos: dict[str, Path],
    alpha: float,
    max_len: int,
) -> dict[str, float]:
    large_model, small_model = load_model(large), load_model(small)
    tokenizer = load_tokenizer(large)
    vocab = len(tokenizer)
    nll = {"base": 0.0, "proxy": 0.0, "tuned": 0.0}
    count = 0
    for silo in silos.values():
        examples = load_examples(silo, "eval", tokenizer, max_len=max_len)
        for start in range(0, len(examples), 8):
            batch = collate(examples[start : start + 8], pad_id=tokenizer.pad_token_id)
            kw = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            base = large_model(**kw).logits[..., :vocab]
            offset = expert(**kw).logits[..., :vocab] - small_model(**kw).logits[..., :vocab]
            variants = {
                "base": base,
                "proxy": base + alpha * offset,
                "tuned": tuned_large(**kw).logits[..., :vocab],
            }
            labels = batch.labels[:, 1:]
            mask = labels != IGNORE_INDEX
            count += int(mask.sum())
            for name, logits in variants.items():
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                nll[name] -= float(picked[mask].sum())
    return {name: math.exp(total / count) for name, total in nll.items()} | {"tokens": count}


# ----------------------------------------------------------------------------- 3. decoding


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def decode_throughput(
    *, home: Path, store: Path, expert: str, opts: argparse.Namespace
) -> dict[str, Any]:
    settings = EngineSettings(
        model_dir=home / "models" / "large",
        port=free_port(),
        max_loras=1,
        max_cpu_loras=1,
        max_model_len=512,
        kv_cache_gib=1,
        proxy_small_model=home / "models" / "small",
    )
    launch = build_launch(settings, home=home, store_dir=store)
    log_path = Path(tempfile.mkstemp(prefix="proxy-bench-vllm-", suffix=".log")[1])
    console.print(f"starting vLLM (log {log_path}) ...")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            launch.argv,
            env={**launch.environ(os.environ), "PYTHONPATH": str(REPO)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}; see {log_path}")
            try:
                if httpx.get(f"{launch.base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM not ready after 900 s; see {log_path}")
            time.sleep(2)
        # Every launch has an engine key; the bench talks to vLLM directly, like the gateway.
        headers = {"Authorization": f"Bearer {launch.api_key}"}
        tokenizer = load_tokenizer(home / "models" / "large")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "ROMEO:\nWhat light through yonder window breaks?"}],
            add_generation_prompt=True,
            return_dict=True,
        )["input_ids"]

        def one(use_expert: bool) -> int:
            body: dict[str, Any] = {
                "model": launch.served_model_name,
                "prompt": list(prompt),
                "max_tokens": opts.decode_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
            }
            if use_expert:
                body["vllm_xargs"] = {"fedpersona_expert": expert, "fedpersona_alpha": 1.0}
            r = httpx.post(
                f"{launch.base_url}/v1/completions", json=body, headers=headers, timeout=600
            )
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        def phase(use_expert: bool) -> float:
            with ThreadPoolExecutor(opts.concurrency) as pool:
                started = time.perf_counter()
                tokens = sum(pool.map(lambda _: one(use_expert), range(opts.decode_requests)))
                return tokens / (time.perf_counter() - started)

        one(False), one(True)  # warm-up (first-use compilation, expert load)
        results: dict[str, list[float]] = {"without": [], "with": []}
        for _ in range(opts.repeats):  # interleaved, so drift on a shared CPU hits both
            results["without"].append(phase(False))
            results["with"].append(phase(True))
        without = sorted(results["without"])[len(results["without"]) // 2]
        with_ = sorted(results["with"])[len(results["with"]) // 2]
        return {
            "tokens_per_s_without": without,
            "tokens_per_s_with": with_,
            "ratio": with_ / without,
            "runs": results,
            "concurrency": opts.concurrency,
            "requests": opts.decode_requests,
            "max_tokens": opts.decode_tokens,
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--home",
        type=Path,
        default=REPO / ".fedpersona",
        help="has models/large and models/small (fedpersona models bootstrap)",
    )
    p.add_argument("--corpus", type=Path, default=None, help="tinyshakespeare text")
    p.add_argument("--silos", type=Path, default=None, help="existing silos (else from --corpus)")
    p.add_argument("--users", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=15)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=192)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--decode-requests", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument(
        "--replot", action="store_true", help="re-print and re-plot --out without measuring"
    )
    p.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "proxy_tuning.json"
    )
    return p.parse_args()


def main() -> int:
    opts = parse_args()
    if opts.replot:
        saved: dict[str, Any] = json.loads(opts.out.read_text())
        saved.update(gaps(saved["perplexity"]))
        opts.out.write_text(json.dumps(saved, indent=2))
        print_table(saved)
        plot(saved, opts.out.with_suffix(".png"))
        return 0
    torch.set_num_threads(opts.threads)
    home = opts.home.resolve()
    large, small = home / "models" / "large", home / "models" / "small"
    for path in (large, small):
        if not (path / "config.json").exists():
            console.print(f"[red]{path} missing: run `fedpersona models bootstrap --home {home}`")
            return 2
    if opts.silos is None:
        if opts.corpus is None:
            console.print("[red]give --corpus (tinyshakespeare) or --silos")
            return 2
        from fedpersona.trainer.data.shakespeare import convert

        opts.silos = home / "bench-silos" / "shakespeare"
        convert(opts.corpus, opts.silos, users=opts.users)
    silos = {d.name: d for d in sorted(opts.silos.iterdir()) if (d / "train.jsonl").exists()}
    silos = dict(list(silos.items())[: opts.users])
    console.print(f"users: {', '.join(silos)}")

    report: dict[str, Any] = {"config": {k: str(v) for k, v in vars(opts).items()}}
    tuned: dict[str, FedPTResult] = {}
    for role, path in (("small", small), ("large", large)):
        console.print(f"federated tuning of the {role} model ...")
        result, peak = tune(path, silos=silos, opts=opts)
        tuned[role] = result
        report[f"tuning_{role}"] = {
            "client_seconds": result.client_seconds,
            "peak_rss_bytes": peak,
            "upload_bytes": result.upload_bytes,
            "final_train_loss": result.rounds[-1]["train_loss"],
        }

    spec = LoraSpec(rank=opts.rank, alpha=2.0 * opts.rank)
    small_info, large_info = model_info(small), model_info(large)
    expert = merge_lora(
        load_model(small),
        adapter_from_params(tuned["small"].global_params, spec=spec, base_model=small_info.name),
        where="bench",
    ).eval()
    tuned_large = merge_lora(
        load_model(large),
        adapter_from_params(tuned["large"].global_params, spec=spec, base_model=large_info.name),
        where="bench",
    ).eval()
    console.print("perplexities ...")
    ppl = perplexities(
        large=large,
        small=small,
        tuned_large=tuned_large,
        expert=expert,
        silos=silos,
        alpha=opts.alpha,
        max_len=opts.max_len,
    )
    report["perplexity"] = ppl
    report.update(gaps(ppl))
    # Saved before the engine part, so a failure there does not lose the tuning and perplexity.
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))

    if not opts.skip_vllm:
        store_dir = Path(tempfile.mkdtemp(prefix="proxy-bench-store-"))
        store = AdapterStore(store_dir, max_rank=64)
        publish_experts(store, small=small_info, spec=spec, result=tuned["small"], users=[])
        ref = f"global/expert@{tuned['small'].global_version}"
        report["decode"] = decode_throughput(home=home, store=store_dir, expert=ref, opts=opts)

    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    plot(report, opts.out.with_suffix(".png"))
    console.print(f"wrote {opts.out} and {opts.out.with_suffix('.png')}")
    return 0


def gaps(ppl: dict[str, float]) -> dict[str, float]:
    """The gap closed in perplexity (the target's formula) and in log-perplexity (mean NLL).

    When the base model is far off (perplexity in the thousands on out-of-domain text), the
    perplexity ratio is dominated by the first improvements; the NLL ratio is the stricter one.
    """
    base, proxy, tuned = ppl["base"], ppl["proxy"], ppl["tuned"]
    return {
        "gap_closed": (base - proxy) / (base - tuned),
        "gap_closed_nll": (math.log(base) - math.log(proxy)) / (math.log(base) - math.log(tuned)),
    }


def print_table(report: dict[str, Any]) -> None:
    ppl = report["perplexity"]
    table = Table(title="FedPT: proxy-tuning the large model with a federatedly tuned small one")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("ppl large base", f"{ppl['base']:.3f}")
    table.add_row("ppl large + proxy (alpha 1)", f"{ppl['proxy']:.3f}")
    table.add_row("ppl large tuned directly", f"{ppl['tuned']:.3f}")
    table.add_row("gap closed (target >= 0.88)", f"{report['gap_closed']:.3f}")
    table.add_row("gap closed in mean NLL (log-ppl)", f"{report['gap_closed_nll']:.3f}")
    for role in ("small", "large"):
        t = report[f"tuning_{role}"]
        table.add_row(f"client compute s, tuning {role}", f"{t['client_seconds']:.1f}")
        table.add_row(f"peak RSS MiB, tuning {role}", f"{t['peak_rss_bytes'] / 2**20:.0f}")
        table.add_row(f"upload KiB, tuning {role}", f"{t['upload_bytes'] / 1024:.0f}")
    if "decode" in report:
        d = report["decode"]
        table.add_row("decode tok/s without processor", f"{d['tokens_per_s_without']:.1f}")
        table.add_row("decode tok/s with proxy expert", f"{d['tokens_per_s_with']:.1f}")
        table.add_row("ratio (target >= 0.6)", f"{d['ratio']:.2f}")
    Console().print(table)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if "decode" in report else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6))
    ppl = report["perplexity"]
    axes[0].bar(
        ["base", "proxy", "tuned"],
        [ppl["base"], ppl["proxy"], ppl["tuned"]],
        color=["grey", "tab:blue", "tab:green"],
    )
    axes[0].set_yscale("log")
    axes[0].set_title(
        f"held-out ppl (gap closed {report['gap_closed']:.2f}, NLL {report['gap_closed_nll']:.2f})",
        fontsize=9,
    )
    small, large = report["tuning_small"], report["tuning_large"]
    keys = [
        ("client_seconds", "compute s"),
        ("peak_rss_bytes", "peak RSS"),
        ("upload_bytes", "upload"),
    ]
    axes[1].bar([k[1] for k in keys], [small[k] / large[k] for k, _ in keys], color="tab:blue")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set_title("client cost: small / large")
    if "decode" in report:
        d = report["decode"]
        axes[2].bar(
            ["without", "with expert"],
            [d["tokens_per_s_without"], d["tokens_per_s_with"]],
            color=["grey", "tab:blue"],
        )
        axes[2].set_title(f"vLLM decode tok/s (ratio {d['ratio']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
