"""Text in, text out: generation through a tokenizer, streamed as it is produced."""

from __future__ import annotations

from collections.abc import Iterator

from longctx.generation.generate import stream


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int | None, *, state=None, templated: bool = False,
                **sampling) -> Iterator[str]:
    """Yield the generated text piece by piece (complete characters only), stopping at eos.

    ``max_new_tokens=None``: until eos (or the model's position limit).  ``templated``: the
    prompt was rendered by a chat template, so special tokens written in it are those
    tokens and no bos is added (the template writes its own).  ``state`` continues a session (``prompt`` is then the new text, possibly empty);
    ``sampling`` takes ``stream``'s arguments (temperature, top_k, top_p, seed).
    """
    ids = tokenizer.encode_with_specials(prompt) if templated else tokenizer.encode(prompt)
    fresh = state is None or (state.seq_len == 0 and "pending" not in state.extra)
    # A fresh session starts with bos when the tokenizer starts texts with it (Llama), or
    # when there is no prompt at all.
    if fresh and not templated and (tokenizer.add_bos or not ids):
        if tokenizer.bos_id is None:
            if not ids:
                raise ValueError("the prompt is empty and this tokenizer has no bos token; give a prompt")
        else:
            ids = [tokenizer.bos_id, *ids]
    decoder = tokenizer.stream_decoder()
    model.eval()
    stop = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    for token in stream(model, ids, max_new_tokens, stop=stop, state=state, **sampling):
        token = int(token[0])
        if token == tokenizer.eos_id:
            break
        piece = decoder.push(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, **sampling) -> str:
    """The prompt followed by up to ``max_new_tokens`` generated tokens, as text."""
    return prompt + "".join(stream_text(model, tokenizer, prompt, max_new_tokens, **sampling))
