import pytest
from tokenizers import Tokenizer

from moe_llava.data import conversation_texts, save_hf_tokenizer, train_demo_tokenizer
from runtime.prompt import (END_OF_TEXT, IMAGE_TOKEN_INDEX, SYSTEM, Template, Turn, build_prompt, tokenize_conversation,
                            tokenize_with_image)

TEXTS = [
    "A red circle at the top left and a blue square on the right.",
    "Is there a crescent in the image?",
    "unseen words: zygomorphic quixotry, numbers 12345 and 3.14159",
    "中文文本和日本語のテキスト", "emoji 🙂🚀 and accents: café, naïve",
    "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n", "",
    f"USER: hi ASSISTANT: Yes{END_OF_TEXT}USER: again",
]


@pytest.fixture(scope="module")
def corpus(synthetic_ds):
    return list(conversation_texts([synthetic_ds.captions_json, synthetic_ds.instruct_json]))


@pytest.fixture(scope="module")
def tok(corpus):
    return train_demo_tokenizer(corpus, vocab_size=1024)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    return save_hf_tokenizer(tok, tmp_path_factory.mktemp("tok"))


def test_special_tokens_and_no_bos(tok):
    assert tok.token_to_id(END_OF_TEXT) == 0
    assert tok.encode(END_OF_TEXT).ids == [0]
    assert tok.encode("").ids == []
    assert tok.encode("Yes").ids[0] != 0  # nothing prepended
    assert tok.token_to_id("<image>") is None and len(tok.encode("<image>").ids) > 1
    assert 512 < tok.get_vocab_size() <= 1024


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_round_trip(tok, text):
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_corpus_words_and_template_are_compact(tok):
    # Trained vocabulary: canonical answers and the chat template are a few tokens, not bytes.
    assert len(tok.encode(" circle").ids) == 1 and len(tok.encode(" ASSISTANT").ids) == 1
    assert len(tok.encode(SYSTEM).ids) < len(SYSTEM) / 4


def test_training_is_deterministic(tok, corpus):
    assert train_demo_tokenizer(corpus, vocab_size=1024).to_str() == tok.to_str()


@pytest.mark.parametrize("template", [Template.STABLELM, Template.PLAIN])
def test_image_placeholder_becomes_exactly_one_slot(tok, template):
    prompt = build_prompt(template, "What is in the image?")
    ids = tokenize_with_image(tok, prompt)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    before, after = prompt.split("<image>")
    k = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[:k] == tok.encode(before).ids and ids[k + 1:] == tok.encode(after).ids


def test_conversation_labels_cover_answers(tok):
    turns = [Turn("<image>\nIs there a star in the image?", "No"), Turn("What color is the circle?", "red")]
    ids, labels = tokenize_conversation(tok, Template.STABLELM, turns)
    answers = [i for i, lab in zip(ids, labels) if lab != -100]
    assert tok.decode(answers, skip_special_tokens=False) == f" No{END_OF_TEXT} red{END_OF_TEXT}"
    assert ids.count(IMAGE_TOKEN_INDEX) == 1


def test_hf_files_load_in_both_libraries_and_agree(tok, saved):
    from transformers import AutoTokenizer

    assert {p.name for p in saved.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    raw = Tokenizer.from_file(str(saved / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(saved)
    assert hf.eos_token == hf.pad_token == END_OF_TEXT and hf.bos_token is None
    assert hf.eos_token_id == hf.pad_token_id == 0 and len(hf) == tok.get_vocab_size()
    for text in TEXTS + [SYSTEM, build_prompt(Template.PHI, "Where is the red star?").replace("<image>", "")]:
        ids = tok.encode(text).ids
        assert raw.encode(text).ids == ids
        assert hf(text).input_ids == ids == hf(text, add_special_tokens=False).input_ids
        assert hf.decode(ids) == text
