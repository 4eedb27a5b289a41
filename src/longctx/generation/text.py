"""Text in, text out: generation through a tokenizer, streamed as it is produced."""

from __future__ import annotations

from collections.abc import Iterator

from longctx.generation.generate import stream


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int, *, state=None, **sampling) -> Iterator[str]:
    """Yield the generated text piece by piece (complete characters only), stopping at eos.

    ``state`` continues a session (``prompt`` is then the new text, possibly empty);
    ``sampling`` takes ``stream``'s arguments (temperature, top_k, top_p, seed).
    """
    ids = tokenizer.encode(prompt)
    fresh = state is None or (state.seq_len == 0 and "pending" not in state.extra)
    if not ids and fresh:
        ids = [tokenizer.bos_id]
    decoder = tokenizer.stream_decoder()
    model.eval()
    for token in stream(model, ids, max_new_tokens, stop=[tokenizer.eos_id], state=state, **sampling):
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
