"""Chat rendering and the loss mask, for any HF chat template.

The mask is found on characters, then mapped to tokens: the conversation is rendered once and tokenized once
(with offsets), so the trained token ids are exactly the ones inference sees. For assistant turn i, the trained
span starts where `render(messages[:i], add_generation_prompt=True)` ends (after the assistant header) and ends
where `render(messages[:i+1])` ends, trailing whitespace excluded (so EOS is trained, the newline after it not).
A template whose renderings are not prefixes of each other cannot be masked this way: that is an error.
"""

from __future__ import annotations

from typing import Any

# Used when a tokenizer has no chat template. Plain-text role markers, so any tokenizer can represent them.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{ '<|tool_calls|>' + (message['tool_calls'] | tojson) }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant", "tool")


def render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """`messages` rendered by the tokenizer's chat template (a ChatML fallback when it has none)."""
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer: Any, messages: list[dict], which: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of the assistant turns that carry loss.

    which: "assistant" (every assistant turn) or "last_assistant".
    """
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation starts with an assistant turn; there is no prompt to condition on")
        head = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not (upto.startswith(head) and text.startswith(upto)):
            raise ValueError("the tokenizer's chat template renders turns that are not prefixes of each other, "
                             "so assistant tokens cannot be located; use data.train_on=all or another template")
        end = len(upto.rstrip())
        spans.append((len(head), end))
    if which == "last_assistant":
        spans = spans[-1:]
    return text, spans
