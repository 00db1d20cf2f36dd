"""Layer 5: knowledge (fact files and stored knowledge packs)."""

from .facts import clean_facts, read_facts
from .packs import BuildReport, KnowledgePrompt, build_pack, knowledge_prompt, load_pack

__all__ = ["BuildReport", "KnowledgePrompt", "build_pack", "clean_facts", "knowledge_prompt", "load_pack", "read_facts"]
