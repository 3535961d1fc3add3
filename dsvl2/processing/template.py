"""The ``"deepseek"`` conversation template of DeepSeek-VL2.

Reproduces ``get_conv_template("deepseek")`` / ``Conversation.get_prompt`` of the official
``deepseek_vl2/models/conversation.py`` and ``DeepseekVLV2Processor.format_messages`` (spec 6.2):
roles ``<|User|>`` / ``<|Assistant|>``, empty system message, separators ``"\\n\\n"`` after
even-indexed messages and the EOS text after odd-indexed ones, stop strings ``["User:", eos]``.

The display string is only informational (``Batch.sft_format``); the token ids are built by the
processor (``format_messages_v2``), which uses the canonical role names whatever the spelling.
"""

from collections.abc import Sequence
from typing import Any

from dsvl2.errors import InputError

USER_ROLE = "<|User|>"
ASSISTANT_ROLE = "<|Assistant|>"
SEP = "\n\n"
DEFAULT_EOS_TEXT = "<｜end▁of▁sentence｜>"

_ROLE_KINDS = {
    "user": "user",
    USER_ROLE: "user",
    "assistant": "assistant",
    ASSISTANT_ROLE: "assistant",
    "system": "system",
    "deepseekapi-sys": "system",
}


def normalize_role(role: str) -> str:
    """Map a role spelling to ``"user"``, ``"assistant"`` or ``"system"``.

    Accepted spellings are those of the official processor: ``user`` / ``<|User|>``,
    ``assistant`` / ``<|Assistant|>``, ``system`` / ``deepseekapi-sys``.
    """
    kind = _ROLE_KINDS.get(role) if isinstance(role, str) else None
    if kind is None:
        raise InputError(f"unknown message role {role!r}; expected one of {sorted(_ROLE_KINDS)}")
    return kind


def render(turns: Sequence[tuple[str, str]], system_message: str = "", eos_text: str = DEFAULT_EOS_TEXT) -> str:
    """``Conversation.get_prompt`` of the DEEPSEEK separator style (not stripped).

    ``system_message + "\\n\\n"`` if non-empty, then for message i: ``role + ": " + text + sep_i``
    (``sep_i`` = ``"\\n\\n"`` for even i, the EOS text for odd i), or ``role + ":"`` when empty.
    """
    seps = (SEP, eos_text)
    out = system_message + seps[0] if system_message else ""
    for i, (role, text) in enumerate(turns):
        out += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
    return out


def sft_format(
    messages: Sequence[dict[str, Any]], system_prompt: str = "", eos_text: str = DEFAULT_EOS_TEXT
) -> str:
    """The display string of a conversation, as the official ``format_messages``: every message
    content ``.strip()``-ed, the whole rendering ``.strip()``-ed.

    As in the official code the role is written as given (``"user"`` stays ``"user"``); roles
    are still validated.
    """
    turns = []
    for message in messages:
        normalize_role(message.get("role"))
        turns.append((message["role"], str(message.get("content", "")).strip()))
    return render(turns, system_prompt, eos_text).strip()


def stop_strings(eos_text: str = DEFAULT_EOS_TEXT) -> list[str]:
    """Strings at which streamed text is cut: ``["User:", eos_text]`` (template ``stop_str``)."""
    return ["User:", eos_text]


STOP_STRINGS: list[str] = stop_strings()
