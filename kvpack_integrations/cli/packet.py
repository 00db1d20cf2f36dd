"""`kvpack packet train|divergence|biographies`: the KV Packet adapter's trainer, its held-out score, and
synthetic training data."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InvalidInputError
from ..evaluation.datasets import load_rows
from ..packet.adapter import PacketAdapter
from ..packet.answers import ANSWER_SOURCES
from ..packet.biographies import write_biographies
from ..packet.divergence import held_out_kl
from ..packet.trainer import PASSAGE_ORDERS, TrainOptions, train_adapter
from .common import add_adapter_arg, add_common_args, chosen_adapter, emit, loaded_model, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    packet = sub.add_parser("packet", help="KV Packet adapters").add_subparsers(dest="packet_command", required=True)
    p = packet.add_parser("train", help="train a header/trailer adapter by distillation (resumable)")
    p.add_argument("--data", type=Path, action="append", required=True, help="QA JSONL (repeatable)")
    p.add_argument("--limit", type=positive_int, default=None, help="rows per data file")
    p.add_argument(
        "--output", "--out", dest="out", type=Path, required=True, help="adapter .safetensors (checkpoint: OUTPUT.ckpt)"
    )
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--accumulation", type=positive_int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--header-tokens", type=int, default=8)
    p.add_argument("--trailer-tokens", type=int, default=8)
    p.add_argument("--max-passages", type=positive_int, default=None, help="passages per example")
    p.add_argument(
        "--order",
        choices=PASSAGE_ORDERS,
        default="gold-first",
        help="passages gold first, or in the data's order (supporting ones where evaluation has them)",
    )
    p.add_argument(
        "--max-answer-tokens", type=positive_int, default=16, help="teacher answer tokens distilled per example"
    )
    p.add_argument("--checkpoint-every", type=positive_int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", type=Path, default=None, help="a trained adapter to continue from (fine-tuning)")
    p.add_argument(
        "--answers",
        choices=ANSWER_SOURCES,
        default="teacher",
        help="distil along the teacher's greedy answer, or along the student's own (on-policy; slower)",
    )
    add_common_args(p, store=False)
    p.set_defaults(run=run_train)
    p = packet.add_parser("divergence", help="held-out KL of the packet layout against full attention")
    p.add_argument("--data", type=Path, required=True, help="QA JSONL the adapter was not trained on")
    p.add_argument("--limit", type=positive_int, default=20, help="rows scored")
    add_adapter_arg(p)
    p.add_argument("--max-passages", type=positive_int, default=None, help="passages per row (default: all)")
    p.add_argument("--max-answer-tokens", type=positive_int, default=16)
    add_common_args(p, store=False)
    p.set_defaults(run=run_divergence)
    p = packet.add_parser("biographies", help="write synthetic biography QA rows for training")
    p.add_argument("n", type=positive_int)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--passages", type=positive_int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_biographies)


def run_train(args: argparse.Namespace) -> int:
    rows = [row for path in args.data for row in load_rows(path, args.limit)]
    opts = TrainOptions(
        steps=args.steps,
        accumulation=args.accumulation,
        lr=args.lr,
        header_tokens=args.header_tokens,
        trailer_tokens=args.trailer_tokens,
        max_passages=args.max_passages,
        order=args.order,
        max_answer_tokens=args.max_answer_tokens,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        init=str(args.init) if args.init is not None else None,
        answers=args.answers,
    )
    loaded = loaded_model(args)
    adapter, state = train_adapter(loaded, rows, args.out, opts)
    tail = state.losses[-10:]
    payload = {
        "out": str(args.out),
        "rows": len(rows),
        "steps": state.step,
        "seconds": round(state.seconds, 1),
        "kl_first": state.losses[0] if state.losses else None,
        "kl_last10": sum(tail) / len(tail) if tail else None,
        "header_tokens": adapter.header_tokens,
        "trailer_tokens": adapter.trailer_tokens,
        "model": loaded.name,
    }
    emit(args, payload, f"trained {args.out}: {state.step} steps, KL {payload['kl_first']} -> {payload['kl_last10']}")
    return 0


def run_divergence(args: argparse.Namespace) -> int:
    rows = load_rows(args.data, args.limit)
    loaded = loaded_model(args)
    path = chosen_adapter(args.adapter, loaded)
    if args.adapter != "none" and path is None:
        raise InvalidInputError(f"no adapter is shipped for {loaded.name}: pass --packet-adapter PATH (or 'none')")
    adapter = PacketAdapter.load(path, loaded.fingerprint) if path is not None else None
    scored = held_out_kl(
        loaded, rows, adapter, max_passages=args.max_passages, max_answer_tokens=args.max_answer_tokens
    )
    payload = {"data": args.data.name, "adapter": str(path) if path else "none", "model": loaded.name, **scored}
    emit(args, payload, f"held-out KL {scored['kl']:.4f} over {scored['n']} rows ({payload['adapter']})")
    return 0


def run_biographies(args: argparse.Namespace) -> int:
    path = write_biographies(args.output, args.n, args.passages, args.seed)
    emit(args, {"output": str(path), "n": args.n}, f"wrote {args.n} biography rows to {path}")
    return 0
