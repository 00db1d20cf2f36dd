"""Packets: composing independently cached documents (keys re-rotated, nothing recomputed) equals the
student's single block-diagonal pass, which is what the adapter is trained through."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvpack_integrations.composition.cache_ops import empty_cache, forward
from kvpack_integrations.composition.rope import rope_spec
from kvpack_integrations.errors import FingerprintMismatchError, InvalidInputError
from kvpack_integrations.packet import PacketAdapter
from kvpack_integrations.packet.compose import cache_packet, compose_packets
from kvpack_integrations.packet.layout import packet_prompt
from kvpack_integrations.packet.student import student_logits, student_pass
from kvpack_integrations.prompts.knowledge import KnowledgeFormat

from .conftest import FACTS, QUESTION
from .support.tiny_models import make_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3"])
def test_packet_composition_equals_the_student_pass(family: str) -> None:
    loaded = make_model(family)
    adapter = PacketAdapter.initial(loaded, header_tokens=3, trailer_tokens=2)
    prompt = packet_prompt(loaded.tokenizer, FACTS[:3], QUESTION, KnowledgeFormat())
    assert prompt.text_ids()[: len(prompt.preamble)] == list(prompt.preamble) and len(prompt.documents) == 3
    preamble = empty_cache(loaded)
    forward(loaded, preamble, prompt.preamble)
    packets = [cache_packet(loaded, adapter, d) for d in prompt.documents]
    composed = compose_packets(loaded, preamble, packets, rope_spec(loaded))
    assert composed.get_seq_length() == len(prompt.preamble) + sum(len(d) + 5 for d in prompt.documents)
    logits = forward(loaded, composed, prompt.tail)
    inputs = student_pass(loaded, prompt, [], adapter.header, adapter.trailer)
    with torch.no_grad():
        student = student_logits(loaded, inputs)[-1].float()
    torch.testing.assert_close(logits, student, atol=2e-4, rtol=1e-4)
    # the documents really are isolated: without the block mask the last logits differ
    with torch.no_grad():
        full = loaded.model(inputs_embeds=inputs.inputs_embeds).logits[0, -1].float()
    assert not torch.allclose(full, student, atol=1e-3)


def test_the_packet_prompt_is_the_rendered_prompt() -> None:
    """Llama 3.1's template trims the system message, so a fact's trailing whitespace survives only when
    the fact is not last: the documents are cut from the rendering itself, and full recompute prefills
    exactly what the product renders. An empty document is refused by its index."""
    from kvpack_integrations.knowledge.packs import knowledge_prompt

    loaded = make_model("llama")
    facts = [FACTS[0] + "\n", FACTS[1]]
    split = packet_prompt(loaded.tokenizer, facts, QUESTION, KnowledgeFormat())
    assert split.text_ids() == list(knowledge_prompt(loaded.tokenizer, facts, QUESTION, KnowledgeFormat()).token_ids)
    with pytest.raises(InvalidInputError, match="document 1 is empty"):
        packet_prompt(loaded.tokenizer, [FACTS[0], " "], QUESTION, KnowledgeFormat())


def test_adapter_files_and_refusals(tmp_path) -> None:
    loaded = make_model("llama")
    adapter = PacketAdapter.initial(loaded)
    assert adapter.header.shape == (8, 64) and adapter.trailer.shape == (8, 64)
    back = PacketAdapter.load(adapter.save(tmp_path / "a.safetensors"), loaded.fingerprint)
    assert torch.equal(back.header, adapter.header) and torch.equal(back.trailer, adapter.trailer)
    with pytest.raises(FingerprintMismatchError, match="built for another model"):
        PacketAdapter.load(tmp_path / "a.safetensors", make_model("qwen2").fingerprint)
    with pytest.raises(FingerprintMismatchError):
        cache_packet(make_model("llama", seed=1), adapter, [1, 2, 3])
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        PacketAdapter(adapter.header * float("nan"), adapter.trailer, adapter.fingerprint)
    (tmp_path / "junk.safetensors").write_text("junk")
    with pytest.raises(InvalidInputError, match="not a readable packet adapter"):
        PacketAdapter.load(tmp_path / "junk.safetensors")
    from kvpack_integrations.segments.tensor_files import save_tensor_file

    for steps in ("many", "-3"):  # an edited file: named, not a bare ValueError from int()
        tampered = save_tensor_file(
            tmp_path / "t.safetensors",
            {"header": adapter.header, "trailer": adapter.trailer},
            file_format="kvpack-packet-adapter/1",
            fingerprint=loaded.fingerprint,
            metadata={"trained_steps": steps},
        )
        with pytest.raises(InvalidInputError, match=f"{tampered}: trained_steps '{steps}' is not a whole number"):
            PacketAdapter.load(tampered)


def test_training_lowers_the_kl_and_resumes_from_its_checkpoint(tmp_path) -> None:
    from kvpack_integrations.evaluation.datasets import Passage, QARow
    from kvpack_integrations.packet.trainer import TrainOptions, train_adapter

    loaded = make_model("llama")
    rows = [
        QARow(QUESTION, ("Quill Energy",), tuple(Passage(f"T{i}", f, i == 2) for i, f in enumerate(FACTS[:4]))),
        QARow("How long does the Aurora X2 fly?", ("48 minutes",), tuple(Passage("A", f, True) for f in FACTS[1:3])),
    ]
    opts = TrainOptions(steps=12, accumulation=2, lr=0.05, header_tokens=2, trailer_tokens=2, checkpoint_every=4)
    out = tmp_path / "adapter.safetensors"
    adapter, state = train_adapter(loaded, rows, out, opts, progress=False)
    assert out.is_file() and adapter.trained_steps == 12 and len(state.losses) == 12
    assert sum(state.losses[-3:]) < sum(state.losses[:3])  # distillation makes progress on what it sees
    # a finished run is extended by resuming it with more steps; other changed options are refused
    longer, more = train_adapter(loaded, rows, out, TrainOptions(**{**opts.__dict__, "steps": 14}), progress=False)
    assert longer.trained_steps == 14 and more.losses[:12] == state.losses and len(more.losses) == 14
    with pytest.raises(InvalidInputError, match="other options"):
        train_adapter(loaded, rows, out, TrainOptions(**{**opts.__dict__, "lr": 0.01}), progress=False)


def _trained_checkpoint(tmp_path):
    """A 4-step run with a checkpoint at step 4, and a `resume(**option changes)` of it."""
    from kvpack_integrations.evaluation.datasets import Passage, QARow
    from kvpack_integrations.packet.trainer import TrainOptions, train_adapter

    loaded = make_model("llama")
    rows = [QARow(QUESTION, ("Quill Energy",), tuple(Passage(f"T{i}", f, i == 2) for i, f in enumerate(FACTS[:3])))]
    opts = TrainOptions(steps=4, accumulation=1, lr=0.05, header_tokens=2, trailer_tokens=2, checkpoint_every=2)
    out = tmp_path / "adapter.safetensors"
    train_adapter(loaded, rows, out, opts, progress=False)

    def resume(fmt: KnowledgeFormat | None = None, **changes):
        return train_adapter(loaded, rows, out, TrainOptions(**{**opts.__dict__, **changes}), fmt=fmt, progress=False)

    return tmp_path / "adapter.safetensors.ckpt", resume


def test_a_resume_below_the_checkpoint_step_or_in_another_format_is_refused(tmp_path) -> None:
    """A checkpoint at step 4 resumed with steps=2 returned the 4-step adapter as if it were the 2-step one,
    and one written for another knowledge format resumed as if nothing had changed."""
    _, resume = _trained_checkpoint(tmp_path)
    with pytest.raises(InvalidInputError, match="the checkpoint is at step 4; pass --steps >= 4"):
        resume(steps=2)
    with pytest.raises(InvalidInputError, match="another knowledge format"):
        resume(fmt=KnowledgeFormat(separator="\n"))
    adapter, state = resume(steps=5)  # extended, in the format it was written for
    assert adapter.trained_steps == 5 and state.step == 5


def test_a_damaged_or_foreign_checkpoint_is_refused_by_name(tmp_path) -> None:
    """A half-written or foreign checkpoint raised raw pickle errors, and a pickle ran its code on load; each
    is refused naming the file, and a checkpoint is read without running pickled code."""
    import io

    ckpt, resume = _trained_checkpoint(tmp_path)
    good = ckpt.read_bytes()
    saved = torch.load(ckpt, weights_only=True)
    saved["state"]["bogus"] = 1
    torch.save(saved, ckpt)
    with pytest.raises(InvalidInputError, match=f"{ckpt} holds a damaged training state.*remove it to start over"):
        resume()
    torch.save({"fingerprint": 1, "options": {}}, ckpt)
    with pytest.raises(InvalidInputError, match="missing or malformed: fingerprint, header, trailer, optimizer"):
        resume()
    ckpt.write_bytes(good[: len(good) // 2])
    with pytest.raises(InvalidInputError, match=f"{ckpt} is not a readable training checkpoint"):
        resume()
    marker = tmp_path / "pickle-ran"

    class Foreign:
        def __reduce__(self):
            return (io.open, (str(marker), "w"))

    torch.save({"options": Foreign()}, ckpt)
    with pytest.raises(InvalidInputError, match="is not a readable training checkpoint"):
        resume()
    assert not marker.exists()  # read with weights_only: the pickled call never ran
    ckpt.write_bytes(good)
    assert resume(steps=5)[1].step == 5  # the intact checkpoint still resumes


def test_training_refuses_a_window_without_room_for_the_answer(tmp_path) -> None:
    """The context check counted the prompt and soft tokens but not the answer both passes run after it."""
    from kvpack_integrations.errors import ContextTooLongError
    from kvpack_integrations.evaluation.datasets import Passage, QARow
    from kvpack_integrations.packet.trainer import TrainOptions, train_adapter

    facts = FACTS[:2]
    row = QARow(QUESTION, ("Quill Energy",), tuple(Passage("", f, i == 0) for i, f in enumerate(facts)))
    tokenizer = make_model("llama").tokenizer
    prompt_tokens = len(packet_prompt(tokenizer, facts, QUESTION, KnowledgeFormat()).text_ids()) + 2 * 4
    loaded = make_model("llama", max_positions=prompt_tokens + 4)
    opts = TrainOptions(steps=1, accumulation=1, header_tokens=2, trailer_tokens=2, max_answer_tokens=16)
    with pytest.raises(ContextTooLongError, match="16 new tokens were asked for"):
        train_adapter(loaded, [row], tmp_path / "adapter.safetensors", opts, progress=False)
    assert not list(tmp_path.iterdir())  # refused before the first step: no checkpoint written


def test_training_passages_in_the_data_order() -> None:
    from kvpack_integrations.evaluation.datasets import Passage, QARow
    from kvpack_integrations.packet.trainer import TrainOptions, _facts, train_adapter

    names = ["d0", "g1", "d2", "d3", "g4", "d5"]
    row = QARow(QUESTION, ("x",), tuple(Passage("", n, n.startswith("g")) for n in names))
    assert _facts(row, None, "data") == names and _facts(row, 9, "data") == names
    assert _facts(row, 4, "data") == ["d0", "g1", "d2", "g4"]  # every supporting passage, kept in place
    assert _facts(row, 1, "data") == ["g1"]
    assert _facts(row, 4, "gold-first") == ["g1", "g4", "d0", "d2"]
    with pytest.raises(InvalidInputError, match="unknown passage order"):
        train_adapter(make_model("llama"), [row], "unused.safetensors", TrainOptions(order="random"))
    for bad, message in (
        (TrainOptions(checkpoint_every=0), "checkpoint_every and max_answer_tokens must be >= 1, got 0"),
        (TrainOptions(max_answer_tokens=0), "checkpoint_every and max_answer_tokens must be >= 1, got 10 and 0"),
        (TrainOptions(max_passages=0), "max_passages must be >= 1"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            train_adapter(make_model("llama"), [row], "unused.safetensors", bad)


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch) -> None:
    from kvpack_integrations.evaluation.datasets import Passage, QARow
    from kvpack_integrations.packet import trainer

    loaded = make_model("llama")
    rows = [QARow(QUESTION, ("Quill Energy",), tuple(Passage(f"T{i}", f, i == 2) for i, f in enumerate(FACTS[:3])))]
    opts = trainer.TrainOptions(steps=6, accumulation=1, lr=0.05, header_tokens=2, trailer_tokens=2, checkpoint_every=3)
    whole, whole_state = trainer.train_adapter(loaded, rows, tmp_path / "whole.safetensors", opts, progress=False)
    real = trainer._checkpoint

    def crash_after_first(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_adapter(loaded, rows, tmp_path / "split.safetensors", opts, progress=False)
    monkeypatch.setattr(trainer, "_checkpoint", real)
    split, split_state = trainer.train_adapter(loaded, rows, tmp_path / "split.safetensors", opts, progress=False)
    assert split_state.step == 6 and split_state.losses == pytest.approx(whole_state.losses, rel=1e-5)
    torch.testing.assert_close(split.header, whole.header)


def test_training_continues_from_a_trained_adapter(tmp_path) -> None:
    from kvpack_integrations.evaluation.datasets import Passage, QARow
    from kvpack_integrations.packet.trainer import TrainOptions, train_adapter

    loaded = make_model("llama")
    rows = [QARow(QUESTION, ("Quill Energy",), tuple(Passage(f"T{i}", f, i == 2) for i, f in enumerate(FACTS[:3])))]
    opts = TrainOptions(steps=8, accumulation=1, lr=0.05, header_tokens=2, trailer_tokens=2, checkpoint_every=4)
    _, first_state = train_adapter(loaded, rows, tmp_path / "first.safetensors", opts, progress=False)
    init = TrainOptions(**{**opts.__dict__, "steps": 2, "init": str(tmp_path / "first.safetensors")})
    tuned, tuned_state = train_adapter(loaded, rows, tmp_path / "tuned.safetensors", init, progress=False)
    # it starts where the first run ended, not from random soft tokens, and counts both runs' steps
    # (random soft tokens would start at first_state.losses[0] again)
    assert tuned_state.losses[0] < min(first_state.losses)
    assert tuned.trained_steps == 10
    with pytest.raises(InvalidInputError, match="does not exist"):
        missing = TrainOptions(init=str(tmp_path / "nope.safetensors"))
        train_adapter(loaded, rows, tmp_path / "x.safetensors", missing, progress=False)
    wider = TrainOptions(**{**init.__dict__, "header_tokens": 3})
    with pytest.raises(InvalidInputError, match="2 header and 2 trailer tokens"):
        train_adapter(loaded, rows, tmp_path / "y.safetensors", wider, progress=False)
    with pytest.raises(FingerprintMismatchError):
        train_adapter(make_model("qwen2"), rows, tmp_path / "z.safetensors", init, progress=False)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_held_out_kl_ranks_a_trained_adapter_above_an_untrained_one(tmp_path) -> None:
    from kvpack_integrations.evaluation.datasets import Passage, QARow
    from kvpack_integrations.packet.divergence import held_out_kl
    from kvpack_integrations.packet.trainer import TrainOptions, train_adapter

    loaded = make_model("llama")
    rows = [QARow(QUESTION, ("Quill Energy",), tuple(Passage(f"T{i}", f, i == 2) for i, f in enumerate(FACTS[:3])))]
    opts = TrainOptions(steps=8, accumulation=1, lr=0.05, header_tokens=2, trailer_tokens=2, checkpoint_every=8)
    trained, state = train_adapter(loaded, rows, tmp_path / "a.safetensors", opts, progress=False)
    untrained = PacketAdapter.initial(loaded, 2, 2)
    # max_passages lays the passages out gold first, as the trainer does (otherwise in the data's order)
    before = held_out_kl(loaded, rows, untrained, max_passages=3, progress=False)
    after = held_out_kl(loaded, rows, trained, max_passages=3, progress=False)
    # the score is the trainer's loss without gradients: its first step saw the untrained adapter on this row
    assert before["kl"] == pytest.approx(state.losses[0], rel=1e-4)
    assert after["kl"] < before["kl"] and after["n"] == 1
    assert held_out_kl(loaded, rows, None, progress=False)["kl"] > 0  # plain caches, no soft tokens
    with pytest.raises(InvalidInputError, match="no rows"):
        held_out_kl(loaded, [], trained, progress=False)
    with pytest.raises(FingerprintMismatchError):
        held_out_kl(make_model("qwen2"), rows, trained, progress=False)


def test_adapter_id_follows_every_change_of_the_soft_tokens() -> None:
    """The id names an adapter's packets: it must change with the soft tokens however they are written
    (in place, through `.data`, through a numpy view, or as new tensors), and keep the store's names."""
    import hashlib

    from kvpack_integrations.packet.store import adapter_id

    from .support.tiny_models import make_model

    adapter = PacketAdapter.initial(make_model("llama"), 2, 2)
    raw = adapter.header.float().numpy().tobytes() + adapter.trailer.float().numpy().tobytes()
    seen = [adapter_id(adapter)]
    assert seen[0] == hashlib.sha256(raw).hexdigest()[:12] and adapter_id(None) == "plain"
    with torch.no_grad():
        adapter.trailer[0, 0] += 1.0  # a training step, in place
    seen.append(adapter_id(adapter))
    adapter.header.data[0, 0] += 1.0  # no version bump
    seen.append(adapter_id(adapter))
    adapter.trailer.numpy()[1, 1] += 1.0  # through a shared numpy array
    seen.append(adapter_id(adapter))
    adapter.header = adapter.header.clone() * 2  # new tensors
    seen.append(adapter_id(adapter))
    assert len(set(seen)) == len(seen)


