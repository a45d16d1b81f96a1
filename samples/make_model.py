"""Write the sample model: a small recommendation model, deterministic from a seed.

    python samples/make_model.py OUT.safetensors [--scale 1.0] [--seed 0]

Two embedding tables (items float32, users float16), per-item bias, a
two-layer MLP (dense: every row changes at every step) and a step counter.
At scale 1 it is about 6 MiB, small enough for a demo and for CI.
"""

from __future__ import annotations

import argparse

import numpy as np

from deltalog.checkpoint import write_checkpoint


def sample_model(scale: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    items, users, dim = int(40_000 * scale), int(10_000 * scale), 32
    return {
        "item_emb": (rng.standard_normal((items, dim)) * 0.05).astype(np.float32),
        "user_emb": (rng.standard_normal((users, dim)) * 0.05).astype(np.float16),
        "item_bias": np.zeros(items, dtype=np.float32),
        "mlp.0.weight": (rng.standard_normal((128, 2 * dim)) * 0.1).astype(np.float32),
        "mlp.0.bias": np.zeros(128, dtype=np.float32),
        "mlp.1.weight": (rng.standard_normal((1, 128)) * 0.1).astype(np.float32),
        "global_step": np.array(0, dtype=np.int64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output checkpoint (.safetensors, .npz or a directory)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the embedding table sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = sample_model(args.scale, args.seed)
    write_checkpoint(args.out, {name: (array, str(array.dtype)) for name, array in model.items()},
                     metadata={"sample": "deltalog"} if args.out.endswith(".safetensors") else None)
    total = sum(a.nbytes for a in model.values())
    print(f"wrote {args.out}: {len(model)} tensors, {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
