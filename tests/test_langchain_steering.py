"""Per-role steering in LangChain and LangGraph: the chat model finds the steering callback among a run's
callbacks and applies the vector of the run's agent role (from `bind` or the run metadata)."""

from __future__ import annotations

from typing import TypedDict

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableLambda
from langgraph.graph import END, START, StateGraph

from kvpack_integrations.errors import InvalidInputError
from kvpack_integrations.langchain import KVPackChatModel, KVPackSteeringCallback
from kvpack_integrations.steering import build_steering_vector

from .support.tiny_models import save_model_dir

FORMAL = [("Certainly, I would be delighted to assist.", "yeah sure"), ("Kindly allow me to explain.", "ok so")]
TERSE = [("No.", "Well, let me think about that for a long while before answering."), ("Yes.", "I suppose so.")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    chat = KVPackChatModel(model=save_model_dir("llama", tmp_path_factory.mktemp("m")), max_tokens=8)
    loaded = chat.loaded_model()
    formal = build_steering_vector(loaded, FORMAL, layers="all", alpha=0.5, name="formal", progress=False)
    terse = build_steering_vector(loaded, TERSE, layers="all", alpha=0.5, name="terse", progress=False)
    return chat, formal, terse


KVPACK = {"invocation_params": {"_type": "kvpack"}}  # what LangChain passes when a KVPackChatModel run starts


def _usage(message) -> dict:
    return message.response_metadata["kvpack"]


def test_role_from_metadata_or_bind(setup) -> None:
    chat, formal, terse = setup
    steer = KVPackSteeringCallback(roles={"reviewer": formal + terse, "writer": terse})
    plain = chat.invoke("Describe the drone.")
    reviewer = chat.invoke("Describe the drone.", config={"callbacks": [steer], "metadata": {"agent_role": "reviewer"}})
    assert _usage(plain)["steering"] == [] and _usage(plain)["exact"] is True
    assert _usage(reviewer)["steering"] == ["formal+terse:1"] and _usage(reviewer)["exact"] is False
    assert reviewer.content != plain.content  # steering every layer of a random model changes the answer
    writer = chat.bind(agent_role="writer").invoke(
        "Describe the drone.", config={"callbacks": [steer], "metadata": {"agent_role": "reviewer"}}
    )
    assert _usage(writer)["steering"] == ["terse:0.5"]  # bind wins over the metadata
    nobody = chat.invoke("Describe the drone.", config={"callbacks": [steer], "metadata": {"agent_role": "critic"}})
    assert _usage(nobody)["steering"] == [] and nobody.content == plain.content
    assert any("role 'critic' has no vector" in n for n in _usage(nobody)["notes"])
    assert [role for role, _ in steer.applied] == ["reviewer", "writer"]
    # the same vector passed directly, and streaming takes the same path
    direct = chat.invoke("Describe the drone.", steering=[formal + terse])
    streamed = "".join(
        c.content
        for c in chat.stream(
            "Describe the drone.", config={"callbacks": [steer], "metadata": {"agent_role": "reviewer"}}
        )
    )
    assert direct.content == reviewer.content == streamed


def test_two_roles_in_a_langgraph_graph_share_one_model(setup) -> None:
    chat, formal, terse = setup
    steer = KVPackSteeringCallback(roles={"writer": formal, "reviewer": terse})

    class State(TypedDict):
        draft: str
        review: str
        usages: list

    def write(state: State) -> dict:
        reply = chat.invoke([HumanMessage("Write one line about the drone.")])
        return {"draft": reply.content, "usages": [*state["usages"], _usage(reply)["steering"]]}

    def review(state: State) -> dict:
        reply = chat.invoke([HumanMessage(f"Review this line: {state['draft']}")])
        return {"review": reply.content, "usages": [*state["usages"], _usage(reply)["steering"]]}

    graph = StateGraph(State)
    graph.add_node("writer", write, metadata={"agent_role": "writer"})
    graph.add_node("reviewer", review, metadata={"agent_role": "reviewer"})
    graph.add_edge(START, "writer")
    graph.add_edge("writer", "reviewer")
    graph.add_edge("reviewer", END)
    out = graph.compile().invoke({"draft": "", "review": "", "usages": []}, config={"callbacks": [steer]})
    assert out["usages"] == [["formal:0.5"], ["terse:0.5"]]
    assert [role for role, _ in steer.applied] == ["writer", "reviewer"]
    # a plain runnable chain passes the role down the same way
    chain = RunnableLambda(lambda q: chat.invoke(q))
    inner = chain.invoke("Hello", config={"callbacks": [steer], "metadata": {"agent_role": "reviewer"}})
    assert _usage(inner)["steering"] == ["terse:0.5"]


def test_bad_steering_input(setup) -> None:
    chat, _, _ = setup
    with pytest.raises(InvalidInputError, match="roles="):
        KVPackSteeringCallback(roles={})
    with pytest.raises(InvalidInputError, match="expected a name and SteeringVector"):
        KVPackSteeringCallback(roles={"writer": "formal.safetensors"})
    with pytest.raises(InvalidInputError, match="steering= takes SteeringVector"):
        chat.invoke("Hi", steering=["formal"])


async def test_async_calls_and_batches_are_steered_by_role(setup) -> None:
    chat, formal, _ = setup
    steer = KVPackSteeringCallback(roles={"writer": formal})
    config = {"callbacks": [steer], "metadata": {"agent_role": "writer"}}
    sync = chat.invoke("Describe the drone.", config=config)
    reply = await chat.ainvoke("Describe the drone.", config=config)
    streamed = "".join([c.content async for c in chat.astream("Describe the drone.", config=config)])
    assert _usage(reply)["steering"] == ["formal:0.5"] and reply.content == sync.content == streamed
    plain = await chat.ainvoke("Describe the drone.")  # the role does not leak into a later run
    assert _usage(plain)["steering"] == [] and plain.content != sync.content
    batch = chat.batch(["Describe the drone."] * 2, config=[config, {}])
    assert [_usage(m)["steering"] for m in batch] == [["formal:0.5"], []]


@pytest.mark.default_model
def test_steered_agents_example_runs(tmp_path, monkeypatch) -> None:
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "notebooks" / "steered_agents.py"
    spec = importlib.util.spec_from_file_location("steered_agents", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "steered_agents", module)  # LangGraph resolves the state's type hints there
    spec.loader.exec_module(module)
    result = module.run(str(tmp_path / "store"), 0.75)
    usage = result["usage"]
    assert usage["support"]["steering"] == ["formal:0.75"] and usage["engineer"]["steering"] == ["defensive:0.75"]
    assert [role for role, _ in result["applied"]] == ["support", "engineer"]
    # one knowledge base: both roles read the same cached pack, so both prompts start from the cache
    assert (
        usage["support"]["cached_tokens"] > 300
        and usage["engineer"]["cached_tokens"] >= usage["support"]["cached_tokens"] - 20
    )


def test_a_run_steers_only_its_own_call(setup) -> None:
    """Each model call takes the steering run its callback started: a stream left half-read does not steer
    the calls made after it; LangChain's cache keys on the steering, so a steered answer is not served
    to an unsteered call; a role with no callback attached says it ran unsteered."""
    from langchain_core.caches import InMemoryCache
    from langchain_core.globals import set_llm_cache

    chat, formal, terse = setup
    steer = KVPackSteeringCallback(roles={"reviewer": formal + terse})
    config = {"callbacks": [steer], "metadata": {"agent_role": "reviewer"}}
    plain = chat.invoke("Describe the drone.")
    stream = chat.stream("Describe the drone.", config=config)
    next(stream)
    meanwhile = chat.invoke("Describe the drone.")
    stream.close()
    assert _usage(meanwhile)["steering"] == [] and meanwhile.content == plain.content
    assert any("no KVPackSteeringCallback" in n for n in _usage(chat.invoke("Hi.", agent_role="reviewer"))["notes"])
    cached = KVPackChatModel(model=chat.model, max_tokens=8, cache=True)
    set_llm_cache(InMemoryCache())
    try:
        steered = cached.invoke("Describe the drone.", config=config)
        unsteered = cached.invoke("Describe the drone.")
        again = cached.invoke("Describe the drone.", config=config)
    finally:
        set_llm_cache(None)
    assert _usage(steered)["steering"] == ["formal+terse:1"] and _usage(unsteered)["steering"] == []
    assert unsteered.content == plain.content and again.content == steered.content


def test_a_call_takes_the_run_its_run_manager_names(setup) -> None:
    """`generate` starts one run per prompt and answers cached prompts without a model call; their runs
    stay open until the batch ends, so a call taking "the oldest open run" would take a cached prompt's.
    A call whose run manager names its run takes that one; without an id, the oldest open one."""
    import contextvars

    from kvpack_integrations.langchain.steering_callback import steering_for_run

    _, formal, terse = setup
    first = KVPackSteeringCallback(roles={"reviewer": formal})
    second = KVPackSteeringCallback(roles={"reviewer": terse})

    def batch() -> None:
        first.on_chat_model_start(None, [], run_id="cached", metadata={"agent_role": "reviewer"}, **KVPACK)
        second.on_chat_model_start(None, [], run_id="called", metadata={"agent_role": "reviewer"}, **KVPACK)
        assert steering_for_run(None, "called")[0] == (terse,)
        assert first.applied == [] and second.applied == [("reviewer", ("terse",))]
        assert steering_for_run(None)[0] == (formal,)  # no id: the oldest open run, the first
        assert steering_for_run(None, "called")[0] == ()  # taken already: nothing left to take

    contextvars.copy_context().run(batch)


def test_concurrent_calls_keep_their_own_roles(setup) -> None:
    """Calls on other threads, or a batch with one config per input, each take their own run's role, also
    after an earlier steered call in the parent context and with a slow handler widening the window."""
    import contextvars
    import threading
    import time

    from langchain_core.callbacks import BaseCallbackHandler

    chat, formal, terse = setup
    steer = KVPackSteeringCallback(roles={"writer": formal, "reviewer": terse})

    class Slow(BaseCallbackHandler):  # a tracer or logger after the steering callback
        def on_chat_model_start(self, *args, **kwargs) -> None:
            time.sleep(0.3)

    chat.invoke("Hi.", config={"callbacks": [steer], "metadata": {"agent_role": "writer"}})  # the parent's run
    got: dict[str, list[str]] = {}

    def call(role: str, extra: list) -> None:
        config = {"callbacks": [steer, *extra], "metadata": {"agent_role": role}}
        got[role] = _usage(chat.invoke("Describe the drone.", config=config))["steering"]

    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(call, "writer", [Slow()])),
        threading.Thread(target=contextvars.copy_context().run, args=(call, "reviewer", [])),
    ]
    threads[0].start()
    time.sleep(0.1)
    threads[1].start()
    for t in threads:
        t.join()
    assert got == {"writer": ["formal:0.5"], "reviewer": ["terse:0.5"]}
    batch = chat.batch(
        ["Describe the drone."] * 2,
        config=[
            {"callbacks": [steer, Slow()], "metadata": {"agent_role": "writer"}},
            {"callbacks": [steer], "metadata": {"agent_role": "reviewer"}},
        ],
    )
    assert [_usage(r)["steering"] for r in batch] == [["formal:0.5"], ["terse:0.5"]]


