"""Streaming evaluation (StreamingLLM, Xiao et al. 2023, §4.1): the negative log-likelihood
of every token of a long stream, fed one token at a time, under a cache policy.

``nll[i]`` is ``-log p(ids[i + 1] | context)`` where the context is what the policy keeps
of ``ids[: i + 1]`` (``N - 1`` predictions for ``N`` tokens; the last token is only
predicted, never fed).  At every step the query of the newest token ``ids[i]`` attends to:

- ``dense``: all of ``ids[: i + 1]``, at their stream positions (the full KV cache; the
  reference while the stream fits the model's position limit).
- ``window``: the last ``window`` tokens only, ``ids[i - window + 1 : i + 1]``, at positions
  ``0 .. window - 1`` inside the cache (``init_state(cache="window")``).
- ``sinks``: the first ``sinks`` tokens plus the last ``window``, at positions
  ``0 .. kept - 1`` inside the cache (``init_state(cache="sinks")``, StreamingLLM).
- ``recall``: the first ``sinks`` tokens, the last ``window``, and the blocks of the tokens
  between them that the query retrieves (``init_state(cache="recall")``, InfLLM; options
  ``recall``: ``block``, ``topk``, ``repr_tokens``, ``memory_dir``, ``positions``).
- ``recompute``: "sliding window with re-computation", the paper's baseline of the same
  size: the last ``L = sinks + window`` tokens are encoded from scratch (fresh positions
  ``0 .. L - 1``, every layer recomputed) and the last position predicts the next token.

In ``window`` and ``sinks`` the cached keys and values of a token are those computed when the
token was fed, so above the first layer they carry that token's own context of the time;
only ``recompute`` re-encodes the kept tokens with each other as the whole context.  Hence
for a one-layer model ``sinks`` equals re-encoding exactly the kept tokens, and for deeper
models the two differ (the paper compares them as different methods, Table 1).  All
bounded policies count the current token in their ``L`` tokens; the official
``eval_long_ppl.py`` evicts after the step, so its ``4 + 1020`` attends to 1025 tokens.

State-space layers keep their whole-stream recurrent state under ``dense``, ``window``,
``sinks`` and ``recall`` (the options choose the attention layers' caches); ``recompute``
re-runs them from a zero state over each window.  A model without attention layers has no
cache to choose: its only policy is ``state`` (carry the recurrent state over the whole
stream), and the cache policies raise ``ValueError`` for it (``state`` likewise for models
with attention).

Per segment of ``segment`` predictions: mean nll and perplexity, milliseconds per token
(wall time of the segment's model calls and loss), the process's resident memory (RSS, from
``/proc/self/statm``; None where that file does not exist) and the bytes of tensor storage
the model state holds (``ModelState.nbytes``; 0 for ``recompute``, which keeps no state).
"""

from __future__ import annotations

import gc
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from longctx.cache import (CACHE_POLICIES, DEFAULT_SINKS, DEFAULT_WINDOW, RECALL_DEFAULTS, KVCache, RecallCache,
                           SinkKVCache)
from longctx.eval.plotting import pyplot, save_figure
from longctx.validation import positive_int

# The attention caches, the quality reference that re-encodes each window from scratch,
# and ``state``: the recurrent state of models without attention layers.
ATTENTION_POLICIES = (*CACHE_POLICIES, "recompute")
POLICIES = (*ATTENTION_POLICIES, "state")
ON_LIMIT = ("error", "stop")
# Auto batch of recompute windows: logits and activations of one batch stay under this.
_RECOMPUTE_BUDGET = 256 * 2**20
_RECOMPUTE_MAX_BATCH = 64


@dataclass
class StreamSegment:
    """Statistics of the predictions ``nll[start:end]`` (of tokens ``ids[start + 1 : end + 1]``);
    ``end`` is also the number of tokens fed so far: the x axis of the plots."""

    start: int
    end: int
    nll: float  # mean, nats per token
    ppl: float
    ms_per_token: float
    rss_bytes: int | None  # the process's resident memory at the segment's end
    cache_bytes: int  # tensor storage held by the model state at the segment's end

    @property
    def tokens(self) -> int:
        return self.end - self.start


