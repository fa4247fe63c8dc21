"""Benchmark FedPT (federated proxy-tuning) against tuning the large model directly.

On tinyshakespeare users (one silo per speaking role, `fedpersona.trainer.data.shakespeare`) and
the TINY base
models (`fedpersona models bootstrap`):

1. Federated tuning, same data, rounds, steps and LoRA shape, once of the SMALL model (FedPT)
   and once of the LARGE model (FedAvg), each in its own process: client compute seconds,
   the process's peak RSS, bytes uploaded by clients.
2. Held-out perplexity (each user's `eval.jsonl`, assistant tokens, pooled over users) of the
   large base, large + proxy (`large + alpha * (expert - small)`) and the directly tuned large
   model; gap closed `(ppl_base - ppl_proxy) / (ppl_base - ppl_tuned)`. Alpha is chosen on a
   validation split carved from the end of each user's TRAINING chats (`--val-fraction`; both
   tunings train on the rest), never on the held-out split; held-out numbers at every alpha of
   the grid are recorded too, and at alpha 1 for comparison with earlier runs.
3. Decode throughput on a real vLLM server with the proxy logits processor: completion tokens/s
   of concurrent greedy requests without and with the expert, in one server run; with
   `--top-k K` a second server run measures the approximate top-K processor and how many greedy
   tokens it shares with the exact one. `--decode-only` measures just this, with an untrained
   (random) expert: speed does not depend on the expert's weights.

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
from fedpersona.adapters import AdapterStore, LoraAdapter, Slot  # noqa: E402
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


ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0)


@torch.inference_mode()
def perplexities(
    *,
    models: dict[str, torch.nn.Module],
    silos: dict[str, Path],
    tokenizer: Any,
    alphas: tuple[float, ...],
    max_len: int,
) -> dict[str, Any]:
    """Pooled perplexity on the `eval` split of `silos`: base, tuned, and proxy at each alpha."""
    vocab = len(tokenizer)
    nll: dict[str, float] = {"base": 0.0, "tuned": 0.0} | {f"proxy@{a}": 0.0 for a in alphas}
    count = 0
    for silo in silos.values():
        examples = load_examples(silo, "eval", tokenizer, max_len=max_len)
        for start in range(0, len(examples), 8):
            batch = collate(examples[start : start + 8], pad_id=tokenizer.pad_token_id)
            kw = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}

            def logits(name: str, kw: dict[str, Any] = kw) -> torch.Tensor:
                return models[name](**kw).logits[:, :-1, :vocab].float()

            base = logits("large")
            offset = logits("expert") - logits("small")
            variants = {"base": base, "tuned": logits("tuned")}
            variants |= {f"proxy@{a}": base + a * offset for a in alphas}
            labels = batch.labels[:, 1:]
            mask = labels != IGNORE_INDEX
            count += int(mask.sum())
            for name, value in variants.items():
                logp = torch.log_softmax(value, dim=-1)
                picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                nll[name] -= float(picked[mask].sum())
    ppl = {name: math.exp(total / count) for name, total in nll.items()}
    return {
        "base": ppl["base"],
        "tuned": ppl["tuned"],
        "proxy_by_alpha": {a: ppl[f"proxy@{a}"] for a in alphas},
        "tokens": count,
    }


def carve_validation(silos: dict[str, Path], root: Path, fraction: float) -> tuple[dict, dict]:
    """Split the end of each user's training chats off as a validation set.

    Returns (fit silos: `train.jsonl` without the validation chats, validation silos: those
    chats as their `eval.jsonl`). The held-out `eval.jsonl` of `silos` is not read.
    """
    fit, val = {}, {}
    for user, silo in silos.items():
        lines = [x for x in (silo / "train.jsonl").read_text().splitlines() if x.strip()]
        n_val = max(1, math.ceil(fraction * len(lines)))
        for kind, name, chunk in (
            ("fit", "train.jsonl", lines[:-n_val]),
            ("val", "eval.jsonl", lines[-n_val:]),
        ):
            path = root / kind / user
            path.mkdir(parents=True, exist_ok=True)
            (path / name).write_text("\n".join(chunk) + "\n")
            (fit if kind == "fit" else val)[user] = path
    return fit, val


# ----------------------------------------------------------------------------- 3. decoding


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def decode_throughput(
    *, home: Path, store: Path, expert: str, opts: argparse.Namespace, top_k: int
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
            env={
                **launch.environ(os.environ),
                "PYTHONPATH": str(REPO),
                "FEDPERSONA_PROXY_TOP_K": str(top_k),
            },
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

        sample: list[int] = []

        def one(use_expert: bool) -> int:
            body: dict[str, Any] = {
                "model": launch.served_model_name,
                "prompt": list(prompt),
                "max_tokens": opts.decode_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            if use_expert:
                body["vllm_xargs"] = {"fedpersona_expert": expert, "fedpersona_alpha": 1.0}
            r = httpx.post(
                f"{launch.base_url}/v1/completions", json=body, headers=headers, timeout=600
            )
            r.raise_for_status()
            if use_expert and not sample:
                sample.extend(r.json()["choices"][0]["token_ids"])
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
            "sample_tokens": sample,  # one greedy answer with the expert
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
    p.add_argument(
        "--alpha", type=float, default=None, help="fixed alpha (default: chosen on validation)"
    )
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--top-k", type=int, default=0, help="also measure the top-K approximation")
    p.add_argument("--decode-only", action="store_true", help="only the decode speed")
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
    spec = LoraSpec(rank=opts.rank, alpha=2.0 * opts.rank)
    small_info, large_info = model_info(small), model_info(large)
    if opts.decode_only:
        report["decode"] = measure_decode(home, spec, small_info, None, opts)
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(report, indent=2))
        console.print_json(json.dumps(report["decode"]))
        return 0

    fit, val = carve_validation(silos, opts.silos.parent / "fedpt-split", opts.val_fraction)
    tuned: dict[str, FedPTResult] = {}
    for role, path in (("small", small), ("large", large)):
        console.print(f"federated tuning of the {role} model ...")
        result, peak = tune(path, silos=fit, opts=opts)
        tuned[role] = result
        report[f"tuning_{role}"] = {
            "client_seconds": result.client_seconds,
            "peak_rss_bytes": peak,
            "upload_bytes": result.upload_bytes,
            "final_train_loss": result.rounds[-1]["train_loss"],
        }

    models = {
        "large": load_model(large),
        "small": load_model(small),
        "expert": merge_lora(
            load_model(small),
            adapter_from_params(
                tuned["small"].global_params, spec=spec, base_model=small_info.name
            ),
            where="bench",
        ).eval(),
        "tuned": merge_lora(
            load_model(large),
            adapter_from_params(
                tuned["large"].global_params, spec=spec, base_model=large_info.name
            ),
            where="bench",
        ).eval(),
    }
    tokenizer = load_tokenizer(large)
    alphas = ALPHAS if opts.alpha is None else (opts.alpha,)
    console.print("perplexities (validation, then held-out) ...")
    common = {"models": models, "tokenizer": tokenizer, "max_len": opts.max_len}
    on_val = perplexities(silos=val, alphas=alphas, **common)
    alpha = min(alphas, key=lambda a: on_val["proxy_by_alpha"][a])
    held = perplexities(silos=silos, alphas=tuple(sorted({*alphas, 1.0})), **common)
    report["validation"] = on_val | {"chosen_alpha": alpha}
    report["perplexity"] = {
        "base": held["base"],
        "proxy": held["proxy_by_alpha"][alpha],
        "tuned": held["tuned"],
        "alpha": alpha,
        "proxy_alpha_1": held["proxy_by_alpha"][1.0],
        "proxy_by_alpha": held["proxy_by_alpha"],
        "tokens": held["tokens"],
    }
    report.update(gaps(report["perplexity"]))
    # Saved before the engine part, so a failure there does not lose the tuning and perplexity.
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))

    if not opts.skip_vllm:
        report["decode"] = measure_decode(home, spec, small_info, tuned["small"], opts)

    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    plot(report, opts.out.with_suffix(".png"))
    console.print(f"wrote {opts.out} and {opts.out.with_suffix('.png')}")
    return 0


def random_expert(model_dir: Path, spec: LoraSpec, name: str) -> LoraAdapter:
    """A LoRA of `spec`'s shape on every target module of the model, small random weights."""
    model = load_model(model_dir)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module_name.endswith(spec.target_modules):
            out_f, in_f = module.weight.shape
            key = f"base_model.model.{module_name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(spec.rank, in_f, generator=g) / in_f
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, spec.rank, generator=g) * 0.01
    return LoraAdapter(
        r=spec.rank,
        alpha=spec.alpha,
        target_modules=spec.target_modules,
        base_model=name,
        tensors=tensors,
    )


