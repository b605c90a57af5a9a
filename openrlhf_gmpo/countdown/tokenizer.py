"""Character-level CountDown tokenizer, built offline with the `tokenizers` library.

One token per character of the task alphabet, plus single tokens for the tags and chat roles. The vocabulary is padded
with reserved tokens to a multiple of 8 (40 in all) so the embedding shape is GEMM-friendly.
Chat format (OpenRLHF's --data.apply_chat_template uses it):

    <|user|>Use 44 19 35 to make 28.<|end|><|assistant|><think>...</think><answer>...</answer><|end|>
"""

PAD, UNK, EOS = "<|pad|>", "<|unk|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
# Digits, operators and the characters of "Use ... to make N." and of the think steps ("a+b=c,...").
CHARACTERS = "0123456789+-*/()=,. Usetomak"
VOCAB_MULTIPLE = 8

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def vocabulary() -> list[str]:
    """All tokens in id order: special tokens first (pad is id 0), then characters, then reserved padding."""
    special = [PAD, UNK, EOS, *ROLE_TOKENS, *TAG_TOKENS]
    tokens = special + list(CHARACTERS)
    if len(set(tokens)) != len(tokens):
        raise AssertionError("duplicate token in the CountDown vocabulary")
    reserved = -len(tokens) % VOCAB_MULTIPLE
    return tokens + [f"<|reserved_{i}|>" for i in range(reserved)]


def build_tokenizer():
    """A transformers.PreTrainedTokenizerFast with chat template, pad/unk/eos (no bos); decode(encode(x)) == x."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tokens = vocabulary()
    vocab = {token: i for i, token in enumerate(tokens)}
    # BPE without merges and without a pre-tokenizer splits text into single characters; Fuse joins them back
    # without the spaces a default decoder would insert.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    specials = [t for t in tokens if len(t) > 1]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
