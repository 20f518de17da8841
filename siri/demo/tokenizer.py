"""A character-level tokenizer for the demo task, built in code so nothing is downloaded.

Every character of the task text is one token, which keeps the vocabulary at a few dozen
entries (the embedding and LM head of the tiny model stay negligible) and makes the
response length in tokens the response length in characters, easy to read in a report.

The tokenizer is a `transformers.PreTrainedTokenizerFast`, so the trainer, the rollout
engines and `siri eval` use it exactly as they use a Hugging Face one. It has no chat
template: prompts are raw text (`DataConfig.use_chat_template=False`).
"""

from __future__ import annotations

import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from siri.demo.task import THINK_END

__all__ = ["ALPHABET", "WORDS", "BOS_TOKEN", "EOS_TOKEN", "PAD_TOKEN", "SPECIAL_TOKENS", "build_tokenizer"]

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
# Pad first so that id 0, the value padded tensors are often initialised with, is never a
# real token.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)

# Digits and the arithmetic and LaTeX punctuation the task and its `\boxed{}` answers use,
# ":" "?" "." "," for the prompt text, and all ASCII letters so any English task wording
# fits without growing the vocabulary.
ALPHABET = string.digits + "+-=*/(){}\\ \n:?.," + string.ascii_lowercase + string.ascii_uppercase
# Multi-character tokens: the end of the thinking is one token, as in the reasoning models'
# vocabularies, so it costs one step of the budget.
WORDS = (THINK_END,)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The demo's character-level tokenizer.

    Ids: `<pad>` 0, `<bos>` 1, `<eos>` 2, the characters of `ALPHABET` in order, then `WORDS`
    (matched before the split into characters, and decoded back as they are).
    Encoding adds no special tokens (append `eos_token_id` to a training target yourself).
    `batch_decode(ids, skip_special_tokens=True)` gives back any text over `ALPHABET`
    exactly; a character outside it encodes as `<pad>` and is lost.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in ALPHABET:
        vocab[char] = len(vocab)
    # WordLevel needs an unknown token. The task only writes characters of ALPHABET (a test
    # checks it), so no special `<unk>` is worth a vocabulary slot.
    model = models.WordLevel(vocab=vocab, unk_token=PAD_TOKEN)
    backend = Tokenizer(model)
    # Split into single characters, newlines included ("[\s\S]", since "." skips "\n").
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Concatenate tokens on decode; the default decoder would join them with spaces.
    backend.decoder = decoders.Fuse()
    backend.add_tokens([AddedToken(word, normalized=False) for word in WORDS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # generation pads prompts on the left
    )