def test_on_policy_answers_are_the_products_and_the_teacher_scores_them() -> None:
    from kvpack_integrations.composition.cache_ops import empty_cache
    from kvpack_integrations.composition.rope import rope_spec
    from kvpack_integrations.packet.answers import student_answer, teacher_log_probs
    from kvpack_integrations.packet.student import student_logits, student_pass
    from kvpack_integrations.packet.trainer import Teacher

    loaded = make_model("llama")
    prompt = packet_prompt(loaded.tokenizer, FACTS[:3], QUESTION, KnowledgeFormat())
    adapter = PacketAdapter.initial(loaded, 2, 2, seed=3)
    answer = student_answer(loaded, prompt, adapter, rope_spec(loaded), 6)
    assert 1 <= len(answer) <= 6
    # the composed caches decode what the training layout (block mask, no cache) predicts at every step
    with torch.no_grad():
        logits = student_logits(
            loaded, student_pass(loaded, prompt, answer, adapter.header, adapter.trailer), answer_only=True
        )
    assert logits.argmax(-1).tolist() == answer
    # scoring an answer teacher-forced gives the distributions the teacher's own decode drew from
    text_ids = prompt.text_ids()
    own, drawn = Teacher(loaded, 6)(text_ids)
    torch.testing.assert_close(teacher_log_probs(loaded, text_ids, own), drawn, atol=1e-4, rtol=1e-4)
    assert teacher_log_probs(loaded, text_ids, answer).shape == (len(answer), drawn.shape[1])
    assert empty_cache(loaded).get_seq_length() == 0


