"""Generation controls of the Python API and moe-run: stop strings, finish reasons, top-k, penalties, and the
end of the context (answer so far + finish reason "length"; a prompt that alone is too long fails first)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import cli
from rt_helpers import EOS, TINY_SPEC, FakeEngine, build_tiny_export, byte_ids, byte_tokenizer
from runtime.errors import UserError
from runtime.generation import Pipeline
from runtime.prompt import SYSTEM, Template, Turn
from runtime.sampling import TokenHistory, penalise, sample_next
from runtime.settings import FinishReason, GenerationSettings
from runtime.stop_strings import StopMatcher


class LimitedEngine(FakeEngine):
    def __init__(self, script, max_len):
        super().__init__(script)
        self.max_len = max_len


def pipeline(engine) -> Pipeline:
    return Pipeline(engine, byte_tokenizer(), Template.STABLELM, TINY_SPEC, eos_token_id=EOS)


def test_stop_matcher_holds_back_a_possible_stop_and_cuts_before_it():
    m = StopMatcher(("END", "##"))
    assert [m.push(p) for p in ("ab", "E", "N", "x#")] == ["ab", "", "", "ENx"]
    assert m.push("#tail") == "" and m.stopped  # "##" completed across pieces; nothing after it
    free = StopMatcher(("END",))
    assert free.push("abE") == "ab" and free.flush() == "E" and not free.stopped


def test_stop_string_ends_the_answer_and_is_never_streamed():
    pipe = pipeline(FakeEngine(byte_ids("one. STOP two") + [EOS]))
    pieces = list(pipe.stream(None, "q", max_new_tokens=50, stop=("STOP",)))
    result = pipe.last_result
    assert "".join(pieces) == result.text == "one. " and result.finish_reason is FinishReason.STOP
    assert not any("S" in p for p in pieces)


@pytest.mark.parametrize("script, max_new, reason", [(byte_ids("ab") + [EOS], 10, FinishReason.STOP),
                                                     (byte_ids("abcdef"), 3, FinishReason.LENGTH)])
def test_finish_reason(script, max_new, reason):
    assert pipeline(FakeEngine(script)).generate(None, "q", max_new).finish_reason is reason


def test_end_of_context_returns_the_answer_so_far_with_length():
    probe = pipeline(FakeEngine([EOS]))
    prompt = len(probe.prompt_ids("q", with_image=False))
    engine = LimitedEngine(byte_ids("abcdefgh"), max_len=prompt + 3)
    result = pipeline(engine).generate(None, "q", max_new_tokens=50)
    # positions prompt..prompt+2 fill the context: 3 decode steps, 4 tokens (the last is sampled, not fed)
    assert result.token_ids == byte_ids("abcd") and engine.decoded == byte_ids("abc")
    assert result.finish_reason is FinishReason.LENGTH


def test_prompt_alone_over_the_context_fails_before_any_work():
    probe = pipeline(FakeEngine([EOS]))
    prompt = len(probe.prompt_ids("q", with_image=False))
    engine = LimitedEngine([EOS], max_len=prompt - 1)
    with pytest.raises(UserError, match=f"needs {prompt} positions but the model's context holds {prompt - 1}"):
        pipeline(engine).generate(None, "q")
    assert engine.prefill_inputs == [] and engine.encoded == []


def test_top_k_one_is_greedy_and_top_k_two_draws_only_the_top_two():
    logits = np.array([0.0, 3.0, 2.9, 2.8, -1.0], np.float32)
    rng = np.random.default_rng(0)
    assert {sample_next(logits, 5.0, 1.0, rng, top_k=1) for _ in range(50)} == {1}
    assert {sample_next(logits, 5.0, 1.0, rng, top_k=2) for _ in range(300)} == {1, 2}


def test_penalties_follow_their_definitions():
    logits = np.array([2.0, -2.0, 1.0, 0.5], np.float32)
    history = TokenHistory(4, prompt_ids=[0])
    for token in (1, 1, 2):
        history.add(token)
    settings = GenerationSettings(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # token 0: prompt only -> 2/2; token 1: twice -> -2*2 - 2*0.5 - 0.25; token 2: once -> 1/2 - 0.5 - 0.25
    np.testing.assert_allclose(penalise(logits, history, settings), [1.0, -5.25, -0.25, 0.5])


def test_repetition_penalty_changes_a_greedy_repeat():
    engine = FakeEngine(byte_ids("aaaa"), margin=1.0)  # 'a' beats every other token by only 1.0
    plain = pipeline(engine).generate(None, "q", max_new_tokens=3)
    penalised = pipeline(FakeEngine(byte_ids("aaaa"), margin=1.0)).generate(
        None, "q", max_new_tokens=3, frequency_penalty=2.0)
    assert plain.text == "aaa" and penalised.text[0] == "a" and penalised.text[1] != "a"


@pytest.mark.parametrize("field, value", [("top_k", -1), ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
                                          ("stop", ("",)), ("max_new_tokens", 0), ("temperature", float("inf"))])
def test_out_of_range_settings_are_user_errors(field, value):
    with pytest.raises(UserError, match=field):
        GenerationSettings(**{field: value})


@pytest.fixture(scope="module")
def short_context_export(tmp_path_factory):
    """A tiny export whose context is the prompt "Go" plus 3 positions."""
    out = tmp_path_factory.mktemp("short")
    prompt = len(pipeline(FakeEngine([EOS])).prompt_ids("Go", with_image=False))
    build_tiny_export(out, np.float32, max_positions=prompt + 3)
    return out


def test_moe_run_at_the_end_of_the_context_prints_the_answer_and_warns(short_context_export, capsys):
    code = cli.run_main(["--engine-dir", str(short_context_export), "--prompt", "Go", "--max-new-tokens", "50",
                         "--json"])
    out, err = capsys.readouterr()
    payload = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and payload["finish_reason"] == "length" and len(payload["token_ids"]) == 4
    assert out.startswith(payload["text"])
    assert "warning: the answer stopped after 4 tokens" in err and "context" in err


def test_moe_run_prompt_over_the_context_is_one_error_line(short_context_export, capsys):
    code = cli.run_main(["--engine-dir", str(short_context_export), "--prompt", "Go on and on and on"])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if not line.startswith("moe-run: running on")]  # the device line
    assert code == 2 and out == "" and len(errors) == 1 and errors[0].startswith("error:") and "shorten the prompt" in err


def test_chat_turns_render_in_the_reference_multi_turn_format():
    engine = FakeEngine([EOS])
    pipeline(engine).chat([Turn("Hi", "Hello"), Turn("Bye")])
    fed = engine.prefill_inputs[0][:, 0].astype(int).tolist()
    assert fed == byte_ids(SYSTEM + " USER: Hi ASSISTANT: Hello") + [EOS] + byte_ids("USER: Bye ASSISTANT:")
