"""The built-in base model `tiny-phi3`: a deterministic, randomly initialised Phi3ForCausalLM with
a byte-level BPE tokenizer trained on the project's own sample data, carrying Phi-3's chat
template and special tokens. Its answers are gibberish; its code path is the one a real
Phi-3-mini-4k-instruct takes. Built once per machine and cached."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
END_OF_TURN = "<|end|>"
# Phi-3's chat template, with generation markers around what the assistant says (its content and
# the <|end|> that stops it) so training can put the loss on assistant tokens only.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
_VOCAB_SIZE = 4000
_COMPLETE = "tiny-phi3.complete"


def build_tiny_phi3(target: Path, seed: int = 0) -> Path:
    """Build the model into `target` unless it is already there; return `target`."""
    if (target / _COMPLETE).exists():
        return target
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

    from shared.datasets.sample import conversations

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-phi3-", dir=target.parent))
    try:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=_VOCAB_SIZE,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        texts = [m["content"] for row in conversations(2000, seed=seed) for m in row["messages"]]
        bpe.train_from_iterator(texts, trainer)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=SPECIAL_TOKENS[1:],
            chat_template=CHAT_TEMPLATE,
            model_max_length=2048,
        )
        tokenizer.save_pretrained(staging)

        end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        assert isinstance(end_id, int)  # one token, one id
        torch.manual_seed(seed)
        config = Phi3Config(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=[end_id, tokenizer.eos_token_id],
            tie_word_embeddings=False,
        )
        model = Phi3ForCausalLM(config)
        model.generation_config.eos_token_id = [end_id, tokenizer.eos_token_id]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging)
        (staging / _COMPLETE).write_text("built by shared.backends.local.tiny_model\n")
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / _COMPLETE).exists():  # not another builder that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
