"""Speculative decoding on SmolLM2-135M-Instruct: greedy tokens/s with each draft against
plain decoding, in the same run, on a copy-heavy task and on free chat.

Usage (from the repo root)::

    python bench/speculative.py                                  # lookup and layers:8, 128 new tokens
    python bench/speculative.py --drafts lookup layers:4 layers:15 --new-tokens 64 --repeats 2

Tasks, each a user message through the model's chat template (``render_chat``):

- ``copy``: "Repeat the following code exactly" and ~300 tokens of the stdlib ``bisect``
  module's source: the reply copies from the prompt, where prompt lookup shines;
- ``chat``: a short open question: little to copy.

Each task is prefilled and then ``--new-tokens`` tokens are decoded greedily with
``longctx.generation.stream`` (eos does not stop it: every row decodes the same count),
plainly and with each ``--drafts`` draft, in turn; ``--repeats`` > 1 keeps each one's best
run (this machine is shared: alternating evens out its load).  Decode tokens/s counts the
new tokens over the time after the prefill; "x plain" is the ratio to plain decoding's
tokens/s on the same task; "same tokens" checks the speculative output against plain
decoding's, token for token.  Acceptance: drafted tokens accepted / drafted, and new tokens
per model pass (a pass is a verification of drafts, or a plain step when there was nothing
to draft), counted by wrapping ``accept``.

Limit, measured in the same run: plain decoding cannot exceed the memory read bandwidth /
the fp32 weight bytes a step reads (every matrix and the LM head); speculation can, since a
pass that reads the weights once may emit several tokens.

Targets (issue 23): lookup >= 2x plain on the copy task, >= 0.95x on free chat.
"""

from __future__ import annotations

import argparse
import bisect
import sys
import time
from pathlib import Path

import torch

from machine import add_out_option, memory_read_gbps, write_result

MODEL = "smollm2-135m"
QUESTION = "What makes a good walk in the countryside? Answer in a few sentences."


def copy_snippet(tokenizer, tokens: int = 300) -> str:
    """The first lines of the stdlib ``bisect`` module's source, about ``tokens`` tokens."""
    lines, out = Path(bisect.__file__).read_text(encoding="utf-8").splitlines(keepends=True), ""
    for line in lines:
        if len(tokenizer.encode(out + line)) > tokens:
            break
        out += line
    return out


def task_ids(tokenizer, text: str) -> list[int]:
    """``text`` as the user's message under the tokenizer's chat template, ready for the reply."""
    from longctx.generation.chat import render_chat

    rendered = render_chat(tokenizer.chat_template, [{"role": "user", "content": text}],
                           bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    return tokenizer.encode_with_specials(rendered)


class Counter:
    """Wraps ``accept`` (where ``_speculate`` looks it up) to count passes and accepted drafts."""

    def __init__(self, module) -> None:
        self.module, self.accept = module, module.accept
        self.verifications = self.drafted = self.accepted = 0

    def __enter__(self) -> Counter:
        def counted(logits, drafts, **kwargs):
            out = self.accept(logits, drafts, **kwargs)
            self.verifications += 1
            self.drafted += len(drafts)
            self.accepted += len(out) - 1
            return out

        self.module.accept = counted
        return self

    def __exit__(self, *exc) -> None:
        self.module.accept = self.accept


def decode(model, ids: list[int], new_tokens: int, draft: str | None, draft_tokens: int | None) -> dict:
    """Greedy decoding of ``new_tokens`` after ``ids``: the tokens, decode seconds (after the
    prefill, which the first ``next`` does) and, with a draft, the acceptance counts."""
    from longctx.generation import stream

    # the module, not the package's ``generate`` function of the same name
    with Counter(sys.modules["longctx.generation.generate"]) as counter:
        it = stream(model, ids, new_tokens, temperature=0, draft=draft, draft_tokens=draft_tokens)
        tokens = [int(next(it)[0])]  # prefill, then the first token from its logits
        start = time.perf_counter()
        tokens += [int(t[0]) for t in it]
        seconds = time.perf_counter() - start
    # the first token comes from the prefill; every other one from a verification (its
    # accepted drafts and one more) or from a plain step (nothing to draft)
    plain_steps = len(tokens) - 1 - (counter.accepted + counter.verifications)
    passes = counter.verifications + plain_steps
    return {"tokens": tokens, "seconds": seconds, "passes": passes, "drafted": counter.drafted,
            "accepted": counter.accepted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafts", nargs="+", default=["lookup", "layers:8"],
                        help="drafts to compare with plain decoding (lookup, layers:K)")
    parser.add_argument("--tasks", nargs="+", choices=("copy", "chat"), default=["copy", "chat"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--draft-tokens", type=int, default=None, help="fixed draft length (default adaptive)")
    parser.add_argument("--snippet-tokens", type=int, default=300, help="tokens of source the copy task repeats")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    add_out_option(parser)
    args = parser.parse_args()
    from longctx.model.installed import ModelNotInstalled, installed_model_path
    from longctx.train.runs import load_run

    try:
        installed_model_path(MODEL)
    except ModelNotInstalled as e:
        print(f"skipped: {e}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _, model, tokenizer, _ = load_run(MODEL)
    model.eval()
    prompts = {"copy": "Repeat the following code exactly:\n\n" + copy_snippet(tokenizer, args.snippet_tokens),
               "chat": QUESTION}
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if p.dim() == 2 and "norm" not in n and not n.startswith("embed"))
    weight_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size()  # tied: read by the head
    read_gbps = memory_read_gbps()
    limit = read_gbps * 1e9 / weight_bytes

    decode(model, task_ids(tokenizer, QUESTION), 4, None, None)  # warm-up: compiles the decode kernels
    rows, extra = [], {"memory read GB/s (machine)": read_gbps, "plain decode limit tok/s": limit}
    for task in args.tasks:
        ids = task_ids(tokenizer, prompts[task])
        best: dict[str | None, dict] = {}
        for _ in range(args.repeats):
            for draft in [None, *args.drafts]:
                run = decode(model, ids, args.new_tokens, draft, args.draft_tokens)
                if draft not in best or run["seconds"] < best[draft]["seconds"]:
                    best[draft] = run
        plain = best[None]
        plain_tps = (len(plain["tokens"]) - 1) / plain["seconds"]
        for draft, run in best.items():
            tps = (len(run["tokens"]) - 1) / run["seconds"]
            rows.append({"task": task, "prompt tokens": len(ids), "draft": draft or "plain",
                         "tok/s": tps, "x plain": tps / plain_tps,
                         "accepted/drafted": run["accepted"] / run["drafted"] if run["drafted"] else None,
                         "tokens/pass": (len(run["tokens"]) - 1) / run["passes"] if run["passes"] else None,
                         "same tokens": run["tokens"] == plain["tokens"]})
        extra[f"{task} reply (plain)"] = tokenizer.decode(plain["tokens"])[:80]
    lookup = {r["task"]: r["x plain"] for r in rows if r["draft"] == "lookup"}
    if "copy" in lookup:
        extra["target lookup >= 2x plain on copy"] = ("MET" if lookup["copy"] >= 2 else "MISSED") + \
            f" ({lookup['copy']:.2f}x)"
    if "chat" in lookup:
        extra["target lookup >= 0.95x plain on chat"] = ("MET" if lookup["chat"] >= 0.95 else "MISSED") + \
            f" ({lookup['chat']:.2f}x)"
    extra["all outputs identical to plain"] = all(r["same tokens"] for r in rows)
    write_result("speculative", rows, extra, args.out)


if __name__ == "__main__":
    main()
