"""Chat templates: a conversation rendered as the model was trained to read it.

A model's tokenizer may carry a Jinja template (Hugging Face's ``chat_template``, GGUF's
``tokenizer.chat_template``) that turns ``[{"role": ..., "content": ...}, ...]`` into text
with its control tokens (``<|im_start|>user ... <|im_end|>``).  It is rendered in a
sandboxed Jinja environment with the options and helpers transformers gives templates
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``tojson``).

``ChatSession`` keeps the text already fed to a model's state, so each turn feeds only what
the template adds: the end of the previous reply, the new message and the assistant's
header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


class ChatTemplateError(ValueError):
    """A chat template cannot be rendered for this conversation."""


def _environment():
    try:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install jinja2") from None

    def raise_exception(message: str):
        raise ChatTemplateError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env


def render_chat(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None) -> str:
    """The text of ``messages`` under ``template``; with ``add_generation_prompt`` it ends where
    the assistant's reply begins."""
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"each message needs a 'role' and a 'content' string; got {m!r}")
    try:
        compiled = _environment().from_string(template)
    except Exception as e:  # jinja2.TemplateSyntaxError and kin
        raise ChatTemplateError(f"the chat template is not valid Jinja: {e}") from None
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token or "", eos_token=eos_token or "")


@dataclass
class ChatSession:
    """A conversation on one model state: ``turn(user_text)`` gives the text to feed next
    (what the rendered conversation adds to the text fed so far), ``reply(text)`` records
    the model's answer.  The reply's end-of-turn token is fed at the start of the next turn."""

    template: str
    bos_token: str | None = None
    eos_token: str | None = None
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    fed: str = ""  # the text whose tokens the state has seen

    def render(self, add_generation_prompt: bool) -> str:
        return render_chat(self.template, self.messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token)

    def turn(self, user_text: str) -> str:
        if not self.messages and self.system is not None:
            self.messages.append({"role": "system", "content": self.system})
        self.messages.append({"role": "user", "content": user_text})
        text = self.render(add_generation_prompt=True)
        if not text.startswith(self.fed):
            raise ChatTemplateError("the chat template renders earlier turns differently once the conversation goes "
                                    "on, so the state cannot be continued; use --template for this model")
        new, self.fed = text[len(self.fed):], text
        return new

    def reply(self, text: str, ended: bool) -> None:
        """Record the reply ``text``; ``ended``: it ended with the end-of-turn token, which the
        state will see first on the next turn (else the template's closing text is fed then)."""
        self.messages.append({"role": "assistant", "content": text})
        self.fed += text + (self.eos_token or "" if ended else "")