@dataclass
class StreamResult:
    """One policy's run over a stream (see the module docstring for what each policy keeps).

    ``nll`` float32 ``(n,)``: ``nll[i] = -log p(ids[i + 1] | context)``; ``n = N - 1`` for a
    stream of ``N`` tokens unless the policy stopped at its position limit (``stopped_at``,
    the number of tokens fed, with ``on_limit="stop"``); NaN where a policy evaluated only
    every k-th prediction (``recompute_every``), and means are over the evaluated ones.
    ``span``: the most tokens a step attends to (None: all of them).
    """

    policy: str
    nll: np.ndarray
    segments: list[StreamSegment]
    stream_tokens: int
    sinks: int = 0
    window: int | None = None
    span: int | None = None
    stopped_at: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Predictions made (the evaluated entries of ``nll``)."""
        return int(np.isfinite(self.nll).sum())

    @property
    def mean_nll(self) -> float:
        return float(np.nanmean(self.nll.astype(np.float64))) if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return _ppl(self.mean_nll)

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.seconds / max(self.tokens, 1)

    def to_dict(self, include_nll: bool = False) -> dict:
        """Plain JSON-ready dict; the per-token ``nll`` list only with ``include_nll``."""
        out = {
            "policy": self.policy, "sinks": self.sinks, "window": self.window, "span": self.span,
            "stream_tokens": self.stream_tokens, "tokens": self.tokens, "stopped_at": self.stopped_at,
            "nll": self.mean_nll, "ppl": self.ppl, "seconds": self.seconds, "ms_per_token": self.ms_per_token,
            "notes": list(self.notes), "segments": [asdict(s) for s in self.segments],
        }
        if include_nll:
            out["token_nll"] = self.nll.tolist()
        return out


def _ppl(nll: float) -> float:
    return math.exp(min(nll, 700.0)) if nll == nll else float("nan")


def rss_bytes() -> int | None:
    """This process's resident set size in bytes (Linux ``/proc/self/statm``), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def has_attention_cache(model) -> bool:
    """Whether any layer of ``model`` keeps a KV cache (attention, dilated attention)."""
    return any(isinstance(s, (KVCache, SinkKVCache)) for s in model.init_state(1).layers)


def applicable_policies(model) -> tuple[str, ...]:
    """The policies ``stream_nll`` accepts for ``model``: ``("state",)`` without attention
    layers; otherwise ``dense`` and ``recompute``, plus ``window``, ``sinks`` and ``recall``
    when every attention layer can take such a cache (not dilated attention, not learned
    positions)."""
    if not has_attention_cache(model):
        return ("state",)
    try:
        model.init_state(1, cache="window", window=1)
    except ValueError:
        return ("dense", "recompute")
    return ATTENTION_POLICIES


def _as_stream(ids, device, vocab_size: int) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"the stream must be one sequence of token ids, (time,) or (1, time); got shape "
                         f"{tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
        raise ValueError(f"token ids must be integers; got {ids.dtype}")
    if ids.numel() < 2:
        raise ValueError(f"the stream needs at least 2 tokens (one to feed, one to predict); got {ids.numel()}")
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= vocab_size:  # the last token is only predicted: the model never checks it
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary (0..{vocab_size - 1}); was the "
                         "stream encoded with this model's tokenizer?")
    return ids.to(device=device, dtype=torch.long)[None]


