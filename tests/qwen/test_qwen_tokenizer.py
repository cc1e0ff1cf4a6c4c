"""qwen.tiktoken converted to a `tokenizers.Tokenizer` gives tiktoken's ids, as Qwen-1's tokenizer calls it.

Reference = what QWenTokenizer.tokenize does: NFC-normalise, then tiktoken with Qwen's regex and every
special token allowed in the text. The BPE file is trained here (a few hundred merges on mixed text).
"""
import random
import unicodedata

import pytest
import tiktoken

from moe_llava.loading import load_tokenizer
from moe_llava.qwen import tokenizer_from_tiktoken
from runtime.errors import UserError
from tiny import train_tiktoken_ranks, write_tiktoken


CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. USER: What is in the image? ASSISTANT:",
    "The quick brown fox jumps over the lazy dog. I'm sure they've said we'll see; it's 2024 and 3.14159.",
    "这是一张图片。图片里有一个红色的圆和一个蓝色的正方形，左边还有一只猫。你好，世界！",
    "画像には赤い円があります。 사진에 고양이가 있습니다.",
    "def forward(self, x):\n    for i in range(10):\n        x = x * 2  # double\n    return {'a': [1, 2]}\n",
    "<div class=\"box\">\n\t<span>  spaced   out  </span>\n</div>\r\n",
]
TEXTS = [
    "",
    "Hello world",
    "What's in the IMAGE? I'M sure THEY'RE here, we'LL see; you'D know.",
    "这是一张图片，图里有三只猫和一个红色的圆。",
    "未见过的汉字：龘靐齉爩，还有繁體中文與標點「」。",
    "日本語のテキストとハングル 한국어 텍스트",
    "emoji 😀👍🏽🇯🇵 and symbols ∑∫√ © ® ™ €",
    "def f(x):\n\tif x > 0:\n\t\treturn [x ** 2, {'k': None}]\n    else:  pass\n",
    "    leading spaces, trailing spaces    ",
    "runs:  two,   three,\t\ttabs,\n\n\nnewlines,\r\n\r\nCRLF, \u00a0nbsp\u3000ideographic space",
    "numbers 1234567890 3.14159 -42 1e10 ٣٤٥ ½",
    "<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|><|endoftext|>",
    "specials inside words: abc<|extra_7|>def<|extra_204|> and not quite: <|endoftext| <|extra_205|>",
    "USER: <image>\nWhat is this? ASSISTANT: A red circle.<|endoftext|>",
    "combining: e\u0301 vs \u00e9, A\u030a vs \u00c5, \u1100\u1161 (decomposed hangul)",
    "mixed中文English混合text123数字",
    "zero-width\u200bjoiner\u200d and bidi \u202eabc\u202c",
]


# The reference's own settings, transcribed from Qwen-1's tokenization_qwen.py (PAT_STR, ENDOFTEXT, IMSTART,
# IMEND, EXTRAS), not imported from moe_llava.qwen: a drift in the project's copy must fail these tests.
QWEN_PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))


@pytest.fixture(scope="module")
def rank_file(tmp_path_factory):
    ranks = train_tiktoken_ranks(CORPUS * 3, merges=320)
    for digits in (b"12", b"34", b"1234", b"20", b"24", b"2024"):  # reachable only if digits were not split
        ranks.setdefault(digits, len(ranks))                          # one by one, as Qwen's regex does
    return write_tiktoken(ranks, tmp_path_factory.mktemp("qwen_tok") / "qwen.tiktoken"), ranks


@pytest.fixture(scope="module")
def reference(rank_file):
    _, ranks = rank_file
    specials = {token: len(ranks) + i for i, token in enumerate(QWEN_SPECIALS)}
    enc = tiktoken.Encoding("qwen-test", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)
    return enc


def reference_ids(enc, text: str) -> list[int]:
    return enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Strings drawn from letters, digits, punctuation, whitespace runs, CJK, emoji, combining marks, specials."""
    rng = random.Random(seed)
    pools = ["abcXYZ", "0123456789", ".,;:!?'\"-_()[]{}<>|/\\#@", " ", "  \t", "\n", "\r\n", "\u00a0\u3000",
             "图片猫红色圆的是龘", "ひらがなカタカナ", "한국어", "😀👍🏽", "e\u0301\u0308", "'s 'LL 'd"]
    pieces = [rng.choice(pools) for _ in range(count * 12)]
    out = []
    for i in range(count):
        chunk = "".join(rng.choice(p) * rng.randint(1, 4) for p in pieces[i * 12:(i + 1) * 12])
        if rng.random() < 0.2:
            chunk += rng.choice(QWEN_SPECIALS[:5])
        out.append(chunk)
    return out


def test_ids_equal_tiktoken_on_varied_text(rank_file, reference):
    tokenizer = tokenizer_from_tiktoken(rank_file[0])
    for text in TEXTS:
        assert tokenizer.encode(text).ids == reference_ids(reference, text), repr(text)


def test_ids_equal_tiktoken_on_random_text(rank_file, reference):
    tokenizer = tokenizer_from_tiktoken(rank_file[0])
    texts = random_texts(400)
    mismatched = [t for t in texts if tokenizer.encode(t).ids != reference_ids(reference, t)]
    assert not mismatched, mismatched[:3]
    merged = sum(len(t.encode()) - len(tokenizer.encode(t).ids) for t in texts)
    assert merged > 1000  # the trained merges are exercised, not only single bytes


def test_decode_equals_tiktoken(rank_file, reference):
    tokenizer = tokenizer_from_tiktoken(rank_file[0])
    for text in TEXTS:
        ids = reference_ids(reference, text)
        assert tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids)
        assert reference.decode(ids) == unicodedata.normalize("NFC", text)


def test_special_tokens_follow_the_ranks(rank_file):
    path, ranks = rank_file
    tokenizer = tokenizer_from_tiktoken(path)
    assert [tokenizer.token_to_id(t) for t in QWEN_SPECIALS] == list(range(len(ranks), len(ranks) + 208))
    assert tokenizer.get_vocab_size() == len(ranks) + 208
    assert tokenizer.decode([len(ranks), 65], skip_special_tokens=True) == "A"


def test_load_tokenizer_converts_qwen_tiktoken_and_the_result_saves(rank_file, reference, tmp_path):
    """A checkpoint dir with qwen.tiktoken and no tokenizer.json; the export writes tokenizer.json for the runtime."""
    from tokenizers import Tokenizer
    write_tiktoken(rank_file[1], tmp_path / "qwen.tiktoken")
    tokenizer = load_tokenizer(tmp_path)
    tokenizer.save(str(tmp_path / "exported.json"))
    runtime = Tokenizer.from_file(str(tmp_path / "exported.json"))
    for text in TEXTS:
        assert runtime.encode(text).ids == reference_ids(reference, text)


def test_malformed_rank_files_are_user_errors(tmp_path):
    (tmp_path / "bad.tiktoken").write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(UserError, match="bad.tiktoken:2"):
        tokenizer_from_tiktoken(tmp_path / "bad.tiktoken")
    (tmp_path / "gap.tiktoken").write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(UserError, match="not 0..1"):
        tokenizer_from_tiktoken(tmp_path / "gap.tiktoken")
