import helpers_countdown
import pytest

from openrlhf_gmpo.countdown.tokenizer import EOS, PAD, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def chat(prompt, response=None):
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def test_vocabulary_is_small_and_has_pad_eos(tokenizer):
    assert len(tokenizer) == 40  # 10 special + 28 characters + 2 reserved = 40, a multiple of 8
    assert tokenizer.pad_token == PAD and tokenizer.pad_token_id == 0
    assert tokenizer.eos_token == EOS
    assert tokenizer.bos_token is None


def test_tags_and_roles_are_single_tokens(tokenizer):
    for tag in ("<think>", "</think>", "<answer>", "</answer>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1, tag
    # Characters are tokens of their own: "12+3" is four tokens.
    assert len(tokenizer("12+3", add_special_tokens=False)["input_ids"]) == 4


def test_every_prompt_and_trace_round_trips(tokenizer):
    for _, prompt, response in helpers_countdown.sample_texts():
        for text in (prompt, response, tokenizer.apply_chat_template(chat(prompt, response), tokenize=False)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids, text
            assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_template_matches_what_openrlhf_slices(tokenizer):
    # OpenRLHF's SFT dataset takes response = full[len(prompt):]; the prompt must be a prefix of the full chat and
    # the response must end in eos so OpenRLHF does not append " " + eos itself.
    _, user, response = helpers_countdown.sample_texts()[0]
    prompt = tokenizer.apply_chat_template(chat(user), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(chat(user, response), tokenize=False)
    assert prompt == f"<|user|>{user}<|end|><|assistant|>"
    assert full == prompt + response + EOS
    # The compact prompt is ~26 tokens with its chat markers.
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= 32


def test_unknown_role_raises(tokenizer):
    with pytest.raises(Exception, match="unknown chat role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "1"}], tokenize=False)


def test_saved_tokenizer_reloads_identically(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    _, prompt, response = helpers_countdown.sample_texts()[1]
    text = tokenizer.apply_chat_template(chat(prompt, response), tokenize=False)
    assert reloaded.apply_chat_template(chat(prompt, response), tokenize=False) == text
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