def stream_nll(
    model,
    ids,
    *,
    cache: str,
    sinks: int | None = None,
    window: int | None = None,
    recall: dict | None = None,
    segment: int = 256,
    max_len: int | None = None,
    on_limit: str = "error",
    recompute_batch: int | None = None,
    recompute_every: int = 1,
    progress: bool = False,
) -> StreamResult:
    """Token-by-token nll of the stream ``ids`` (``(time,)`` or ``(1, time)``) under the policy
    ``cache`` (``dense``, ``window``, ``sinks``, ``recall``, ``recompute``; ``state`` for
    models without attention layers), with statistics every ``segment`` predictions.

    ``sinks`` (default 4) and ``window`` (default 1020): the cache of ``sinks``; ``window``
    alone for ``window``; ``recompute`` re-encodes ``sinks + window`` tokens.  ``recall``
    takes ``sinks``, ``window`` and the options in ``recall`` (``init_state``'s), with the
    defaults ``RECALL_DEFAULTS``.  Out-of-range values raise the caches' own
    ``ValueError``; options a policy does not use warn.

    ``dense`` (and ``state``, for a model with ``max_seq_len``) needs ``N - 1`` positions for
    ``N`` tokens: beyond ``model.position_limit`` or ``max_len`` (a cap on the dense cache's
    tokens) it raises ``ValueError`` before any work (``on_limit="error"``), or evaluates
    the predictions that fit and records ``stopped_at`` (``on_limit="stop"``).

    ``recompute`` runs ``recompute_batch`` consecutive windows per forward call (default:
    as many as fit ~256 MiB of logits and activations, at most 64, never across a segment
    boundary); the predictions of the first ``L - 1`` tokens, whose windows are prefixes of
    the stream, come from causal forwards over those prefixes.  ``recompute_every=k``
    evaluates only every k-th prediction after those (each costs a forward over ``L``
    tokens; the rest are NaN and left out of the means).  Deterministic; the model
    runs in eval mode under ``torch.inference_mode`` and its training mode is restored.
    ``progress`` shows a tqdm bar.
    """
    if cache not in POLICIES:
        raise ValueError(f"unknown stream policy {cache!r}; choose one of {', '.join(POLICIES)}")
    positive_int("segment", segment)
    positive_int("max_len", max_len, allow_none=True)
    positive_int("recompute_batch", recompute_batch, allow_none=True)
    positive_int("recompute_every", recompute_every)
    if on_limit not in ON_LIMIT:
        raise ValueError(f"on_limit must be one of {', '.join(ON_LIMIT)}; got {on_limit!r}")
    _check_policy(model, cache, sinks, window, recall, max_len)
    defaults = RECALL_DEFAULTS if cache == "recall" else {"sinks": DEFAULT_SINKS, "window": DEFAULT_WINDOW}
    sinks = defaults["sinks"] if sinks is None else sinks
    window = defaults["window"] if window is None else window

    device = next(model.parameters()).device
    ids = _as_stream(ids, device, model.config.vocab_size)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if cache == "recompute":
                return _stream_recompute(model, ids, sinks, window, segment, recompute_batch, recompute_every,
                                         progress)
            return _stream_stateful(model, ids, cache, sinks, window, recall or {}, segment, max_len, on_limit,
                                    progress)
    finally:
        model.train(was_training)


def _check_policy(model, cache: str, sinks, window, recall, max_len) -> None:
    """Refuse a policy that does not apply to ``model``; warn about options it ignores."""
    attention = has_attention_cache(model)
    if attention and cache == "state":
        raise ValueError("cache='state' is for models without attention layers (it only carries their recurrent "
                         f"state); this model has attention layers: choose one of {', '.join(ATTENTION_POLICIES)}")
    if not attention and cache != "state":
        raise ValueError(f"this model has no attention layers ({', '.join(sorted(set(model.config.layers)))}), so "
                         f"the cache policy {cache!r} does not apply; use cache='state', which carries the "
                         "recurrent state over the whole stream")
    ignored = {
        "dense": ("sinks", "window"), "state": ("sinks", "window"), "window": ("sinks",), "sinks": (), "recall": (),
        "recompute": (),
    }[cache] + (() if cache == "recall" else ("recall",))
    given = {"sinks": sinks, "window": window, "recall": recall}
    for name in ignored:
        if given[name] is not None:
            warnings.warn(f"{name}={given[name]} is ignored with cache={cache!r}", stacklevel=3)
    if max_len is not None and cache != "dense":
        warnings.warn(f"max_len={max_len} caps the dense cache only; it is ignored with cache={cache!r}", stacklevel=3)


def _stream_recompute(model, ids, sinks: int, window: int, segment: int, batch: int | None, every: int,
                      progress: bool) -> StreamResult:
    SinkKVCache(1, sinks, window)  # the sink cache's validation of both numbers
    span = sinks + window
    limit = model.position_limit()
    if limit is not None and span > limit:
        raise ValueError(f"recompute re-encodes windows of sinks + window = {span} tokens, more than this "
                         f"model's limit of {limit} positions (model.max_seq_len); use a smaller window "
                         "or fewer sinks")
    result = StreamResult("recompute", np.empty(0, np.float32), [], ids.shape[1], sinks, window, span)
    if every > 1:
        result.notes.append(f"recompute evaluated one prediction in {every} after the first {span - 1}")
    _run_recompute(model, ids, ids.shape[1] - 1, segment, batch, every, result, progress)
    return result


