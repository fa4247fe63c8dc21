"""Derive the small proxy model of FedPT from a large model: same tokenizer, a few of its layers.

FedPT steers the large model with `alpha * (small_tuned(x) - small_base(x))`, so the small model
must share the large one's vocabulary exactly. `derive_small(large_dir, target)` keeps the large
model's embeddings (tied with its output head), final norm and tokenizer files byte for byte,
keeps a few of its decoder layers (`layers`: by default the first three and the last three, the
truncation that loses least before training), and then distills it briefly towards the large
model: KL(large || small) over next-token distributions on chat text, training only the kept
layers and the norm (the 28M-parameter embedding stays frozen and shared).

Deterministic (fixed seed, fixed data order, single-threaded reductions are not assumed: runs on
the same machine give the same weights) and cached: the manifest records a hash of everything
that determines the result, and a target carrying it is reused. Staged and renamed into place
like `importer.import_model`. Knows nothing about LoRA, federated learning or serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedpersona.adapters.manifest import ModelManifest, read_model_manifest, write_model_manifest
from fedpersona.trainer.errors import ModelImportError
from fedpersona.trainer.models.importer import ImportedModel, read_manifest
from fedpersona.trainer.models.staging import fsync_tree, locked, swap_in

log = logging.getLogger(__name__)

DERIVE_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "tokenizer.model",
)

StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class DistillSettings:
    """What determines the derived small model (its hash keys the cache)."""

    layers: tuple[int, ...] = (0, 1, 2, 27, 28, 29)
    steps: int = 60
    batch_size: int = 4
    seq_len: int = 96
    lr: float = 3e-4
    seed: int = 0
    conversations: int = 40  # per persona, from the built-in persona corpus

    def key(self, large_sha: str) -> str:
        blob = json.dumps({**asdict(self), "large": large_sha, "v": DERIVE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two model dirs tokenize identically (same vocabulary, merges and specials)."""
    from tokenizers import Tokenizer

    try:
        left, right = (
            Tokenizer.from_file(str(a / "tokenizer.json")),
            Tokenizer.from_file(str(b / "tokenizer.json")),
        )
    except Exception as e:
        raise ModelImportError(f"cannot read tokenizer.json of {a} or {b}: {e}") from e
    return json.loads(left.to_str()).get("model") == json.loads(right.to_str()).get(
        "model"
    ) and left.get_vocab(with_added_tokens=True) == right.get_vocab(with_added_tokens=True)


def derive_small(
    large_dir: Path,
    target: Path,
    *,
    name: str,
    settings: DistillSettings | None = None,
    texts: Sequence[str] | None = None,
    force: bool = False,
    on_step: StepCallback | None = None,
) -> ImportedModel:
    """Write (or reuse) the small proxy model derived from `large_dir` at `target`."""
    started = time.monotonic()
    settings = settings or DistillSettings()
    large_dir, target = Path(large_dir), Path(target)
    large = read_model_manifest(large_dir)
    large_sha = large.source.sha256 if large.source and large.source.sha256 else _dir_key(large_dir)
    key = settings.key(large_sha or "")
    existing = read_manifest(target)
    if not force and existing is not None and existing.recipe_hash == key:
        return ImportedModel(target, existing, True, time.monotonic() - started)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((large_dir / "config.json").read_text())
    n_layers = int(config["num_hidden_layers"])
    if not settings.layers or any(not 0 <= i < n_layers for i in settings.layers):
        raise ModelImportError(
            f"layers {settings.layers} must be indices of the large model's {n_layers} layers"
        )
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(large_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    teacher = AutoModelForCausalLM.from_pretrained(large_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(large_dir, dtype=torch.float32)
    student.model.layers = torch.nn.ModuleList(student.model.layers[i] for i in settings.layers)
    student.config.num_hidden_layers = len(settings.layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in settings.layers]
    for index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = index
    for param in teacher.parameters():
        param.requires_grad_(False)
    student.model.embed_tokens.weight.requires_grad_(False)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)

    corpus = list(texts) if texts is not None else _default_texts(tokenizer, settings)
    if not corpus:
        raise ModelImportError("the distillation corpus is empty")
    final_kl = math.nan
    student.train()
    for step in range(settings.steps):
        batch = [
            corpus[(step * settings.batch_size + j) % len(corpus)]
            for j in range(settings.batch_size)
        ]
        enc = tokenizer(
            batch, return_tensors="pt", padding=True, truncation=True, max_length=settings.seq_len
        )
        mask = enc["attention_mask"]
        with torch.no_grad():
            teacher_logp = torch.log_softmax(teacher(**enc).logits, dim=-1)
        student_logp = torch.log_softmax(student(**enc).logits, dim=-1)
        kl = torch.nn.functional.kl_div(
            student_logp, teacher_logp, log_target=True, reduction="none"
        ).sum(-1)
        loss = (kl * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        final_kl = float(loss.item())
        if on_step is not None:
            on_step(step + 1, settings.steps, final_kl)
    student.eval()

    staging = target.with_name(f".{target.name}.staging-{uuid.uuid4().hex[:8]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        student.save_pretrained(staging, safe_serialization=True)
        for file in TOKENIZER_FILES:
            if (large_dir / file).is_file():
                shutil.copy2(large_dir / file, staging / file)
        if (large_dir / "generation_config.json").is_file():
            shutil.copy2(large_dir / "generation_config.json", staging / "generation_config.json")
        manifest = ModelManifest.parse(
            {
                **_inherited(large),
                "name": name,
                "role": "small",
                "architecture": type(student).__name__,
                "num_parameters": sum(p.numel() for p in student.parameters()),
                "num_layers": len(settings.layers),
                "source": {"kind": "derived", "file": large.name, "sha256": large_sha},
                "recipe_hash": key,
                "derived": {
                    "from": large.name,
                    "settings": asdict(settings),
                    "final_kl": round(final_kl, 4),
                },
            }
        )
        write_model_manifest(staging, manifest)
        fsync_tree(staging)
        with locked(target.with_name(f".{target.name}.lock")):
            swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "derived %s from %s in %.1f s (KL %.3f)",
        target,
        large_dir,
        time.monotonic() - started,
        final_kl,
    )
    return ImportedModel(target, manifest, False, time.monotonic() - started)


def _inherited(large: ModelManifest) -> dict[str, Any]:
    data = large.to_json()
    return {k: data[k] for k in ("tokenizer", "license", "engine") if k in data}


def _dir_key(model_dir: Path) -> str:
    from fedpersona.trainer.models.importer import sha256_of

    return sha256_of(model_dir / "config.json")


def _default_texts(tokenizer: Any, settings: DistillSettings) -> list[str]:
    """Chat-formatted persona conversations (the in-package corpus), in a fixed shuffled order."""
    import random

    from fedpersona.trainer.data.personas import pretraining_conversations

    chats = pretraining_conversations(per_persona=settings.conversations, seed=settings.seed)
    texts = [tokenizer.apply_chat_template(c["messages"], tokenize=False) for c in chats]
    random.Random(settings.seed).shuffle(texts)
    return texts
