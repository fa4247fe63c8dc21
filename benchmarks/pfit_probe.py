"""One client's RLOO, no federation: does a reward mix move the policy, and at which lr?

Why it exists: the cheap check behind `benchmarks/pfit.py`'s base model and learning rate. One
user's silo (its training chats: all but the last `--n-val`, which are the validation prompts,
never trained on), a global + personal LoRA like PFIT's (rank 4 each), `--steps` RLOO steps on
the mixed reward `lambda * r_help + (1 - lambda) * r_safe`, and every `--every` steps the mean
helpfulness, safety and exact KL to the base model over `--samples` completions of each
validation prompt. Held-out prompts are never read here.

    python benchmarks/pfit_probe.py --base-model DIR --rewards DIR --silo DIR --lam 0 --lr 1e-3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-model", type=Path, required=True)
    p.add_argument("--rewards", type=Path, required=True, help="dir with helpfulness/, safety/")
    p.add_argument("--silo", type=Path, required=True, help="a user silo (train.jsonl)")
    p.add_argument("--n-val", type=int, default=8)
    p.add_argument("--lam", type=float, required=True)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--every", type=int, default=12)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="append the curve here (JSON lines)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch
    from fedpersona.trainer.flower.apps import model_info
    from fedpersona.trainer.learn.lora_train import LoraSession
    from fedpersona.trainer.methods.base import LoraSpec
    from fedpersona.trainer.rlhf.mix import mixed_reward
    from fedpersona.trainer.rlhf.rloo import (
        RlConfig,
        RlooTrainer,
        exact_kl,
        load_prompts,
        prompt_text,
        sample,
    )
    from fedpersona.trainer.rlhf.scorer import RewardPair

    torch.set_num_threads(1)
    info = model_info(args.base_model)
    rewards = RewardPair.load(args.rewards)
    prompts = load_prompts(args.silo, "train")
    train, val = prompts[: -args.n_val], prompts[-args.n_val :]
    specs = {"g": LoraSpec(rank=4, alpha=8.0), "p": LoraSpec(rank=4, alpha=8.0)}
    session = LoraSession(info, specs, seed=args.seed)

    def validate() -> dict[str, float]:
        h: list[float] = []
        s: list[float] = []
        k: list[float] = []
        for i, prompt in enumerate(val):
            rollout = sample(
                session.model,
                session.tokenizer,
                prompt,
                n=args.samples,
                max_new_tokens=24,
                temperature=1.0,
                seed=10_000 + i,
            )
            scores = rewards.score([prompt_text(prompt)] * args.samples, rollout.texts)
            h += scores.helpfulness.tolist()
            s += scores.safety.tolist()
            k += exact_kl(session.model, rollout).tolist()
        n = len(h)
        return {
            "helpfulness": float(np.mean(h)),
            "safety": float(np.mean(s)),
            "kl": float(np.mean(k)),
            "helpfulness_se": float(np.std(h) / n**0.5),
            "safety_se": float(np.std(s) / n**0.5),
        }

    def reward(ps: list[str], cs: list[str]) -> np.ndarray:
        scores = rewards.score(ps, cs)
        return mixed_reward(scores.helpfulness, scores.safety, args.lam)

    config = RlConfig(steps=args.steps, lr=args.lr, seed=args.seed, kl_coef=args.kl_coef)
    trainer = RlooTrainer(
        session, train, reward=reward, config=config, trainable={"g": None, "p": None}
    )
    started = time.monotonic()
    curve: list[dict[str, Any]] = [{"step": 0, **validate()}]
    for k in range(args.steps // args.every):
        history = trainer.run(args.every)
        curve.append(
            {
                "step": (k + 1) * args.every,
                "train_reward": float(np.mean([h["reward"] for h in history])),
                **validate(),
                "seconds": round(time.monotonic() - started, 1),
            }
        )
        sys.stdout.write(json.dumps(curve[-1]) + "\n")
        sys.stdout.flush()
    if args.json is not None:
        record = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        with args.json.open("a") as f:
            f.write(json.dumps({"args": record, "curve": curve}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