def test_another_models_half_read_stream_steers_no_later_call(setup) -> None:
    """Another chat model's run holding a role (its stream half-read) is not a KVPack run: a KVPack call
    made meanwhile with no steering callback attached, by `invoke` or by `stream`, runs unsteered."""
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    chat, formal, _ = setup
    steer = KVPackSteeringCallback(roles={"reviewer": formal})
    plain = chat.invoke("Describe the drone.")
    other = GenericFakeChatModel(messages=iter([AIMessage(content="one two three four")]))
    half_read = other.stream("hi", config={"callbacks": [steer], "metadata": {"agent_role": "reviewer"}})
    next(half_read)
    invoked = chat.invoke("Describe the drone.")
    streamed = list(chat.stream("Describe the drone."))
    half_read.close()
    assert _usage(invoked)["steering"] == [] and invoked.content == plain.content
    assert _usage(streamed[-1])["steering"] == [] and "".join(c.content for c in streamed) == plain.content
    assert steer.applied == []


def test_a_steered_answer_is_cached_under_its_own_steering(setup) -> None:
    """LangChain keys its cache before the call: the key takes the same run as the call, so a steered
    answer is never served to an unsteered call, whatever other run is open meanwhile (another
    model's, or a KVPack run not yet taken)."""
    import contextvars

    from langchain_core.caches import InMemoryCache
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    chat, formal, _ = setup
    steer = KVPackSteeringCallback(roles={"reviewer": formal})
    reviewer = {"callbacks": [steer], "metadata": {"agent_role": "reviewer"}}
    plain = chat.invoke("Describe the drone.")

    def other_model_open() -> tuple[object, object]:
        cached = KVPackChatModel(model=chat.model, max_tokens=8, cache=InMemoryCache())
        other = GenericFakeChatModel(messages=iter([AIMessage(content="one two three four")]))
        half_read = other.stream("hi", config={"callbacks": [steer]})  # no role: an unsteered run
        next(half_read)
        steered = cached.invoke("Describe the drone.", config=reviewer)
        half_read.close()
        return steered, cached.invoke("Describe the drone.")

    def kvpack_run_open() -> tuple[object, object]:
        cached = KVPackChatModel(model=chat.model, max_tokens=8, cache=InMemoryCache())
        steer.on_chat_model_start(None, [], run_id="open", metadata={}, **KVPACK)  # unsteered, not yet taken
        steered = cached.invoke("Describe the drone.", config=reviewer)
        steer.on_llm_end(None, run_id="open")
        return steered, cached.invoke("Describe the drone.")

    for case in (other_model_open, kvpack_run_open):
        steered, unsteered = contextvars.copy_context().run(case)
        assert _usage(steered)["steering"] == ["formal:0.5"] and steered.content != plain.content, case.__name__
        assert _usage(unsteered)["steering"] == [] and unsteered.content == plain.content, case.__name__