def _stream_stateful(model, ids, cache: str, sinks: int, window: int, recall: dict, segment: int,
                     max_len: int | None, on_limit: str, progress: bool) -> StreamResult:
    """The stream token by token through a cache (or recurrent state), up to the position limit."""
    total = ids.shape[1] - 1  # predictions wanted
    options = {"dense": {}, "state": {}, "window": dict(cache="window", window=window),
               "sinks": dict(cache="sinks", sinks=sinks, window=window),
               "recall": dict(cache="recall", sinks=sinks, window=window, **recall)}[cache]
    state = model.init_state(1, **options)
    limit, what = model.position_limit(state), "the model's position limit (model.max_seq_len)"
    if cache == "dense" and max_len is not None and (limit is None or max_len < limit):
        limit, what = max_len, "max_len"
    result = StreamResult(
        cache, np.empty(0, np.float32), [], ids.shape[1],
        sinks=sinks if cache in ("sinks", "recall") else 0,
        window=window if cache in ("sinks", "window", "recall") else None,
        span={"sinks": sinks + window, "window": window}.get(cache, _recall_span(state)),
    )
    n = total
    if limit is not None and total > limit:
        if on_limit == "error":
            raise ValueError(
                f"the stream has {ids.shape[1]} tokens, so cache={cache!r} would feed {total} of them (the "
                f"last is only predicted), more than {what} of {limit}; pass on_limit='stop' to evaluate the "
                f"first {limit} predictions, shorten the stream"
                + (", or use cache='sinks' or 'window', whose caches stay within the limit"
                   if cache == "dense" else "")
            )
        n = limit
        result.stopped_at = limit
        result.notes.append(f"stopped after {limit} of {total} predictions: {what} is {limit}")
    _run_stateful(model, ids, state, n, segment, result, progress)
    return result


def _recall_span(state) -> int | None:
    """The most tokens a step of a state's recall caches attends to (None without them)."""
    spans = [s.span for s in state.layers if isinstance(s, RecallCache)]
    return max(spans) if spans else None


def _segment(result: StreamResult, nll: torch.Tensor, start: int, end: int, t0: float, state) -> None:
    """Close the segment ``nll[start:end]`` begun at ``t0``: its mean is read (which waits
    for an asynchronous device) before the clock stops."""
    mean = float(nll[start:end].double().nanmean())
    seconds = time.perf_counter() - t0
    evaluated = int(torch.isfinite(nll[start:end]).sum())
    result.segments.append(StreamSegment(start, end, mean, _ppl(mean), 1e3 * seconds / max(evaluated, 1), rss_bytes(),
                                         0 if state is None else state.nbytes))
    result.seconds += seconds


def _run_stateful(model, ids, state, n: int, segment: int, result: StreamResult, progress: bool) -> None:
    """One token per forward call through ``state``; the logits of token ``t`` score ``t + 1``."""
    nll = torch.empty(n, dtype=torch.float32, device=ids.device)
    targets = ids[0, 1:]
    with tqdm(total=n, disable=not progress, unit="tok", desc=result.policy, dynamic_ncols=True) as bar:
        for start in range(0, n, segment):
            end = min(n, start + segment)
            t0 = time.perf_counter()
            for t in range(start, end):
                logits = model(ids[:, t : t + 1], state)
                nll[t] = F.cross_entropy(logits[0].float(), targets[t : t + 1])
            _segment(result, nll, start, end, t0, state)
            bar.update(end - start)
    result.nll = nll.cpu().numpy()


