"""Secure aggregation's compute and bytes for one round, outside Flower (the masking math only).

    python benchmarks/secagg.py [--values 1000000] [--clients 4 8]

For each client count, every client runs the key and share stages and masks a random update of
`--values` float32 coordinates (`fedpersona.trainer.flower.secagg`); one client drops out after
masking; the server unmasks the rest. Reported per client count: seconds for one client's share
stage and masking, the server's unmask (incl. rebuilding the dropped client's pairwise masks),
the upload bytes masked (8 per value, uint64) vs plain (4 per value, float32), and the largest
error of the mean vs the plain weighted mean. The Deployment Engine's extra round trips (three
query messages per node, each a ClientApp launch on the SuperNode) come on top; the integration
test `tests/integration/test_secagg_deployment.py` prints those. Writes
`benchmarks/results/secagg.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from fedpersona.trainer.flower.secagg import (
    make_shares,
    mask_update,
    new_keys,
    open_shares,
    quantization_bound,
    reveal,
    threshold_of,
    unmask_mean,
)
from fedpersona.trainer.methods.aggregation import weighted_mean

RESULTS = Path(__file__).resolve().parent / "results" / "secagg.json"
CLIP = 1.0


def one_round(clients: int, values: int, rng: np.random.Generator) -> dict[str, float]:
    ids = [int(i) for i in rng.choice(2**40, size=clients, replace=False)]
    deltas = [{"w": rng.normal(0, 0.01, values).astype(np.float32)} for _ in ids]
    weights = [int(w) for w in rng.integers(10, 200, clients)]
    keys = {i: new_keys() for i in ids}
    peers = {i: (keys[i].pk1, keys[i].pk2) for i in ids}
    t = threshold_of(clients)
    started = time.perf_counter()
    seeds, held, inbox = {}, {}, {i: {} for i in ids}
    for i in ids:
        seeds[i], held[i], cipher = make_shares(i, keys[i], peers, t)
        for dst, ct in cipher.items():
            inbox[dst][i] = ct
    share_s = (time.perf_counter() - started) / clients
    started = time.perf_counter()
    masked = {}
    for i, delta, w in zip(ids, deltas, weights, strict=True):
        opened = open_shares(i, keys[i], peers, inbox[i])
        held[i].update(opened)
        masked[i] = mask_update(
            delta,
            weight=w,
            own=i,
            seed=seeds[i],
            sk1=keys[i].sk1,
            peer_pk1={s: keys[s].pk1 for s in opened},
            clipping_range=CLIP,
        )
    mask_s = (time.perf_counter() - started) / clients
    dropped, active = ids[:1], ids[1:]
    revealed: dict[int, list[bytes]] = {}
    for i in active:
        for owner, share in reveal(held[i], active=active, dropped=dropped).items():
            revealed.setdefault(owner, []).append(share)
    started = time.perf_counter()
    mean = unmask_mean(
        [masked[i] for i in active],
        weights=weights[1:],
        active=active,
        dropped=dropped,
        revealed=revealed,
        pk1={i: keys[i].pk1 for i in ids},
        threshold=t,
        clipping_range=CLIP,
    )
    unmask_s = time.perf_counter() - started
    plain = weighted_mean(list(zip(deltas[1:], weights[1:], strict=True)))
    return {
        "clients": clients,
        "values": values,
        "client_share_stage_s": round(share_s, 4),
        "client_mask_s": round(mask_s, 4),
        "server_unmask_s": round(unmask_s, 4),
        "upload_bytes_plain": 4 * values,
        "upload_bytes_masked": 8 * values,
        "max_error": float(np.abs(mean["w"] - plain["w"]).max()),
        "bound": quantization_bound(CLIP),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = [one_round(n, args.values, rng) for n in args.clients]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
