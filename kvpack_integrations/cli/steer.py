"""`kvpack steer build PAIRS.jsonl --out FILE [--layers mid] [--alpha A]`: a steering vector from contrastive pairs.

`--steer FILE[:ALPHA]` (on `kvpack ask`) loads one back; ALPHA overrides the alpha saved in the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InvalidInputError
from ..runtime.fingerprint import Fingerprint
from ..runtime.paths import usable_file
from ..steering.build import build_steering_vector, load_pairs
from ..steering.vector import SteeringVector, check_alpha, parse_layers
from .common import add_common_args, emit, loaded_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    steer = sub.add_parser("steer", help="steering vectors").add_subparsers(dest="steer_command", required=True)
    p = steer.add_parser("build", help="build a steering vector from {positive, negative} JSONL pairs")
    p.add_argument("pairs", type=Path, help="JSONL rows {positive, negative}")
    p.add_argument(
        "--output", "--out", dest="out", required=True, type=Path, help="where to write the .safetensors vector"
    )
    p.add_argument("--layers", default="mid", help="early, mid, late, all, a fraction range like 0.3-0.7, or 4,5,6")
    p.add_argument("--alpha", type=float, default=1.0, help="default strength saved with the vector")
    p.add_argument("--name", default=None, help="name shown in usage reports (default: the file stem)")
    add_common_args(p, store=False)
    p.set_defaults(run=run_build)


def _layers(spec: str) -> str | list[int]:
    if spec.replace(",", "").replace(" ", "").isdigit():
        return [int(x) for x in spec.split(",") if x.strip()]
    return spec


def run_build(args: argparse.Namespace) -> int:
    # bad input fails before the model loads: the pairs, where the vector goes, the layers and alpha
    pairs = load_pairs(args.pairs)
    out = usable_file(args.out, "steering vector file")
    layers = _layers(args.layers)
    parse_layers(layers)  # indices past the model's depth are refused once it loads, before any pair runs
    check_alpha(args.alpha)
    loaded = loaded_model(args)
    name = args.name or out.stem
    vector = build_steering_vector(loaded, pairs, layers=layers, alpha=args.alpha, name=name)
    vector.save(out)
    payload = {
        "out": str(out),
        "name": name,
        "pairs": len(pairs),
        "layers": list(vector.layers),
        "alpha": vector.alpha,
        "model": loaded.name,
        "delta_norm_per_layer": [round(float(x), 4) for x in vector.deltas.flatten(1).norm(dim=1)],
    }
    emit(args, payload, f"wrote {out}: {len(pairs)} pairs, layers {vector.layers[0]}-{vector.layers[-1]}")
    return 0


def parse_steer_option(spec: str, fingerprint: Fingerprint) -> SteeringVector:
    """`FILE` or `FILE:ALPHA` -> the saved vector for this model, with ALPHA if given."""
    path, alpha = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            alpha = float(tail)
            path = head
        except ValueError:
            pass  # a colon inside the path
    if not Path(path).is_file():
        raise InvalidInputError(f"--steer {spec!r}: no steering vector file {path!r}")
    vector = SteeringVector.load(path, fingerprint)
    return vector.with_alpha(alpha) if alpha is not None else vector
