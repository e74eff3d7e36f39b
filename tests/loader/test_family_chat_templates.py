"""Chat templates of Qwen3, Gemma 3, Phi-4-mini and GPT-OSS rendered by lmgen exactly as transformers renders them.

The templates are the models' own, kept verbatim in tests/loader/chat_templates/:
- qwen3.jinja: Qwen/Qwen3-0.6B tokenizer_config.json, as llama.cpp copied it from the Hub
  (models/templates/Qwen-Qwen3-0.6B.jinja);
- gemma3.jinja: google/gemma-3-1b-it tokenizer_config.json (the Gemma 3 "-it" models share it), as
  quoted by the Berkeley function-calling leaderboard's Gemma handler;
- phi4-mini.jinja: microsoft/Phi-4-mini-instruct tokenizer_config.json, as quoted by guidance's
  chat-template registry (and identically by the leaderboard's Phi handler);
- gpt-oss.jinja: openai/gpt-oss-120b chat_template.jinja (the harmony format; gpt-oss-20b ships the same),
  as llama.cpp copied it from the Hub (models/templates/openai-gpt-oss-120b.jinja).
Qwen3-MoE (Qwen3-30B-A3B) ships Qwen3's template: the qwen3 cases cover it.
Each is written into a test checkpoint (tokenizer.json with the family's special tokens,
tokenizer_config.json with its bos/eos and the template), and both lmgen and transformers'
AutoTokenizer load that folder; text and ids must be identical.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmgen.loader.tokenizer import ChatTemplateError, Tokenizer
from tokenizer_fixtures import Backends, build_gemma3, build_gpt_oss, build_phi4_mini, build_qwen3

transformers = pytest.importorskip("transformers")

BUILDERS = {"qwen3": build_qwen3, "gemma3": build_gemma3, "phi4-mini": build_phi4_mini, "gpt-oss": build_gpt_oss}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root, backends = tmp_path_factory.mktemp("family-templates"), Backends()
    return {name: build(root / name, backends) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def lm(checkpoints: dict[str, Path]) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_pretrained(path) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def hf(checkpoints: dict[str, Path]) -> dict:
    return {name: transformers.AutoTokenizer.from_pretrained(str(path)) for name, path in checkpoints.items()}


SYSTEM = {"role": "system", "content": "You are a concise assistant. Réponds en français si on te parle français."}
USER = {"role": "user", "content": "Quel temps fait-il à Paris ? 🌦"}
ASSISTANT = {"role": "assistant", "content": "  Il pleut, désolé.  "}
USER_2 = {"role": "user", "content": "And in Tokyo 東京?\n"}
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "« Paris »"}},
                       "required": ["city"]},
    },
}]

# Qwen3: reasoning in history, written in the content or in reasoning_content, and a tool round trip.
THINKING_ASSISTANT = {"role": "assistant", "content": "<think>\nRain is likely.\n</think>\n\nIl pleut."}
REASONING_ASSISTANT = {"role": "assistant", "content": "Il pleut.", "reasoning_content": "\nCheck the forecast.\n"}
TOOL_ROUND_TRIP = [
    SYSTEM, USER,
    {"role": "assistant", "content": "<think>\nI need the tool.\n</think>\n\n",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp": 12, "sky": "pluie"}'},
    {"role": "tool", "content": '{"humidity": 0.9}'},
]

# GPT-OSS: reasoning in a "thinking" field, kept in the last turn and beside a tool call no final answer follows.
HARMONY_TOOL_CALL = {"role": "assistant", "thinking": "I need the tool.", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
HARMONY_TOOL_RESULT = {"role": "tool", "content": '{"temp": 12, "sky": "pluie"}'}
HARMONY_THINKING = {"role": "assistant", "thinking": "Check the forecast.", "content": "Il pleut."}

# Phi-4-mini takes its tools as a JSON string on the system message.
PHI4_TOOLS_SYSTEM = {**SYSTEM, "tools": json.dumps([tool["function"] for tool in TOOLS])}

COMMON_CASES = {
    "system_user": dict(messages=[SYSTEM, USER]),
    "system_user_prompt": dict(messages=[SYSTEM, USER], add_generation_prompt=True),
    "user_prompt": dict(messages=[USER], add_generation_prompt=True),
    "multi_turn": dict(messages=[SYSTEM, USER, ASSISTANT, USER_2]),
    "multi_turn_prompt": dict(messages=[SYSTEM, USER, ASSISTANT, USER_2], add_generation_prompt=True),
    "ends_with_assistant": dict(messages=[USER, ASSISTANT]),
    "continue_final": dict(messages=[USER, {"role": "assistant", "content": "The answer is"}],
                           continue_final_message=True),
}
FAMILY_CASES = {
    "qwen3": {
        "thinking_off": dict(messages=[SYSTEM, USER], add_generation_prompt=True, enable_thinking=False),
        "thinking_on": dict(messages=[SYSTEM, USER], add_generation_prompt=True, enable_thinking=True),
        "multi_turn_thinking_off": dict(messages=[USER, ASSISTANT, USER_2], add_generation_prompt=True,
                                        enable_thinking=False),
        # Reasoning of earlier turns is dropped; the turn after the last query keeps it.
        "think_in_history": dict(messages=[USER, THINKING_ASSISTANT, USER_2], add_generation_prompt=True),
        "think_in_last_turn": dict(messages=[SYSTEM, USER, THINKING_ASSISTANT]),
        "reasoning_content_last_turn": dict(messages=[USER, REASONING_ASSISTANT]),
        "reasoning_content_in_history": dict(messages=[USER, REASONING_ASSISTANT, USER_2],
                                             add_generation_prompt=True, enable_thinking=False),
        "tools": dict(messages=[SYSTEM, USER], tools=TOOLS, add_generation_prompt=True),
        "tools_no_system": dict(messages=[USER], tools=TOOLS, add_generation_prompt=True, enable_thinking=False),
        "tool_round_trip": dict(messages=TOOL_ROUND_TRIP, tools=TOOLS, add_generation_prompt=True),
    },
    "gemma3": {
        "content_parts": dict(messages=[
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": " Describe "}, {"type": "text", "text": "Paris. "}]},
        ], add_generation_prompt=True),
    },
    "gpt-oss": {
        "reasoning_effort_identity": dict(messages=[SYSTEM, USER], add_generation_prompt=True, reasoning_effort="high",
                                          model_identity="You are a tiny random model."),
        "tools": dict(messages=[SYSTEM, USER], tools=TOOLS, add_generation_prompt=True),
        "builtin_tools": dict(messages=[USER], builtin_tools=["browser", "python"], add_generation_prompt=True),
        "tool_call_pending": dict(messages=[USER, HARMONY_TOOL_CALL, HARMONY_TOOL_RESULT], tools=TOOLS,
                                  add_generation_prompt=True),
        "tool_call_answered": dict(messages=[USER, HARMONY_TOOL_CALL, HARMONY_TOOL_RESULT, ASSISTANT], tools=TOOLS),
        "thinking_last_turn": dict(messages=[SYSTEM, USER, HARMONY_THINKING]),
        "thinking_in_history": dict(messages=[USER, HARMONY_THINKING, USER_2], add_generation_prompt=True),
    },
    "phi4-mini": {
        "tools_in_system": dict(messages=[PHI4_TOOLS_SYSTEM, USER], add_generation_prompt=True),
        "tools_multi_turn": dict(messages=[PHI4_TOOLS_SYSTEM, USER, ASSISTANT, USER_2]),
    },
}


def _cases():
    for family in BUILDERS:
        for name in [*COMMON_CASES, *FAMILY_CASES[family]]:
            yield pytest.param(family, name, id=f"{family}-{name}")


@pytest.mark.parametrize("family,case", list(_cases()))
def test_family_chat_template_matches_transformers(family: str, case: str, lm: dict, hf: dict) -> None:
    kwargs = dict({**COMMON_CASES, **FAMILY_CASES[family]}[case])
    messages = kwargs.pop("messages")
    expected_text = hf[family].apply_chat_template(messages, tokenize=False, **kwargs)
    expected_ids = hf[family].apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert lm[family].apply_chat_template(messages, **kwargs) == expected_text
    assert lm[family].encode_chat(messages, **kwargs) == expected_ids


def test_family_special_tokens_match_transformers(lm: dict, hf: dict) -> None:
    for family in BUILDERS:
        tok, ref = lm[family], hf[family]
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)
        assert tok.special_tokens_map == ref.special_tokens_map
        assert tok.chat_template == ref.chat_template


def test_qwen3_thinking_switch(lm: dict) -> None:
    # The one thing enable_thinking changes: an empty think block closes the generation prompt.
    tok = lm["qwen3"]
    on = tok.apply_chat_template([USER], add_generation_prompt=True)
    off = tok.apply_chat_template([USER], add_generation_prompt=True, enable_thinking=False)
    assert off == on + "<think>\n\n</think>\n\n"
    assert on.endswith("<|im_start|>assistant\n")
    # The template's markers are single tokens in the ids, not text pieces.
    ids = tok.encode_chat([USER, THINKING_ASSISTANT])
    for marker in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert tok.token_to_id(marker) in ids, marker


@pytest.mark.parametrize("messages", [
    [USER, USER_2],
    [SYSTEM, ASSISTANT],
    [SYSTEM, USER, ASSISTANT, ASSISTANT],
    [ASSISTANT, USER],
])
def test_gemma3_rejects_non_alternating_roles(messages: list[dict], lm: dict, hf: dict) -> None:
    message = "Conversation roles must alternate user/assistant/user/assistant/..."
    with pytest.raises(ChatTemplateError, match=message.replace(".", r"\.")):
        lm["gemma3"].apply_chat_template(messages)
    with pytest.raises(Exception, match=message.replace(".", r"\.")):
        hf["gemma3"].apply_chat_template(messages, tokenize=False)


def test_gpt_oss_refuses_channel_tags_in_content(lm: dict, hf: dict) -> None:
    messages = [USER, {"role": "assistant", "content": "<|channel|>analysis<|message|>Hmm.<|end|>"}]
    message = "You have passed a message containing <|channel|> tags in the content field."
    with pytest.raises(ChatTemplateError, match=re.escape(message)):
        lm["gpt-oss"].apply_chat_template(messages)
    with pytest.raises(Exception, match=re.escape(message)):
        hf["gpt-oss"].apply_chat_template(messages, tokenize=False)