def test_on_policy_training_distils_along_the_students_answers(tmp_path, monkeypatch) -> None:
    from kvpack_integrations.evaluation.datasets import Passage, QARow
    from kvpack_integrations.packet import trainer
    from kvpack_integrations.packet.trainer import Teacher, TrainOptions, train_adapter

    loaded = make_model("llama")
    rows = [QARow(QUESTION, ("Quill Energy",), tuple(Passage(f"T{i}", f, i == 2) for i, f in enumerate(FACTS[:3])))]
    opts = TrainOptions(
        steps=6, accumulation=1, lr=0.05, header_tokens=2, trailer_tokens=2, checkpoint_every=3, answers="student"
    )
    calls: list[tuple[torch.Tensor, list[int]]] = []
    real = trainer.student_answer

    def spy(loaded_, prompt, adapter, spec, max_tokens):  # type: ignore[no-untyped-def]
        calls.append((adapter.header.clone(), real(loaded_, prompt, adapter, spec, max_tokens)))
        return calls[-1][1]

    monkeypatch.setattr(trainer, "student_answer", spy)
    adapter, _ = train_adapter(loaded, rows, tmp_path / "on.safetensors", opts, progress=False)
    assert len(calls) == 6 and adapter.trained_steps == 6
    # each example decodes with the adapter as trained so far, not the teacher's answer
    assert all(not torch.equal(before[0], after[0]) for before, after in itertools.pairwise(calls))
    teacher_answer, _ = Teacher(loaded, opts.max_answer_tokens)(
        packet_prompt(loaded.tokenizer, FACTS[:3], QUESTION, KnowledgeFormat()).text_ids()
    )
    assert calls[0][1] != teacher_answer
    # along a fixed student answer, the KL to the teacher's scores of it falls: gradients reach the soft tokens
    monkeypatch.setattr(trainer, "student_answer", lambda *a: calls[0][1])
    _, state = train_adapter(loaded, rows, tmp_path / "fixed.safetensors", opts, progress=False)
    assert sum(state.losses[-2:]) < sum(state.losses[:2])
    with pytest.raises(InvalidInputError, match="other options"):  # a run keeps its answer source
        train_adapter(
            loaded, rows, tmp_path / "on.safetensors", TrainOptions(**{**opts.__dict__, "answers": "teacher"})
        )
    with pytest.raises(InvalidInputError, match="unknown answer source 'mine'"):
        train_adapter(loaded, rows, tmp_path / "x.safetensors", TrainOptions(answers="mine"), progress=False)
