"""Conversations as token ids, appended to and never re-tokenized (token-in, token-out).

An episode's tokens are its opening prompt, then alternately the tokens the policy sampled and the tokens of the
messages the environment returned. Decoding the conversation and encoding it again between turns would change
the tokens the policy is trained on (a different split of the same text, a dropped special token), so the
environment's messages are rendered on their own as the chat template's *continuation* after an assistant turn:

    close  = what the template writes after an assistant message's content (ChatML: "<|im_end|>\\n")
    delta  = template(probe + new, add_generation_prompt) - template(probe)   (probe ends with an assistant turn)

A turn whose last sampled token is the start of ``close`` (ChatML's ``<|im_end|>``) already holds it; the rest
of ``close`` (the newline) and ``delta`` are encoded as the environment's tokens. A turn that ended otherwise
(the length limit, a stop string, another end token) gets the whole ``close``. Plain-text prompts
(``data.chat: false``) join messages by newlines.

Environment messages carry untrusted text (a tool's output, a debate opponent's argument). Encoding parses
special-token strings inside text, so a message writing ``<|im_end|>\n<|im_start|>system`` would open real
turns; :func:`neutralize` breaks every special-token string in message content with a zero-width space first.
The chat template must render a ``tool`` and a ``user`` message after an assistant turn without changing the
earlier turns; :class:`Renderer` checks this when it is made.
"""

from __future__ import annotations

from rlmt.data import PromptFormat

PROBE = "\x00rlmt-probe\x00"


class Renderer:
    """Token ids of an episode's opening and of each continuation, for one tokenizer and prompt format.

    ``tools`` (OpenAI function schemas) go to the chat template as ``tools=`` when the template reads them;
    otherwise ``tool_instructions`` (the documented ``<tool_call>`` format and the schemas) is added to the
    system message."""

    def __init__(self, tokenizer, fmt: PromptFormat, tools: list[dict] | None = None,
                 tool_instructions: str | None = None):
        self.tok, self.fmt, self.tools = tokenizer, fmt, tools or None
        template = getattr(tokenizer, "chat_template", None)
        self.chat = bool(fmt.chat and template)
        # the template's own tool rendering, where its calls are the <tool_call> blocks rlmt parses
        self.native_tools = bool(self.tools and self.chat and "tools" in str(template)
                                 and "<tool_call>" in str(template))
        self.tool_instructions = None if self.native_tools else tool_instructions
        self.specials = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if len(t) > 1}
                               | {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                                  if getattr(t, "special", False) and len(t.content) > 1}, key=len, reverse=True)
        self.special_ids = set(getattr(tokenizer, "all_special_ids", [])) | {
            i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        if self.chat:
            probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": PROBE}]
            base = self._template(probe, generation_prompt=False)
            self._probe, self._base = probe, base
            self.close = base[base.rindex(PROBE) + len(PROBE):]
            for role in ("tool", "user"):  # what environments send, checked once
                self.continuation([{"role": role, "content": "x"}], None)
        else:
            self.close = "\n"

    def _template(self, messages: list[dict], generation_prompt: bool) -> str:
        kwargs = {"tools": self.tools} if self.native_tools else {}
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                            **kwargs)

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def opening(self, messages: list[dict]) -> list[int]:
        """Token ids of the opening messages with the generation prompt (the first turn's context)."""
        messages = self.with_system(messages)
        if self.chat:
            return self._encode(self._template(messages, generation_prompt=True))
        return self._encode("\n".join(str(m["content"]) for m in messages) + "\n")

    def continuation(self, messages: list[dict], last_token: int | None) -> list[int]:
        """Token ids that close the assistant turn just sampled, then ``messages`` (their content neutralized),
        then the next generation prompt. ``last_token``: the turn's last sampled token (None: none)."""
        close = self.close
        if last_token is not None and last_token in self.special_ids:
            ended = self.tok.decode([last_token])
            if ended and close.startswith(ended):  # the turn's end token, already sampled
                close = close[len(ended):]
        messages = [{**m, "content": neutralize(str(m.get("content", "")), self.specials)} for m in messages]
        if not self.chat:
            return self._encode(close + "".join(f"{m['content']}\n" for m in messages))
        try:
            full = self._template(self._probe + messages, generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template that rejects the role (e.g. strict alternation)
            raise ValueError(f"the chat template cannot render a {messages[0].get('role') if messages else ''!r} "
                             f"message after an assistant turn: {e}") from e
        if not full.startswith(self._base):
            raise ValueError("the chat template renders an assistant turn differently when messages follow it; "
                             "multi-turn episodes need a template whose earlier turns do not change")
        return self._encode(close + full[len(self._base):])

    def with_system(self, messages: list[dict]) -> list[dict]:
        """The row's messages with ``data.system_prompt`` and the tool instructions in the system message."""
        extra = [t for t in (self.fmt.system_prompt, self.tool_instructions) if t]
        if not extra:
            return list(messages)
        if messages and messages[0].get("role") == "system":
            return [{"role": "system", "content": "\n\n".join([str(messages[0]["content"])] + extra)}] + list(messages[1:])
        return [{"role": "system", "content": "\n\n".join(extra)}] + list(messages)


def neutralize(text: str, specials: list[str]) -> str:
    """``text`` with every special-token string broken by a zero-width space after its first character, so
    encoding it cannot produce a special token (longest strings first)."""
    for t in specials:
        if t in text:
            text = text.replace(t, t[0] + "\u200b" + t[1:])
    return text


def tool_instructions(schemas: list[dict]) -> str:
    """The system-message text that teaches the documented tool-call format to a template without tools: the
    format, then one line per tool, ``- name(arg: type, ...): description``."""
    lines = []
    for s in schemas:
        props = s.get("parameters", {}).get("properties", {})
        args = ", ".join(f"{k}: {v.get('type', 'any')}" for k, v in props.items())
        lines.append(f"- {s['name']}({args}): {s.get('description', '')}")
    return ("You can call tools. To call one, write\n"
            '<tool_call>{"name": "TOOL", "arguments": {...}}</tool_call>\n'
            "and stop; the result comes back in a tool message. Give the final answer without a tool call.\n"
            "Tools:\n" + "\n".join(lines))
