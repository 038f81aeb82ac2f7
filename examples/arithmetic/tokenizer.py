"""Character-level tokenizer for the arithmetic task, trained offline with the `tokenizers` library.

Every character of the task alphabet is one token (a word-level model over single characters: digits stay separate,
which small models need for arithmetic). Special tokens: ``<pad>`` (a dedicated PAD, distinct from EOS, so
`PipoForCausalLM.from_backbone` does not need to add one), ``<eos>``, ``<unk>``. No chat template: prompts are
plain text (`task.format_prompt`). Saved in transformers format (`PreTrainedTokenizerFast.save_pretrained`).
"""

from __future__ import annotations

from collections.abc import Iterable

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]


def train_tokenizer(texts: Iterable[str]):
    """Train the character-level vocabulary on `texts`; returns a `PreTrainedTokenizerFast`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    fast.padding_side = "left"
    return fast


def corpus(problems, chain_of_thought) -> Iterable[str]:
    for problem in problems:
        yield problem.prompt + chain_of_thought(problem.expression)
