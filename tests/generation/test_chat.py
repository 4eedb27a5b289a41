"""Chat templates: rendering as transformers does, and a session that feeds each turn's new text only."""

import pytest
import torch

from longctx.generation import generate
from longctx.generation.chat import ChatSession, ChatTemplateError, render_chat
from longctx.model import LanguageModel, ModelConfig

# SmolLM2-Instruct's template (ChatML with a default system message).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_render_matches_transformers():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<s>", eos_token="</s>")
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] | trim }} "
                "[/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% else %}"
                "{{ raise_exception('roles: user, assistant') }}{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "  hi "}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"}]
    for tpl in (CHATML, template):
        for gen in (True, False):
            expected = reference.apply_chat_template(messages, chat_template=tpl, tokenize=False,
                                                     add_generation_prompt=gen)
            assert render_chat(tpl, messages, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>") == expected
    with pytest.raises(ChatTemplateError, match="refused the conversation: roles: user, assistant"):
        render_chat(template, [{"role": "system", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        render_chat("{% for %}", messages)


def test_session_feeds_what_each_turn_adds():
    chat = ChatSession(CHATML, eos_token="<|im_end|>")
    first = chat.turn("What is 2+2?")
    assert first == "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n" \
                    "<|im_start|>assistant\n"
    chat.reply("4", ended=True)  # the state has seen the reply and will see <|im_end|> first
    second = chat.turn("And 3+3?")
    assert second == "\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
    chat.reply("6 and then some", ended=False)  # cut by the token limit: the template's <|im_end|> is fed next
    assert chat.turn("ok").startswith("<|im_end|>\n<|im_start|>user\nok")
    # All that was fed, piece by piece, is the whole conversation rendered once.
    assert chat.fed == render_chat(CHATML, chat.messages, add_generation_prompt=True)


def test_new_input_resumes_a_session_that_stopped():
    """A chat's next turn continues after the end-of-turn token: new ids resume generation,
    which then runs as it would have without the stop (until the stop token comes again)."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=40, d_model=32, layers=["attention"], n_heads=2)).eval()
    plain = model.init_state(1)
    stop = int(generate(model, [1, 2, 3], 1, temperature=0, state=plain)[0, 3])  # the first token ends the turn
    expected = generate(model, [5, 6], 6, temperature=0, state=plain)[0, 2:].tolist()
    assert expected[0] != stop
    expected = expected[: expected.index(stop) + 1] if stop in expected else expected

    state = model.init_state(1)
    assert generate(model, [1, 2, 3], 8, temperature=0, stop=[stop], state=state).shape[1] == 4
    again = generate(model, [5, 6], 6, temperature=0, stop=[stop], state=state)[0, 2:].tolist()
    assert again == expected
