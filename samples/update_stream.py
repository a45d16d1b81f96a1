"""A training-like stream of sparse updates, Zipf-skewed over rows as real traffic is.

    python samples/update_stream.py REPLICA [--steps 20] [--batch 512] [--zipf 1.05] [--seed 1]
    python samples/update_stream.py REPLICA --checkpoint-out NEXT.safetensors [...]

Each step is one optimizer step: the rows of a batch of (item, user) pairs
drawn Zipf(s) over popularity move by a small SGD-like delta, the dense MLP
layers move in every row, and global_step increases. By default every step
is committed straight into REPLICA through the Python API, the way a
training loop would; with --checkpoint-out the steps are applied to a copy
of the replica's state and written as one full checkpoint, for
`deltalog commit REPLICA --from NEXT.safetensors`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from deltalog import Replica
from deltalog.checkpoint import write_checkpoint


def zipf_rows(rng: np.random.Generator, n_rows: int, k: int, s: float) -> np.ndarray:
    """k row indices in [0, n_rows), P(rank r) ~ 1/r^s, hot rows scattered over the table."""
    ranks = np.arange(1, n_rows + 1, dtype=np.float64)
    p = ranks**-s
    p /= p.sum()
    hot = rng.choice(n_rows, size=k, p=p)
    return (hot * 2654435761) % n_rows  # popularity is not contiguous in a real table


def step_updates(rng, state: dict[str, np.ndarray], batch: int, s: float, lr: float = 0.01) -> dict[str, tuple]:
    """One optimizer step's sparse updates, as {name: (rows, new values)}; also applied to ``state``."""
    updates = {}
    for table, bias in (("item_emb", "item_bias"), ("user_emb", None)):
        array = state[table]
        rows = np.unique(zipf_rows(rng, array.shape[0], batch, s))
        grad = rng.standard_normal((len(rows), array.shape[1])).astype(np.float32) * lr
        new = (array[rows].astype(np.float32) - grad).astype(array.dtype)
        array[rows] = new
        updates[table] = (rows, new)
        if bias:
            b = state[bias]
            b[rows] -= (rng.standard_normal(len(rows)) * lr).astype(b.dtype)
            updates[bias] = (rows, b[rows])
    for dense in ("mlp.0.weight", "mlp.0.bias", "mlp.1.weight"):  # dense layers: every row, every step
        array = state[dense]
        array -= (rng.standard_normal(array.shape) * lr * 0.1).astype(array.dtype)
        rows = np.arange(array.shape[0])
        updates[dense] = (rows, array.reshape(array.shape[0], -1))
    state["global_step"] = state["global_step"] + 1
    updates["global_step"] = (np.array([0]), state["global_step"].reshape(1))
    return updates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("replica")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=512, help="rows drawn per table per step")
    parser.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent s of row popularity")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--checkpoint-out", help="write one full checkpoint instead of committing")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    with Replica.open(args.replica) as replica:
        state = {name: replica.read_tensor(name) for name in replica.tensor_names}
        start, rows = time.perf_counter(), 0
        for _ in range(args.steps):
            updates = step_updates(rng, state, args.batch, args.zipf)
            rows += sum(len(r) for r, _ in updates.values())
            if not args.checkpoint_out:
                replica.commit(updates)
        seconds = time.perf_counter() - start
        if args.checkpoint_out:
            write_checkpoint(args.checkpoint_out, {n: (a, replica.info(n).dtype) for n, a in state.items()})
            print(f"wrote {args.checkpoint_out}: the model after {args.steps} more steps")
        else:
            print(f"committed {args.steps} steps ({rows:,} rows) in {seconds:.2f} s; head is now {replica.head}")


if __name__ == "__main__":
    main()
