"""LangChain's standard test suites (langchain-tests 1.1.x) against the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from kvpack_integrations import PackStore, build_pack, load_model
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.errors import InvalidInputError
from kvpack_integrations.langchain import KVPackChatModel, KVPackRetriever

pytestmark = pytest.mark.default_model

SUITE_FACTS = [
    "The Aurora X2 is a survey drone made by Norhaven Labs.",
    "Norhaven Labs is based in the town of Kelmark.",
    "Quill Energy produces the Tessel-9 battery.",
    "The Tessel-9 battery powers the Aurora X2.",
    "Ilsa Varno founded Norhaven Labs in 2011.",
]
SMALL_MODEL = "SmolLM2-135M-Instruct is a 135M-parameter model: "
_cut_structured_output = pytest.mark.xfail(
    raises=InvalidInputError,
    reason=SMALL_MODEL + "it never closes the joke's strings within max_tokens; the cut output is refused, not parsed",
)


class _KVPackChatSuite:
    """What both chat-model suites need to know about KVPackChatModel."""

    @property
    def chat_model_class(self) -> type[KVPackChatModel]:
        return KVPackChatModel

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True


class TestKVPackChatModelUnit(_KVPackChatSuite, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict:
        return {}  # the suite adds temperature, max_tokens, stop, timeout, max_retries


class TestKVPackChatModelIntegration(_KVPackChatSuite, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict:
        return {"max_tokens": 48, "temperature": 0}

    @pytest.mark.xfail(reason=SMALL_MODEL + "with tool_choice='auto' it answers in prose instead of calling the tool")
    def test_agent_loop(self, model) -> None:  # type: ignore[no-untyped-def]
        super().test_agent_loop(model)

    # The joke these tests ask for never ends in a closed string within max_tokens (not at 160 either: the
    # model repeats itself); past the budget the engine would complete the JSON with placeholders that
    # validate, so with_structured_output refuses the cut output. raises= keeps any other failure a failure.
    @_cut_structured_output
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(self, model, schema_type) -> None:  # type: ignore[no-untyped-def]
        super().test_structured_output(model, schema_type)

    @_cut_structured_output
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(self, model, schema_type) -> None:  # type: ignore[no-untyped-def]
        await super().test_structured_output_async(model, schema_type)

    @_cut_structured_output
    def test_structured_output_pydantic_2_v1(self, model) -> None:  # type: ignore[no-untyped-def]
        super().test_structured_output_pydantic_2_v1(model)

    @_cut_structured_output
    def test_structured_output_optional_param(self, model) -> None:  # type: ignore[no-untyped-def]
        super().test_structured_output_optional_param(model)

    @_cut_structured_output
    def test_json_mode(self, model) -> None:  # type: ignore[no-untyped-def]
        super().test_json_mode(model)


@pytest.fixture(scope="module")
def suite_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("suite-store")
    loaded = load_model()
    build_pack(loaded, RadixTree(loaded.fingerprint), PackStore(root), "suite", SUITE_FACTS)
    return root


class TestKVPackRetriever(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def _store(self, suite_store: Path) -> None:
        self._root = suite_store

    @property
    def retriever_constructor(self) -> type[KVPackRetriever]:
        return KVPackRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"kb": "suite", "store": str(self._root)}

    @property
    def retriever_query_example(self) -> str:
        return "Which battery powers the Aurora X2?"
