"""The demo model's tokenizer: byte-level BPE trained on the synthetic corpus + chat-template text.

Byte-level, so any text (unseen words, CJK, emoji) round-trips through decode. `<|endoftext|>` is the
only special token (EOS and pad); no BOS is ever added. "<image>" is NOT a token: the prompt code
(runtime.prompt.tokenize_with_image) splits it out and tokenises the chunks around it, so the corpus
is split the same way before training.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from runtime.prompt import END_OF_TEXT, IMAGE_PLACEHOLDER, Template, Turn, render_segments

TEMPLATE_REPEATS = 64  # copies of the rendered template text, so " USER:" / " ASSISTANT:" get merges
_SPLIT = re.compile(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(END_OF_TEXT)}")
_SAMPLE_TURNS = [Turn(f"{IMAGE_PLACEHOLDER}\nWhat is in the image?", "A red circle on the left."),
                 Turn("Is there a star in the image?", "No"), Turn("How many objects are there?")]


def template_texts() -> list[str]:
    """Sample conversations rendered with every chat template (system prompt, roles, separators)."""
    return ["".join(text for text, _ in render_segments(t, _SAMPLE_TURNS)) for t in Template]


def corpus_chunks(texts: Iterable[str]) -> Iterator[str]:
    """Texts cut at "<image>" and "<|endoftext|>", as they are tokenised at train/inference time."""
    for text in texts:
        yield from (chunk for chunk in _SPLIT.split(text) if chunk)


def conversation_texts(json_paths: Iterable[Path]) -> Iterator[str]:
    """Every turn's text from LLaVA-JSON files (the corpus for the demo tokenizer)."""
    for path in json_paths:
        for rec in json.loads(Path(path).read_text()):
            yield from (turn["value"] for turn in rec["conversations"])


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no tokens
    return tok


def train_demo_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Tokenizer:
    """Byte-level BPE over `texts` + template text; id 0 is `<|endoftext|>`."""
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [*template_texts() * TEMPLATE_REPEATS, *texts]
    tok.train_from_iterator(corpus_chunks(corpus), trainer=trainer)
    assert tok.token_to_id(IMAGE_PLACEHOLDER) is None, "<image> must not be a token"
    return tok


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int = 2048) -> Path:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, loadable by both
    `tokenizers.Tokenizer.from_file` and `transformers.AutoTokenizer.from_pretrained`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {"eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, **special,
              "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, "model_max_length": model_max_length}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out_dir