def recompute_batch_size(model, span: int) -> int:
    """Default number of recompute windows per forward call: their logits and main
    activations (about ``vocab + 4 d_model + 3 mlp_hidden`` floats per token) within
    ~256 MiB, between 1 and 64."""
    c = model.config
    per_token = 4 * (c.vocab_size + 4 * c.d_model + 3 * (c.mlp_hidden or 0))
    return max(1, min(_RECOMPUTE_MAX_BATCH, _RECOMPUTE_BUDGET // (span * per_token)))


def _run_recompute(model, ids, n: int, segment: int, batch: int | None, every: int, result: StreamResult,
                   progress: bool) -> None:
    """Prediction ``t`` from a fresh forward over the window ``ids[max(0, t - L + 1) : t + 1]``.

    For ``t < L - 1`` the window is the prefix ``ids[: t + 1]``, and position ``t`` of one
    causal forward over ``ids[: end]`` is exactly that prediction for every ``t`` of a
    segment; from ``t = L - 1`` on, ``batch`` full windows (rows of ``unfold``) go through
    one forward call each, for every ``every``-th ``t`` only (the others stay NaN)."""
    span = result.span
    batch = batch or recompute_batch_size(model, span)
    nll = torch.full((n,), float("nan"), dtype=torch.float32, device=ids.device)
    stream, targets = ids[0], ids[0, 1:]
    with tqdm(total=n, disable=not progress, unit="tok", desc="recompute", dynamic_ncols=True) as bar:
        for start in range(0, n, segment):
            end = min(n, start + segment)
            t0 = time.perf_counter()
            prefix_end = min(end, span - 1)
            if start < prefix_end:
                logits = model(ids[:, :prefix_end])[0, start:prefix_end]
                nll[start:prefix_end] = F.cross_entropy(logits.float(), targets[start:prefix_end], reduction="none")
                bar.update(prefix_end - start)
            first = max(start, span - 1)
            first += -first % every  # the evaluated t are the multiples of every
            for b0 in range(first, end, batch * every):
                b1 = min(end, b0 + batch * every)
                windows = stream[b0 - span + 1 : b1].unfold(0, span, every).contiguous()  # (rows, span)
                logits = model(windows)[:, -1]
                nll[b0:b1:every] = F.cross_entropy(logits.float(), targets[b0:b1:every], reduction="none")
                bar.update(b1 - b0)
            _segment(result, nll, start, end, t0, None)
    result.nll = nll.cpu().numpy()


def stream_compare(
    model,
    ids,
    policies=None,
    *,
    sinks: int | None = None,
    window: int | None = None,
    recall: dict | None = None,
    segment: int = 256,
    max_len: int | None = None,
    on_limit: str = "stop",
    recompute_batch: int | None = None,
    recompute_every: int = 1,
    progress: bool = False,
) -> dict[str, StreamResult]:
    """``stream_nll`` under several policies at one total cache size ``L = sinks + window``
    (defaults 4 + 1020): ``sinks`` keeps ``sinks`` + ``window``, ``window`` keeps the last
    ``L`` tokens (the paper's window attention of the same size), ``recompute`` re-encodes
    ``L``; ``recall`` keeps ``sinks`` + ``window`` (defaults ``RECALL_DEFAULTS``) and
    retrieves blocks (options ``recall``); ``dense`` keeps all and by default stops at its
    limit (``on_limit="stop"``) so the others go on: ``max_len``, by default the length the
    weights were trained for (``config.context_len``; a RoPE model has no position limit of
    its own, but beyond that length its dense perplexity means little).  ``policies`` defaults to
    ``applicable_policies(model)`` but ``recall`` (whose sizes are its own: name it to run
    it).  Returns ``{policy: StreamResult}`` in order."""
    if policies is None:
        policies = [p for p in applicable_policies(model) if p != "recall"]
    policies = list(policies)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise ValueError(f"{f'unknown stream policies {unknown}' if unknown else 'no stream policy given'}; choose "
                         f"from {', '.join(POLICIES)}")
    n_sink, n_window = DEFAULT_SINKS if sinks is None else sinks, DEFAULT_WINDOW if window is None else window
    if {"window", "sinks", "recompute"} & set(policies):
        SinkKVCache(1, n_sink, n_window)  # the sink cache's validation of both numbers
    if max_len is None and "dense" in policies:
        max_len = getattr(model.config, "context_len", None)
    options = {
        "dense": dict(max_len=max_len, on_limit=on_limit),
        "state": dict(on_limit=on_limit),
        "window": dict(window=n_sink + n_window),
        "sinks": dict(sinks=n_sink, window=n_window),
        "recall": dict(sinks=sinks, window=window, recall=recall),
        "recompute": dict(sinks=n_sink, window=n_window, recompute_batch=recompute_batch,
                          recompute_every=recompute_every),
    }
    results = {}
    for p in dict.fromkeys(policies):
        gc.collect()  # the previous policy's state and activations: not in this one's RSS
        results[p] = stream_nll(model, ids, cache=p, segment=segment, progress=progress, **options[p])
    return results


# ---- reports ----

_COLUMNS = ("tokens", "policy", "ppl", "nll", "ms/token", "RSS MiB", "cache MiB")


def _rows(results: dict[str, StreamResult]) -> list[list[str]]:
    def mib(x):
        return "-" if x is None else f"{x / 2**20:.1f}"

    def num(x):
        return "-" if x != x else (f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}")

    ends = sorted({s.end for r in results.values() for s in r.segments})
    rows = []
    for end in ends:
        for name, r in results.items():
            for s in r.segments:
                if s.end == end:
                    rows.append([str(end), name, num(s.ppl), num(s.nll), num(s.ms_per_token), mib(s.rss_bytes),
                                 mib(s.cache_bytes)])
    for name, r in results.items():
        peak_rss = max((s.rss_bytes for s in r.segments if s.rss_bytes is not None), default=None)
        peak_cache = max((s.cache_bytes for s in r.segments), default=None)
        rows.append([f"all {r.tokens}", name, num(r.ppl), num(r.mean_nll), num(r.ms_per_token), mib(peak_rss),
                     mib(peak_cache)])
    # A policy evaluated at every k-th position only (recompute_every) has more of its weight on
    # the early predictions, made before anything was evicted: compare every policy on its positions.
    for ref_name, ref in results.items():
        if ref.tokens == ref.nll.size:
            continue
        for name, r in results.items():
            n = min(r.nll.size, ref.nll.size)
            paired = r.nll[:n][np.isfinite(ref.nll[:n]) & np.isfinite(r.nll[:n])].astype(np.float64)
            if paired.size:
                rows.append([f"{paired.size} of {ref_name}", name, num(_ppl(float(paired.mean()))),
                             num(float(paired.mean())), "-", "-", "-"])
    return rows


def stream_table(results: dict[str, StreamResult], fmt: str = "markdown") -> str:
    """Per-segment perplexity, nll, ms/token, RSS and cache size of each policy (rows grouped
    by ``tokens``, the segment's end), then one ``all`` row per policy (whole-stream ppl and
    ms/token, peak RSS and cache), and when a policy evaluated every k-th prediction only,
    one ``N of <policy>`` row per policy: its ppl over those N positions alone.  ``fmt``: ``"markdown"`` or ``"text"`` (aligned)."""
    if fmt not in ("markdown", "text"):
        raise ValueError(f"fmt must be 'markdown' or 'text'; got {fmt!r}")
    rows = _rows(results)
    if fmt == "markdown":
        lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join("---:" if c != "policy" else ":---"
                                                                 for c in _COLUMNS) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    cells = [list(_COLUMNS)] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(v.ljust(w) if c == "policy" else v.rjust(w) for v, w, c in zip(r, widths, _COLUMNS))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_stream(results: dict[str, StreamResult], path, *, timing: bool = True, memory: bool = True,
                title: str | None = None) -> Path | None:
    """Perplexity per segment against tokens streamed (log y), one line per policy (a dotted
    line where a policy stopped at its limit), plus panels of ms/token (log y), the process's
    RSS and the state's cache size (MiB), as a PNG.  Needs matplotlib
    (``pip install 'longctx[plot]'``); without it, warn and return None."""
    plt = pyplot("stream plot")
    if plt is None:
        return None
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = [("ppl", "perplexity per segment", True)]
    if timing:
        panels.append(("ms", "ms / token", True))
    if memory:
        panels += [("rss", "process RSS (MiB)", False), ("cache", "cache tensors (MiB)", False)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1 + 2.6 * len(panels)), sharex=True, squeeze=False)
    axes = {key: ax for (key, _, _), ax in zip(panels, axes[:, 0])}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # Policies often coincide (window, sinks and recompute until the first eviction; their
    # cache sizes): a line style and a marker each keeps every one visible.
    styles = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("-", "v")]
    for i, (name, r) in enumerate(results.items()):
        color = colors[i % len(colors)]
        linestyle, marker = styles[i % len(styles)]
        ends = [s.end for s in r.segments]
        series = {
            "ppl": [s.ppl for s in r.segments],
            "ms": [s.ms_per_token for s in r.segments],
            "rss": [np.nan if s.rss_bytes is None else s.rss_bytes / 2**20 for s in r.segments],
            "cache": [s.cache_bytes / 2**20 for s in r.segments],
        }
        label = name if r.span is None else f"{name} (L={r.span})"
        for key, ax in axes.items():
            ax.plot(ends, series[key], color=color, label=label, linestyle=linestyle, marker=marker,
                    markevery=max(1, len(ends) // 12), markersize=4, markerfacecolor="none")
            if r.stopped_at is not None:
                ax.axvline(r.stopped_at, color=color, linestyle=":", alpha=0.6)
    for (key, ylabel, log), ax in zip(panels, axes.values()):
        ax.set(ylabel=ylabel)
        if log:
            ax.set_yscale("log")
            # Plain numbers (40, 45), not 4x10^1; minor ticks labelled when less than a decade shows.
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            lo, hi = ax.get_ylim()
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain if 0 < lo and hi < 10 * lo else NullFormatter())
        else:
            # Absolute MiB from 0, never an offset axis (+8.87e2) that turns a 0.07 MiB change into a jump.
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, which="both")
    axes["ppl"].set_title(title or "streaming perplexity")
    axes["ppl"].legend()
    list(axes.values())[-1].set(xlabel="tokens streamed")
    return save_figure(fig, path)