def measure_decode(
    home: Path,
    spec: LoraSpec,
    small_info: ModelInfo,
    result: FedPTResult | None,
    opts: argparse.Namespace,
) -> dict[str, Any]:
    """Decode speed with the exact processor, and with `--top-k` the approximate one too."""
    store_dir = Path(tempfile.mkdtemp(prefix="proxy-bench-store-"))
    store = AdapterStore(store_dir, max_rank=64)
    if result is None:  # speed only: an untrained expert of the same shape
        version = store.publish_lora(
            Slot.global_expert(), random_expert(home / "models" / "small", spec, small_info.name)
        )
        ref = f"{version.slot.path}@{version.id}"
    else:
        publish_experts(store, small=small_info, spec=spec, result=result, users=[])
        ref = f"global/expert@{result.global_version}"
    decode = decode_throughput(home=home, store=store_dir, expert=ref, opts=opts, top_k=0)
    if opts.top_k:
        approx = decode_throughput(
            home=home, store=store_dir, expert=ref, opts=opts, top_k=opts.top_k
        )
        same = sum(
            a == b for a, b in zip(decode["sample_tokens"], approx["sample_tokens"], strict=False)
        )
        decode["top_k"] = {
            "k": opts.top_k,
            "tokens_per_s_with": approx["tokens_per_s_with"],
            "tokens_per_s_without": approx["tokens_per_s_without"],
            "ratio": approx["ratio"],
            "runs": approx["runs"],
            "greedy_tokens_equal_to_exact": f"{same}/{len(decode['sample_tokens'])}",
        }
    return decode


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
    alpha = ppl.get("alpha", 1.0)
    table.add_row(f"ppl large + proxy (alpha {alpha}, chosen on validation)", f"{ppl['proxy']:.3f}")
    if "proxy_alpha_1" in ppl:
        table.add_row("ppl large + proxy (alpha 1)", f"{ppl['proxy_alpha_1']:.3f}")
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
        if "top_k" in d:
            t = d["top_k"]
            table.add_row(f"ratio, approximate top-{t['k']} processor", f"{t['ratio']:.2f}")
            table.add_row(
                f"top-{t['k']} greedy tokens equal to exact", t["greedy_tokens_equal_to_exact"]
            )
    Console().print(table)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if "decode" in report else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6))
    ppl = report["perplexity"]
    axes[0].bar(
        ["base", f"proxy a={ppl.get('alpha', 1.0)}", "tuned"],
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
        names = ["without", "with expert"]
        values = [d["tokens_per_s_without"], d["tokens_per_s_with"]]
        if "top_k" in d:
            names.append(f"top-{d['top_k']['k']}")
            values.append(d["top_k"]["tokens_per_s_with"])
        axes[2].bar(names, values, color=["grey", "tab:blue", "tab:cyan"][: len(names)])
        axes[2].set_title(f"vLLM decode tok/s (ratio {d['ratio']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
