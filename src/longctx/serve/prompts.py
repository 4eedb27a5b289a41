"""A request's prompt as token ids: chat messages through the model's chat template (or
a plain one), a completion's text or ids as ``longctx generate`` would feed them."""

from __future__ import annotations

from longctx.generation.chat import render_chat
from longctx.serve.protocol import Request, invalid

# The chat template of models whose tokenizer has none (longctx's own runs): the command
# line chat's default turn format, "USER: ...\n\nASSISTANT: ".
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m.role | upper }}: {{ m.content }}\n\n{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT: {% endif %}")


def prompt_ids(req: Request, tok, template: str, vocab_size: int) -> list[int]:
    """The ids to feed for ``req`` with tokenizer ``tok``; 400 for a conversation the template
    refuses, ids outside the vocabulary, or an empty prompt without a bos token."""
    if req.chat:
        try:
            text = render_chat(template, req.messages, bos_token=getattr(tok, "bos_token", None),
                               eos_token=getattr(tok, "eos_token", None))
        except ValueError as e:  # ChatTemplateError
            raise invalid("messages", str(e), "invalid_value") from None
        # the template writes its control tokens (and bos) as text
        encode = getattr(tok, "encode_with_specials", tok.encode)
        return encode(text)
    if isinstance(req.prompt, list):
        bad = [t for t in req.prompt if not 0 <= t < vocab_size]
        if bad:
            raise invalid("prompt", f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})",
                          "invalid_value")
        ids = list(req.prompt)
    else:
        ids = tok.encode(req.prompt)
    # as `longctx generate`: bos first when the tokenizer starts texts with it (given ids are
    # taken as they are), or when there is no prompt at all
    if tok.bos_id is not None and ((tok.add_bos and not isinstance(req.prompt, list)) or not ids):
        ids = [tok.bos_id, *ids]
    if not ids:
        raise invalid("prompt", "the prompt is empty and this tokenizer has no bos token", "invalid_value")
    return ids
