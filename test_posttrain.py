"""Tests of post-training (report §5): SFT samples and masks, the GRPO objective and its reward
shaping, the verifiers, the sandbox against hostile programs, and both stages run end to end.

    python -m pytest -q test_posttrain.py
"""

import copy
import dataclasses
import itertools
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch

import data
import tasks
import train
from mellum2 import IGNORE_INDEX, Mellum2
from test_mellum2 import SMALL, rows_per_step

S = data.SPECIAL_TOKENS
U, A, E, THINK, END_THINK = S["<|user|>"], S["<|assistant|>"], S["<|end|>"], S["<think>"], S["</think>"]


@pytest.fixture(scope="module")
def enc():
    return data.load_tokenizer()


# -----------------------------------------------------------------------------------------------
# SFT samples: which tokens train (§5.1)

CONVERSATION = [{"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "4", "reasoning": "two and two"},
                {"role": "user", "content": "and 3 + 3?"},
                {"role": "assistant", "content": "6", "reasoning": "three and three"}]


def trained_pieces(ids, mask):
    """The runs of consecutive trained ids, as lists."""
    pieces, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            pieces, run = pieces + [run], []
    return pieces + ([run] if run else [])


def test_instruct_trains_every_assistant_turn_without_reasoning(enc):
    (ids, mask), = tasks.sft_samples(enc, CONVERSATION, "instruct", 1000)
    t = enc.encode_ordinary
    assert ids == [U, *t("2 + 2?"), E, A, *t("4"), E, U, *t("and 3 + 3?"), E, A, *t("6"), E]
    assert trained_pieces(ids, mask) == [[*t("4"), E], [*t("6"), E]]
    assert THINK not in ids


def test_thinking_trains_only_the_final_turn_with_its_reasoning_and_unfolds(enc):
    samples = tasks.sft_samples(enc, CONVERSATION, "thinking", 1000)
    t = enc.encode_ordinary
    assert len(samples) == 2   # one per assistant turn as the final one
    (first, first_mask), (second, second_mask) = samples
    assert first == [U, *t("2 + 2?"), E, A, THINK, *t("two and two"), END_THINK, *t("4"), E]
    assert trained_pieces(first, first_mask) == [[THINK, *t("two and two"), END_THINK, *t("4"), E]]
    # The earlier turn is context, without its reasoning; only the last turn trains.
    assert second == [U, *t("2 + 2?"), E, A, *t("4"), E, U, *t("and 3 + 3?"), E,
                      A, THINK, *t("three and three"), END_THINK, *t("6"), E]
    assert trained_pieces(second, second_mask) == [[THINK, *t("three and three"), END_THINK, *t("6"), E]]


def test_the_column_traces_write_the_digits_of_the_result():
    """The Thinking scratchpad: the digits it writes column by column, read from the highest place
    to the lowest, are the sum or the difference its last sentence states."""
    for a in range(2, 100):  # the tasks draw from 2 to 30
        for b in range(2, 100):
            trace = tasks.addition_trace(a, b)
            digits = re.findall(r"write (\d)", trace)
            assert int("".join(reversed(digits))) == a + b, (a, b)
            # A column carries exactly when it reaches 10 (a column's sum, its carry in included, is
            # the number before ", write").
            column_sums = [int(n) for n in re.findall(r"(\d+), write", trace)]
            assert trace.count("carry 1") == sum(total >= 10 for total in column_sums), (a, b)
            if b <= a:
                digits = re.findall(r"= (\d)", tasks.subtraction_trace(a, b).split(". So")[0])
                assert int("".join(reversed(digits))) == a - b, (a, b)


def test_unfolding_keeps_at_most_five_and_skips_turns_without_reasoning(enc):
    messages = []
    for i in range(7):
        messages += [{"role": "user", "content": f"q{i}"},
                     {"role": "assistant", "content": f"a{i}", "reasoning": f"r{i}" if i != 5 else ""}]
    samples = tasks.sft_samples(enc, messages, "thinking", 1000)
    # turns 2..6 are the last five; turn 5 has no reasoning and gives no sample
    finals = [enc.decode([i for i in ids if i < data.N_RANKS]).split("r")[-1] for ids, _ in samples]
    assert len(samples) == 4 and finals[-1] == "6a6"
    assert samples[-1][0] == data.render_training_chat(enc, messages, {13}, {13})[0]


def test_samples_longer_than_the_context_are_dropped_not_truncated(enc):
    (ids, _), = tasks.sft_samples(enc, CONVERSATION, "instruct", 1000)
    assert tasks.sft_samples(enc, CONVERSATION, "instruct", len(ids)) == [(ids, _)]
    assert tasks.sft_samples(enc, CONVERSATION, "instruct", len(ids) - 1) == []
    thinking = tasks.sft_samples(enc, CONVERSATION, "thinking", 1000)
    assert tasks.sft_samples(enc, CONVERSATION, "thinking", len(thinking[0][0])) == thinking[:1]


def test_tool_turns_are_context_and_the_call_is_trained(enc):
    task = tasks.tool_task(random.Random(0))
    messages = tasks.demonstration(task)
    (ids, mask), = tasks.sft_samples(enc, messages, "instruct", 1000)
    pieces = trained_pieces(ids, mask)
    assert pieces[0][0] == S["<tool_call>"] and pieces[0][-2:] == [S["</tool_call>"], E]
    assert json.loads(enc.decode(pieces[0][1:-2])) == task.tool_call
    assert enc.decode(pieces[1][:-1]).endswith(task.answer)
    # Thinking, the answer after the tool's reply: its context is what a rollout holds at that point,
    # the call with the reasoning the model wrote before it.
    call, answer = tasks.sft_samples(enc, messages, "thinking", 1000)
    written = data.render_message(enc, messages[1])[1:]  # the first turn, as the model would write it
    reply = data.render_message(enc, messages[2]) + [A]
    assert answer[0][:len(call[0]) + len(reply)] == call[0] + reply and written == call[0][-len(written):]
    response = enc.encode_ordinary(f"<tool_response>{task.answer}</tool_response>")
    start = next(i for i in range(len(ids)) if ids[i:i + len(response)] == response)
    assert not any(mask[start - 1:start + len(response) + 2])   # <|user|> reply <|end|> <|assistant|>


def test_sft_batches_mask_targets_and_repeat(enc):
    sampler = tasks.SFTSampler("thinking", seed=3, batch_size=6, seq_len=256)
    x, y = sampler.get_batch(7)
    again_x, again_y = tasks.SFTSampler("thinking", seed=3, batch_size=6, seq_len=256).get_batch(7)
    assert torch.equal(x, again_x) and torch.equal(y, again_y)
    assert x.shape == y.shape and x.shape[1] <= 256
    trained = y != IGNORE_INDEX
    assert trained.any() and (trained.sum(1) < (x != S["<|pad|>"]).sum(1)).all()   # prompts never train
    inside = trained[:, :-1] & (x[:, 1:] != S["<|pad|>"])
    assert torch.equal(x[:, 1:][inside], y[:, :-1][inside])                        # y is x shifted by one
    assert (x[~trained] != S["<|pad|>"]).any()                                     # prompts are input only
    # Instruct trains every assistant turn from its first token (the one read after <|assistant|>)
    # to its <|end|>, and never the role markers that open the next turns.
    x, y = tasks.SFTSampler("instruct", seed=3, batch_size=16, seq_len=256).get_batch(0)
    assert (y[x == A] != IGNORE_INDEX).all() and (x == A).sum() > 16
    assert not (y == U).any() and not (y == A).any()


def test_an_sft_sample_of_seq_len_plus_one_ids_fits_whole(enc, monkeypatch):
    """seq_len + 1 ids make seq_len inputs and seq_len targets: such a sample is kept, not dropped."""
    messages = tasks.conversation(random.Random(0), "instruct")
    (ids, _), = tasks.sft_samples(enc, messages, "instruct", 10**6)
    calls = itertools.count()

    def the_same_conversation(rng, variant):  # and a bound, should the sampler drop it every time
        assert next(calls) < 50, "the sample was dropped"
        return messages
    monkeypatch.setattr(tasks, "conversation", the_same_conversation)
    x, _ = tasks.SFTSampler("instruct", seed=0, batch_size=2, seq_len=len(ids) - 1).get_batch(0)
    assert x.shape == (2, len(ids) - 1) and x[0].tolist() == ids[:-1]


def test_only_instruct_sft_data_has_reflective_answers(enc):
    reflections = {}
    for variant in ("instruct", "thinking"):
        sampler = tasks.SFTSampler(variant, seed=0, batch_size=32, seq_len=256)
        answers = [enc.decode([t for t in row.tolist() if 0 <= t < data.N_RANKS])  # the trained text
                   for step in range(5) for row in sampler.get_batch(step)[1]]
        reflections[variant] = sum(tasks.count_reflection_words(a) for a in answers)
    assert reflections["instruct"] > 0 and reflections["thinking"] == 0
    # Only math answers reflect: code must stay code that runs, a tool call's answer the call's result.
    rng = random.Random(0)
    for suite in ("code", "tool"):
        task = tasks.make_task(suite, rng)
        assert tasks.demonstration(task, reflective=True) == tasks.demonstration(task)


def test_held_out_problems_never_appear_in_training():
    rng = random.Random(0)
    for suite in tasks.SUITES:
        held = {t.key for t in tasks.eval_tasks(suite, 50)}
        trained = {tasks.make_task(suite, rng).key for _ in range(500)}
        assert held and not held & trained
        # And the held-out share is the small one: training draws from the rest.
        assert all(map(tasks.held_out, held)) and not any(map(tasks.held_out, trained))
    # The same sum in other words ("What is 5 + 3?", "Ava has 5 ... and gets 3 more") is the same
    # problem: the calculation its worked answer ends with never occurs on both sides.
    problem = lambda t: re.findall(r"\d+ [-+*] \d+ = \d+", t.reasoning[-1])[-1]  # noqa: E731
    held = {problem(t) for t in tasks.eval_tasks("math", 200)}
    assert held and not held & {problem(tasks.make_task("math", rng)) for _ in range(2000)}


# -----------------------------------------------------------------------------------------------
# The GRPO objective (§5.2.3), on hand-computed numbers

def test_leave_one_out_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    expected = torch.tensor([[1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(train.leave_one_out_advantages(rewards), expected)


def test_icepop_keeps_rho_inside_the_band_and_drops_it_outside():
    rho = torch.tensor([0.49, 0.5, 1.0, 3.0, 5.0, 5.01, 100.0])
    assert train.icepop_weight(rho).tolist() == [0.0, 0.5, 1.0, 3.0, 5.0, 0.0, 0.0]


def test_grpo_loss_clipping_icepop_and_token_level_mean():
    # row 0 (A = +1): ratios 1.5 (clipped to 1.28), 0.5 (kept: the min picks it), 1.25 (inside the
    # asymmetric band, which a band of 1 +- 0.2 would clip); row 1 (A = -1): ratio 0.5 (clipped to
    # 0.8), 1.5 (kept), and a token whose engine ratio rho = 6 is dropped. A padding token in each
    # row has ratios outside both bands, as a prompt or tool-reply position can: no statistic counts it.
    ratio = torch.tensor([[1.5, 0.5, 3.0, 1.25], [0.5, 1.5, 1.0, 0.3]])
    logp_old = torch.full((2, 4), -1.0)
    logp = (logp_old + ratio.log()).requires_grad_()
    rho = torch.tensor([[1.0, 2.0, 10.0, 1.0], [1.0, 1.0, 6.0, 0.1]])
    logp_infer = logp_old - rho.log()
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    loss, stats = train.grpo_loss(logp, logp_old, logp_infer, torch.tensor([1.0, -1.0]), mask, n_tokens=6)
    expected = -(1.0 * 1.28 + 2.0 * 0.5 + 1.0 * 1.25 + 1.0 * -0.8 + 1.0 * -1.5 + 0.0) / 6
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["icepop_masked"] == 1 and stats["clipped"] == 4
    assert stats["abs_log_rho"] == pytest.approx(math.log(2.0) + math.log(6.0), rel=1e-6)
    loss.backward()
    # Clipped tokens pass no gradient; kept ones pass -w * A * r / n_tokens (d r / d logp = r).
    expected_grad = torch.tensor([[0.0, -2.0 * 0.5 / 6, 0.0, -1.25 / 6], [0.0, 1.5 / 6, 0.0, 0.0]])
    assert torch.allclose(logp.grad, expected_grad, atol=1e-7)


def test_token_level_aggregation_weights_every_token_equally():
    # A 1-token and a 3-token answer with the same advantage: the 3-token one carries 3/4 of the
    # gradient (a per-sequence mean would give each half).
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    loss, _ = train.grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, 1.0]), mask, mask.sum())
    loss.backward()
    assert logp.grad.sum(1).tolist() == pytest.approx([-0.25, -0.75])


def test_overlong_penalty_at_its_boundaries():
    shaped = lambda length: train.overlong_shaped(1.0, length, cap=100, buffer_fraction=0.25, floor=0.0)  # noqa: E731
    assert shaped(10) == 1.0 and shaped(75) == 1.0
    assert shaped(87.5) == pytest.approx(0.5) and shaped(100) == 0.0
    assert train.overlong_shaped(0.0, 90, cap=100, buffer_fraction=0.25, floor=-1.0) == pytest.approx(-0.6)


def test_concision_tiers_at_their_boundaries():
    assert [train.concision_multiplier(n) for n in (0, 1, 2, 3, 5, 6, 40)] == [1.0, 0.9, 0.9, 0.7, 0.7, 0.5, 0.5]
    assert tasks.count_reflection_words("Wait, actually... Hmm. Let me check. awaiting") == 4


def rollout_of(task, reward, answer="", written=3):
    return train.Rollout(task, prompt=[A], ids=[1] * written, written=[1] * written, logp=[0.0] * written,
                         finished=True, answer=answer, reward=reward,
                         reflections=tasks.count_reflection_words(answer))


def test_shaping_applies_concision_to_instruct_only_and_groups_drop_zero_variance():
    task = tasks.math_task(random.Random(0))
    rows = [rollout_of(task, 1.0, "wait wait wait 5"), rollout_of(task, 1.0, "5"),
            rollout_of(task, 0.0), rollout_of(task, 0.0),          # group 2: all wrong
            rollout_of(task, 1.0), rollout_of(task, None)]         # group 3: one unscoreable answer
    partly_right = rollout_of(tasks.code_task(random.Random(0)), 0.5, "# wait, actually: hmm\ndef f(x): ...")
    train.shape_rewards(rows + [partly_right], "instruct", cap=96)
    assert [r.shaped for r in rows[:2]] == [0.7, 1.0] and partly_right.shaped == 0.5
    kept, n_groups = train.usable_groups(rows, group_size=2, wanted=8)
    assert n_groups == 3 and kept == [rows[:2]]
    assert train.usable_groups(rows[:2] * 3, group_size=2, wanted=2) == ([rows[:2]] * 2, 3)  # at most `wanted`
    mixed = [rollout_of(task, 1.0), rollout_of(task, 0.0), rollout_of(task, None)]  # varied, but one unscored
    train.shape_rewards(mixed, "instruct", cap=96)
    assert train.usable_groups(mixed, group_size=3, wanted=8) == ([], 1)
    train.shape_rewards(rows, "thinking", cap=96)
    assert rows[0].shaped == 1.0


def test_the_overlong_penalty_counts_the_tokens_the_model_wrote():
    """A tool's reply in the ids is not the answer's length: 60 written tokens and a 30-token reply
    keep the reward; 84 written tokens, half-way through the last quarter of the cap, halve it."""
    task = tasks.math_task(random.Random(0))
    with_reply = train.Rollout(task, [A], [1] * 90, [1] * 30 + [0] * 30 + [1] * 30, [0.0] * 60, True, "5", 1.0)
    long_answer = train.Rollout(task, [A], [1] * 84, [1] * 84, [0.0] * 84, True, "5", 1.0)
    train.shape_rewards([with_reply, long_answer], "thinking", cap=96)
    assert with_reply.shaped == 1.0 and long_answer.shaped == pytest.approx(0.5)


# -----------------------------------------------------------------------------------------------
# Verifiers (§5.2.1)

def test_math_and_tool_verifiers():
    math_task = tasks.Task("math", "What is 40 + 2?", "42", key="40+2", reasoning=("",))
    assert tasks.reward(math_task, "42") == 1.0 and tasks.reward(math_task, "It is 42.") == 1.0
    assert tasks.reward(math_task, "43") == 0.0 and tasks.reward(math_task, "no idea") == 0.0
    assert tasks.reward(math_task, "-42") == 0.0
    assert tasks.reward(math_task, "4.2") == 0.0 and tasks.reward(math_task, "42.0") == 1.0  # a decimal is whole
    assert tasks.reward(math_task, "42.4") == 0.0  # not rounded to the answer
    assert tasks.reward(math_task, "1,042") == 0.0 and tasks.reward(math_task, "2 * 21 = 42") == 1.0
    # A comma groups thousands, and only them: "4,2" is no 42, "1,234" is 1234
    assert tasks.reward(math_task, "4,2") == 0.0 and tasks.reward(math_task, "1, 4,2") == 0.0
    assert tasks.reward(dataclasses.replace(math_task, answer="1234567"), "It is 1,234,567.") == 1.0
    assert tasks.reward(dataclasses.replace(math_task, answer="2345"), "1,2345") == 1.0  # four digits: no group
    tool = tasks.tool_task(random.Random(1))
    assert tasks.reward(tool, f"{tool.tool_call['arguments']['expression']} = {tool.answer}") == 1.0
    assert tasks.reward(tool, str(int(tool.answer) + 1)) == 0.0
    # A tool task's answer is what its call gives (products and sums both).
    rng = random.Random(2)
    ops = set()
    for _ in range(20):
        tool = tasks.tool_task(rng)
        ops.add(tool.tool_call["arguments"]["expression"].split()[1])
        assert tasks.call_tool(json.dumps(tool.tool_call)) == tool.answer
    assert ops == {"*", "+"}


def test_a_turn_is_parsed_into_its_answer_and_its_call():
    enc, S = data.load_tokenizer(), data.SPECIAL_TOKENS
    t = enc.encode_ordinary
    turn = [S["<think>"], *t("7"), S["</think>"], *t("so "), S["<think>"], *t("8"), S["</think>"], *t("9")]
    assert tasks.parse_turn(enc, turn) == tasks.Turn("9", None)  # what follows the last reasoning block
    # A block that never closes is reasoning to its end, not an answer the verifier may read.
    unclosed = [S["<think>"], *t("3 + 4 = 7. So 3 + 4 = 7.")]
    assert tasks.parse_turn(enc, unclosed) == tasks.Turn("", None)
    assert tasks.parse_turn(enc, [*turn, S["<think>"], *t("10")]) == tasks.Turn("9", None)
    call = [*t("ok "), S["</tool_call>"], *t("a"), S["<tool_call>"], *t('{"x": 1}'), S["</tool_call>"], *t("b")]
    assert tasks.parse_turn(enc, call) == tasks.Turn("ok a" + "b", '{"x": 1}')  # a stray closing tag stays text
    assert tasks.parse_turn(enc, [S["<tool_call>"], *t("{")]) == tasks.Turn("", "{")  # a call never closed


def test_calculator_tool_answers_or_explains():
    call = lambda expression: json.dumps({"name": "calculator", "arguments": {"expression": expression}})  # noqa: E731
    assert tasks.call_tool(call("382 * 47")) == "17954" and tasks.call_tool(call("7 / 2")) == "3.5"
    for expression, result in [("10 - 4", "6"), ("-5 + 3", "-2"), ("7 // 2", "3"), ("7 % 4", "3"),
                               ("6 / 2", "3"), ("1 / 3", "0.333333")]:  # a whole number without ".0"
        assert tasks.call_tool(call(expression)) == result, expression
    for bad in (call("__import__('os')"), call("1 / 0"), call("2 ** 99999"), '{"name": "shell"}', "not json",
                call("True + 1")):  # True is no number
        assert tasks.call_tool(bad).startswith("error:")
    shell = json.dumps({"name": "shell", "arguments": {"expression": "1 + 1"}})  # a calculator's arguments
    assert tasks.call_tool(shell) == "error: the only tool is calculator"
    assert tasks.call_tool(call("1" * 64)) == "1" * 64  # the longest expression it takes
    assert tasks.call_tool(call("1" * 65)).startswith("error: expression must be a string of at most 64")


def test_code_verifier_counts_passed_cases():
    task = tasks.Task("code", "", "", key="", reasoning=("",), cases=(((1,), 3), ((2,), 5), ((0,), 1)))
    assert tasks.reward(task, "def f(x):\n    return 2 * x + 1") == 1.0
    assert tasks.reward(task, "```python\ndef f(x):\n    return 2 * x + 1\n```") == 1.0
    # The first fenced block is the answer; the prose and a usage example after it are not code to run.
    assert tasks.reward(task, "```python\ndef f(x):\n    return 2 * x + 1\n```\nFor example:\n"
                              "```python\nprint(f(1))\n```") == 1.0
    # A program that reports right results and then fails to end (here: it spins at exit, its report
    # already flushed) scores 0, like any crash or timeout.
    spins_at_exit = "import atexit, sys\n@atexit.register\ndef spin():\n    sys.stdout.flush()\n    while True:\n" \
                    "        pass\ndef f(x):\n    return 2 * x + 1"
    assert tasks.code_reward(task, spins_at_exit, timeout=1.0) == 0.0
    assert tasks.reward(task, "def f(x):\n    return 3") == pytest.approx(1 / 3)
    assert tasks.reward(task, "def f(x) return") == 0.0                       # syntax error
    assert tasks.reward(task, "def f(x):\n    return x\nprint('0' * 16, 3)") == 0.0  # cannot print a score
    # A result of another type is wrong, inside a list too: [1.0] is not [1], [True] is not [1].
    assert tasks.same([[1, "a"]], [[1, "a"]]) and not tasks.same(1.0, 1) and not tasks.same(True, 1)
    assert not tasks.same(True, False) and not tasks.same([True], [False])
    assert not tasks.same([1.0], [1]) and not tasks.same([True], [1]) and not tasks.same([[1.0]], [[1]])
    listed = tasks.Task("code", "", "", key="", reasoning=("",), cases=(((1,), [2]), ((2,), [4])))
    assert tasks.reward(listed, "def f(x):\n    return [2 * x]") == 1.0
    assert tasks.reward(listed, "def f(x):\n    return [2.0 * x]") == 0.0


@pytest.mark.parametrize("answer", [
    "```py\ndef f(x):\n    return 2 * x + 1\n```",
    "```Python\ndef f(x):\n    return 2 * x + 1\n```",
    "def f(x):\n    print('computing', end='')\n    return 2 * x + 1",               # leaves its line open
    "from typing import List\nimport heapq, bisect, copy, random\ndef f(x):\n    return 2 * x + 1",
    "def f(x):\n    return 2 * x + 1\nif __name__ == '__main__':\n    print(f(int(input())))",  # a demo
])
def test_code_verifier_accepts_right_answers_however_written(answer):
    task = tasks.Task("code", "", "", key="", reasoning=("",), cases=(((1,), 3), ((2,), 5), ((0,), 1)))
    assert tasks.reward(task, answer) == 1.0


def test_the_sandbox_never_sees_the_expected_values(monkeypatch):
    """The harness only reports what f returned; the comparison happens outside the sandbox, so no
    trick inside it (reading the harness, a caller's frame, a rewritten stdout) can find a right
    result it did not compute."""
    harnesses, real = [], tasks.run_sandboxed

    def recorded(source, timeout):
        harnesses.append(source)
        return real(source, timeout)
    monkeypatch.setattr(tasks, "run_sandboxed", recorded)
    task = tasks.Task("code", "", "", key="", reasoning=("",), cases=(((1,), 987_654_321), ((2,), "needle-in-here")))
    answer = "def f(x):\n    return 987654321 if x == 1 else 'needle-in-here'"
    assert tasks.reward(task, answer) == 1.0
    harness = harnesses[0].replace(repr(answer), "")  # all but the answer's own text
    assert "987654321" not in harness and "needle" not in harness


def test_an_answer_that_replaces_its_output_files_is_read_all_the_same():
    """Output is read through the descriptors the program was given: removing the file, or putting
    a named pipe where it was (which would block whoever opened it by name), changes nothing."""
    task = tasks.Task("code", "", "", key="", reasoning=("",), cases=(((1,), 3), ((2,), 5), ((0,), 1)))
    for trick in ("os.remove('.stdout')", "os.remove('.stdout')\nos.mkfifo('.stdout')",
                  "os.remove('.stderr')\nos.mkfifo('.stderr')"):
        started = time.time()
        assert tasks.code_reward(task, f"import os\n{trick}\ndef f(x):\n    return 2 * x + 1", timeout=1.0) == 1.0
        assert time.time() - started < 5


CHEATS = {
    "an object equal to anything": "class Yes:\n    __eq__ = lambda self, other: True\ndef f(x):\n    return Yes()",
    "a redefined bool": "bool = lambda v: True\ndef f(x):\n    return 0",
    "a redefined print": "import builtins\nreal = print\ndef f(x):\n    return 0\n"
                         "builtins.print = lambda tag, n: real(tag, 300)",
    "a count that is no number": "import builtins\nreal = print\ndef f(x):\n    return 0\n"
                                 "builtins.print = lambda tag, n: real(tag, 'x')",
    "a float for an int": "def f(x):\n    return 2.0 * x + 1",
    "a list of such objects": "class Yes:\n    __eq__ = lambda self, other: True\ndef f(x):\n    return [Yes()]",
    "the expected value from the caller's frame": "import sys\ndef f(*args):\n"
                                                  "    return sys._getframe(1).f_globals['__want']",
    "a stdout that rewrites every number": "import re, sys\nclass Out:\n    def write(self, text):\n"
                                           "        return sys.__stdout__.write(re.sub(r'-?\\d+', '5', text))\n"
                                           "    def flush(self):\n        pass\nsys.stdout = Out()\n"
                                           "def f(x):\n    return 0",
    # The harness, tag included, is the sandbox's input: neither its file nor stdin gives it back.
    "the harness read from its file": "import os, re\nfor name in os.listdir('.'):\n    try:\n"
                                      "        text = open(name).read()\n    except OSError:\n        continue\n"
                                      "    tag = re.search(r\"__print\\('(\\w+)'\", text)\n"
                                      "    if tag:\n        print(tag.group(1), 3)\n        raise SystemExit",
    "a report nested deeper than the decoder follows": "import sys\nsys.setrecursionlimit(10000)\ndef f(x):\n"
                                                       "    v = []\n    for _ in range(1200):\n        v = [v]\n"
                                                       "    return v",
    "the harness read again from stdin": "import os, re\nos.lseek(0, 0, 0)\ntext = os.read(0, 1 << 16).decode()\n"
                                         "print(re.search(r\"__print\\('(\\w+)'\", text).group(1), 3)\n"
                                         "raise SystemExit",
}


@pytest.mark.parametrize("name", CHEATS)
def test_code_verifier_is_not_fooled(name):
    task = tasks.Task("code", "", "", key="", reasoning=("",), cases=(((1,), 3), ((2,), 5), ((0,), 1)))
    if name == "a list of such objects":
        task = dataclasses.replace(task, cases=(((1,), [1]), ((2,), [2]), ((0,), [0])))
    assert tasks.code_reward(task, CHEATS[name]) == 0.0


def test_code_tasks_are_not_passed_by_answers_that_ignore_them():
    rng = random.Random(0)
    for _ in range(300):
        task = tasks.make_task("code", rng)
        arg = task.prompt.split("f(")[1].split(")")[0]
        for body in ("0", "1", arg, "''", "[]", f"sorted({arg})" if arg == "xs" else arg):
            shortcut = eval(f"lambda {arg}: {body}")
            assert not all(tasks.same(shortcut(*args), want) for args, want in task.cases), (task.prompt, body)


def test_every_generated_task_is_solved_by_its_own_reference():
    rng = random.Random(5)
    for suite in tasks.SUITES:
        for _ in range(5):
            task = tasks.make_task(suite, rng)
            answer = tasks.demonstration(task)[-1]["content"]
            assert tasks.reward(task, task.answer if suite == "code" else answer) == 1.0


def test_verifier_retries_its_own_failures_and_keeps_serving(monkeypatch):
    task = tasks.Task("code", "", "", key="", reasoning=("",), cases=(((1,), 1),))
    real, failures = tasks.run_sandboxed, []

    def flaky(source, timeout):
        if len(failures) < 1:
            failures.append(1)
            raise OSError("no more processes")
        return real(source, timeout=timeout)

    with tasks.Verifier(retries=0) as verifier:  # no retries: each answer is still scored once
        assert verifier.submit(task, "def f(x):\n    return x").result() == 1.0
    monkeypatch.setattr(tasks, "run_sandboxed", flaky)
    with tasks.Verifier(retries=2) as verifier:
        assert verifier.submit(task, "def f(x):\n    return x").result() == 1.0   # retried, not scored 0
        monkeypatch.setattr(tasks, "run_sandboxed", lambda source, timeout: (_ for _ in ()).throw(OSError("down")))
        assert verifier.submit(task, "def f(x):\n    return x").result() is None  # persistent: left out
        monkeypatch.setattr(tasks, "run_sandboxed", real)
        assert verifier.score_all([(task, "def f(x):\n    return x"), (task, "bad")]) == [1.0, 0.0]


def test_held_out_accuracy_leaves_out_what_the_verifier_could_not_score(enc, monkeypatch):
    """Without a sandbox (a system that is not POSIX, say) code answers cannot be scored: the code
    suite says so instead of reporting 0% right."""
    import sample
    answer = enc.encode_ordinary("def f(x):\n    return x") + [E]

    temperatures = []

    def scripted(model, prompts, max_new_tokens, temperature, logprobs, **options):
        temperatures.append(temperature)
        logprobs[:] = [[0.0] * len(answer) for _ in prompts]
        return [list(answer) for _ in prompts]

    def no_sandbox(source, timeout):
        raise OSError("the code sandbox needs a POSIX system")
    monkeypatch.setattr(sample, "generate", scripted)
    monkeypatch.setattr(tasks, "run_sandboxed", no_sandbox)
    result = train.evaluate_tasks(Mellum2(SMALL_TASKS), 2, 16)
    assert math.isnan(result["code"]) and 0 <= result["math"] <= 1 and 0 <= result["tool"] <= 1
    assert "code unscored" in train.describe_eval(result, "sft")
    assert set(temperatures) == {0.0}  # held-out accuracy is greedy: the same model, the same score
    # A task counts as solved only with full marks: half the test cases passed is not half a solve.
    monkeypatch.setattr(tasks, "reward", lambda task, text: 0.5)
    result = train.evaluate_tasks(Mellum2(SMALL_TASKS), 2, 16)
    assert [result[suite] for suite in tasks.SUITES] == [0.0] * len(tasks.SUITES)
    # A preset with no held-out tasks scores nothing, and says so, rather than failing on an empty max().
    result = train.evaluate_tasks(Mellum2(SMALL_TASKS), 0, 16)
    assert all(math.isnan(result[key]) for key in (*tasks.SUITES, "reflection_words"))
    assert train.describe_eval(result, "sft").startswith(
        "held-out accuracy " + ", ".join(f"{suite} unscored" for suite in tasks.SUITES))


# -----------------------------------------------------------------------------------------------
# The sandbox against hostile programs: each is stopped in bounded time, scores 0, and leaves the
# host as it was

HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "sleeping forever": "import time\ntime.sleep(60)",
    "fork bomb": "import os\nwhile True:\n    os.fork()",
    "process spawner": "import subprocess\nsubprocess.Popen(['sleep', '60'])",
    "memory bomb": "x = bytearray(4 * 1024**3)",
    "output flood": "while True:\n    print('x' * 1000)",
    "disk filler": "i = 0\nwhile True:\n    open(f'f{i}', 'w').write('x' * 60000)\n    i += 1",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_sandbox_contains_hostile_programs(name):
    started = time.time()
    result = train.run_sandboxed(HOSTILE[name], timeout=1.0)
    assert time.time() - started < 5
    assert not result.ok and len(result.stdout) <= 65536
    task = tasks.Task("code", "", "", key="", reasoning=("",), cases=(((1,), 1),))
    assert tasks.code_reward(task, "def f(x):\n    return x\n" + HOSTILE[name], timeout=1.0) == 0.0


@pytest.mark.parametrize("program", [
    "import _posixsubprocess",  # its fork_exec starts a process with no audit event of its own
    "import os, _signal\n_signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 0)",  # signal 0: only "may it?"
])
def test_the_sandbox_refuses_the_modules_beneath_its_audited_calls(program, monkeypatch):
    for user in (tasks.sandbox_user(), (None, None)):  # as CI runs it (root drops to nobody), and the guard alone
        monkeypatch.setattr(tasks, "sandbox_user", lambda user=user: user)
        result = tasks.run_sandboxed(program)
        assert not result.ok and "is not allowed" in result.stderr


def test_sandbox_sets_each_limit():
    """Read from inside: the audit hook and the wall-clock kill would hide a limit left unset."""
    names = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_CORE")
    program = "import resource\n" + "".join(f"print(resource.getrlimit(resource.{n})[0])\n" for n in names)
    assert train.run_sandboxed(program, timeout=2.0).stdout.split() == ["2", str(256 * 2**20), "65536", "16", "32", "0"]


def test_sandbox_bounds_the_files_a_program_writes():
    """64 files opened for writing, each at most 64 KB: at most 4 MB on disk, however fast it writes."""
    program = ("n = 0\nfor i in range(100):\n    try:\n        open(f'f{i}', 'w').write('x')\n        n += 1\n"
               "    except PermissionError:\n        pass\nprint(n)")
    assert train.run_sandboxed(program).stdout == "64\n"


def test_sandbox_reports_each_way_of_ending():
    assert train.run_sandboxed("print('hi')").ok and train.run_sandboxed("print('hi')").stdout == "hi\n"
    assert train.run_sandboxed("while True: pass", timeout=0.5).timed_out
    crashed = train.run_sandboxed("raise SystemExit(3)")
    assert not crashed.ok and crashed.returncode == 3 and not crashed.timed_out
    memory = train.run_sandboxed("x = bytearray(4 * 1024**3)")
    assert not memory.ok and "MemoryError" in memory.stderr


def test_sandbox_cannot_write_outside_its_directory():
    # A folder anyone may write to, like /tmp, where file permissions would not stop the program.
    folder = Path(tempfile.mkdtemp())
    try:
        folder.chmod(0o777)
        target, keep = folder / "outside.txt", folder / "keep.txt"
        for program in (f"open({str(target)!r}, 'w').write('x')",
                        f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
                        f"import os\nos.remove({str(keep)!r})",
                        f"import os\nopen('x', 'w').write('x')\nos.rename('x', {str(target)!r})",
                        f"import os\nos.symlink('x', {str(target)!r})",
                        f"import os\nos.chmod(os.open({str(keep)!r}, os.O_RDONLY), 0o600)",  # by descriptor
                        f"open({str(target)!r}, 'x').write('x')",  # create-only, no 'w' in the mode
                        # a sibling whose name starts with the sandbox folder's
                        "import os\nos.mkdir(os.getcwd() + 'X')\nopen(os.getcwd() + 'X/f', 'w').write('x')"):
            keep.write_text("precious")
            keep.chmod(0o666)
            result = train.run_sandboxed(program)
            assert not result.ok and not os.path.lexists(target) and keep.read_text() == "precious", program
            assert "sandbox:" in result.stderr and keep.stat().st_mode & 0o777 == 0o666, program  # the hook said no
    finally:
        shutil.rmtree(folder)
    inside = train.run_sandboxed("open('scratch.txt', 'w').write('fine')\nprint(open('scratch.txt').read())")
    assert inside.ok and inside.stdout == "fine\n"


def test_sandbox_sees_no_environment(monkeypatch):
    monkeypatch.setenv("MELLUM2_SECRET", "hunter2")
    result = train.run_sandboxed("import os\nprint(dict(os.environ))")
    assert result.ok and "hunter2" not in result.stdout


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="the privilege drop happens for root")
def test_sandbox_started_by_root_runs_unprivileged():
    result = train.run_sandboxed("import os\nprint(os.getuid(), os.getgid())")
    assert result.ok and "0" not in result.stdout.split()  # neither root's user nor root's group


# -----------------------------------------------------------------------------------------------
# Both stages end to end on a small model

SMALL_TASKS = dataclasses.replace(SMALL, vocab_size=data.VOCAB_SIZE, max_seq_len=256, sliding_window=16)


def save_run(folder, model, stage, steps=1, **settings):
    folder.mkdir(parents=True, exist_ok=True)
    train.save_checkpoint(folder / "ckpt.pt", model, [], steps, dict(stage=stage, steps=steps, **settings))
    return str(folder)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A small model after a short SFT (Instruct) from random weights, long enough that its answers
    end: GRPO learns only from groups of finished answers with different rewards."""
    folder = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    base = save_run(folder / "base", Mellum2(SMALL_TASKS), "pretrain")
    sft_settings = dataclasses.replace(train.SFT_RUNS["tiny"], steps=40, eval_every=40, eval_tasks=2, batch_size=8,
                                       micro_batch=8, lr=3e-3, warmup_steps=2)
    original = train.SFT_RUNS["tiny"]
    train.SFT_RUNS["tiny"] = sft_settings
    try:
        train.train(train.parse_args(["--stage", "sft", "--init-from", base, "--out-dir", str(folder / "sft")]))
    finally:
        train.SFT_RUNS["tiny"] = original
    return folder


def test_sft_stage_runs_and_scores_the_held_out_tasks(sft_run):
    records = [json.loads(line) for line in open(sft_run / "sft" / "metrics.jsonl")]
    assert records[0]["step"] == 0 and set(tasks.SUITES) <= set(records[0]["val"])   # before SFT
    assert records[-1]["step"] == 40 and "val" in records[-1]
    assert records[-1]["ntp"] < records[1]["ntp"] - 1.0
    state = train.load_checkpoint(sft_run / "sft" / "ckpt.pt")
    assert state["settings"]["stage"] == "sft" and state["settings"]["variant"] == "instruct"
    assert state["config"]["aux_loss_coef"] == 1e-4
    # §5.1.2's cosine, not pre-training's schedule: a two-step warmup to the peak, down to a tenth.
    lrs = [r["lr"] for r in records[1:]]
    assert lrs[:2] == pytest.approx([1.5e-3, 3e-3]) and lrs[-1] == pytest.approx(3e-4)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_sft_takes_whole_batches_from_its_first_step(tmp_path, monkeypatch):
    # Pre-training alone ramps its batch (§3.4.3); SFT's preset has no ramp.
    rows = rows_per_step(monkeypatch)
    monkeypatch.setitem(train.SFT_RUNS, "tiny", dataclasses.replace(train.SFT_RUNS["tiny"], steps=2, eval_every=2,
                                                                   eval_tasks=1, batch_size=4, micro_batch=4))
    base = save_run(tmp_path / "base", Mellum2(SMALL_TASKS), "pretrain")
    train.train(train.parse_args(["--stage", "sft", "--init-from", base, "--out-dir", str(tmp_path / "sft")]))
    assert rows == [4, 4]


TINY_RL = train.RLRun(steps=3, prompts=2, group_size=4, lr=1e-3, warmup_steps=1, eval_every=3, eval_tasks=2,
                      ckpt_every=1)


def grpo_args(sft_run, out, *extra):
    return train.parse_args(["--stage", "grpo", "--init-from", str(sft_run / "sft"), "--out-dir", str(out), *extra])


def varied_reward(task, text):
    """A stand-in verifier that gives mixed rewards to any answers (the real ones are tested above)."""
    return float(sum(map(ord, text)) % 3 == 0)


def test_grpo_logs_what_its_batch_holds(sft_run, tmp_path, monkeypatch):
    # Scripted rollouts: every answer right, 3 of its 5 ids written by the model (2 are a tool's
    # reply), and every other answer reflecting thrice, which concision shapes from 1 to 0.7: raw
    # rewards are all equal, shaped ones are not.
    batch_suites = []

    def scripted_rollout(model, enc, task_list, max_tokens, temperature=1.0, seed=None):
        if temperature > 0:  # the training batch (held-out scoring is greedy)
            batch_suites.extend(t.suite for t in task_list)
        return [train.Rollout(t, [1], ids=[5] * 5, written=[1, 1, 0, 0, 1], logp=[-1.0] * 3, finished=True,
                              answer="1", reflections=3 * (i % 2)) for i, t in enumerate(task_list)]

    monkeypatch.setattr(train, "rollout", scripted_rollout)
    monkeypatch.setattr(tasks, "reward", lambda task, text: 1.0)
    monkeypatch.setitem(train.GRPO_RUNS, "tiny", dataclasses.replace(TINY_RL, steps=1, eval_every=1))
    train.grpo(grpo_args(sft_run, tmp_path))
    (record,) = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["step"] == 1]
    assert record["answer_tokens"] == 3 and record["accuracy"] == 1.0
    assert record["suite_accuracy"] == {suite: float(suite in batch_suites) for suite in tasks.SUITES}
    assert record["zero_variance"] == 0.0 and record["groups_kept"] == TINY_RL.prompts


def test_grpo_runs_end_to_end_and_resumes_exactly(sft_run, tmp_path, monkeypatch):
    monkeypatch.setitem(train.GRPO_RUNS, "tiny", TINY_RL)
    monkeypatch.setattr(tasks, "reward", varied_reward)
    start = train.model_from_checkpoint(train.load_checkpoint(sft_run / "sft" / "ckpt.pt"))
    straight = train.grpo(grpo_args(sft_run, tmp_path / "a"))
    records = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3] and "val" in records[0] and "val" in steps[-1]
    assert [r["staleness"] for r in steps] == [0, 1, 1]           # batch k from the policy of step k - 1
    assert sum(r["groups_kept"] for r in steps) > 0
    assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), straight.parameters()))
    # §5.2.4: AdamW (0.9, 0.999), weight decay 0.01 (norm gains none), for every parameter
    (adamw,) = train.load_checkpoint(tmp_path / "a" / "ckpt.pt")["optimizers"]
    assert [(tuple(g["betas"]), g["weight_decay"]) for g in adamw["param_groups"]] == [((0.9, 0.999), 0.01),
                                                                                        ((0.9, 0.999), 0.0)]
    assert sum(len(g["params"]) for g in adamw["param_groups"]) == len(list(start.parameters()))
    # Stopped after one step and resumed: the same parameters, the same logged rewards.
    train.grpo(grpo_args(sft_run, tmp_path / "b"), stop_after=1)
    # With a setting this version reads gone, from the run or from its schedule: said before any step.
    saved = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    schedule = {k: v for k, v in saved["settings"]["run"].items() if k != "eval_tasks"}
    for settings, missing in [({k: v for k, v in saved["settings"].items() if k != "concision"}, "concision"),
                              ({**saved["settings"], "run": schedule}, "eval_tasks")]:
        torch.save({**saved, "settings": settings}, tmp_path / "b" / "ckpt.pt")
        with pytest.raises(train.CheckpointError, match=f"settings lack {missing}, which this train.py reads"):
            train.grpo(grpo_args(sft_run, tmp_path / "b", "--resume"))
    torch.save(saved, tmp_path / "b" / "ckpt.pt")
    resumed = train.grpo(grpo_args(sft_run, tmp_path / "b", "--resume"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    rewards = lambda d: [json.loads(line).get("reward") for line in open(d / "metrics.jsonl")]  # noqa: E731
    assert rewards(tmp_path / "a") == rewards(tmp_path / "b")


def test_grpo_sync_samples_with_the_current_policy(sft_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(train.GRPO_RUNS, "tiny", dataclasses.replace(TINY_RL, steps=4, warmup_steps=2,
                                                                      eval_every=100))
    monkeypatch.setattr(tasks, "reward", varied_reward)
    train.grpo(grpo_args(sft_run, tmp_path, "--sync"))
    steps = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][1:]
    assert [r["staleness"] for r in steps] == [0] * 4
    assert [r["lr"] for r in steps] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])  # §5.2.4: linear warmup, then constant
    capsys.readouterr()
    train.grpo(grpo_args(sft_run, tmp_path, "--sync"))  # a fresh run into the same folder starts a new log
    assert f"note: replacing the finished run in {tmp_path}" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    train.grpo(grpo_args(sft_run, tmp_path, "--resume"))  # finished: nothing is sampled or logged
    assert "had finished all 4 GRPO batches: nothing to do" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_grpo_keeps_policies_only_for_batches_it_will_run(sft_run, tmp_path, monkeypatch):
    monkeypatch.setitem(train.GRPO_RUNS, "tiny", dataclasses.replace(TINY_RL, steps=3, eval_every=100))
    monkeypatch.setattr(tasks, "reward", varied_reward)
    train.grpo(grpo_args(sft_run, tmp_path, "--max-staleness", "4"), stop_after=1)
    # Batches 1 and 2 are left, sampled by the policy of step 0 (stale by up to 4): one copy each, none beyond.
    assert sorted(train.load_checkpoint(tmp_path / "ckpt.pt")["rollout_policies"]) == [1, 2]


@pytest.mark.parametrize("argv,message", [
    (["--stage", "grpo", "--init-from", "{pretrain}"], "holds a --stage pretrain run: start from a --stage sft run"),
    (["--stage", "grpo", "--init-from", "{sft}", "--group-size", "1"], "--group-size must be at least 2"),
    (["--stage", "grpo", "--init-from", "{sft}", "--max-staleness", "60"], "--max-staleness between 0 and 4"),
    (["--stage", "grpo", "--init-from", "{sft}", "--group-size", str(10**9)],  # 12 prompts x 1e9 answers
     "--group-size 1000000000: 12,000,000,000 rollouts at once would need about"),
    (["--stage", "grpo", "--init-from", "{sft}", "--sync", "--max-staleness", "2"], "no effect with --sync"),
    (["--stage", "grpo", "--init-from", "{sft}", "--variant", "thinking"], "needs a thinking SFT run"),
    (["--stage", "grpo"], "give --init-from"),
    (["--stage", "sft"], "give --init-from"),
])
def test_post_training_bad_input(argv, message, sft_run, tmp_path, capsys):
    argv = [a.format(pretrain=sft_run / "base", sft=sft_run / "sft") for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        train.main([*argv, "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv", [["--stage", "rlhf"], ["--stage", "sft", "--variant", "chatty"]])
def test_unknown_stage_or_variant_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_grpo_tensors_train_exactly_the_written_tokens_of_finished_rollouts():
    task = tasks.math_task(random.Random(0))
    prompt = [U, 5, 6, E, A]
    # The model writes a call (7, 8), the tool's reply (20, 21) is appended, the model writes 9 and <|end|>.
    used_tool = train.Rollout(task, prompt, [7, 8, 20, 21, 9, E], [1, 1, 0, 0, 1, 1], [-0.1, -0.2, -0.3, -0.4],
                              True, "", 1.0, 0.7)  # right, shaped down to 0.7: the advantage uses the shaped
    unfinished = train.Rollout(task, prompt, [7, 8, 9], [1, 1, 1], [-0.5, -0.6, -0.7], False, "", 0.0, 0.0)
    x, targets, mask, logp_infer, advantages = train.grpo_tensors([[used_tool, unfinished]], data.PAD)
    assert x[0].tolist() == prompt + [7, 8, 20, 21, 9] and targets[0].tolist() == prompt[1:] + used_tool.ids
    trained = (mask[0] > 0).nonzero().flatten().tolist()
    assert trained == [4, 5, 8, 9] and targets[0, trained].tolist() == [7, 8, 9, E]   # not the tool's reply
    assert logp_infer[0, trained].tolist() == pytest.approx(used_tool.logp)
    assert not mask[1].any()                       # over the cap: dropped from the loss
    assert advantages.tolist() == pytest.approx([0.7, -0.7])
    # Two groups: each row gets its own group's advantage, in the order of the rows.
    second = [dataclasses.replace(used_tool, shaped=0.5), dataclasses.replace(unfinished, shaped=0.1)]
    assert train.grpo_tensors([[used_tool, unfinished], second], data.PAD)[-1].tolist() == \
        pytest.approx([0.7, -0.7, 0.4, -0.4])


def test_a_rollout_cut_off_by_the_cap_is_unfinished(enc):
    model = Mellum2(SMALL_TASKS).eval()
    torch.nn.init.zeros_(model.lm_head.weight)   # every logit 0: greedy writes id 0 forever, never <|end|>
    row, = train.rollout(model, enc, [tasks.math_task(random.Random(0))], max_tokens=5, temperature=0.0)
    assert row.ids == [0] * 5 and row.written == [1] * 5 and not row.finished and row.answer == ""


def test_reflection_words_count_in_the_reasoning_and_the_calls_too(enc, monkeypatch):
    """The concision penalty reads all a rollout wrote: a "wait" moved into <think> tags or before a
    tool call, where the answer the verifier reads leaves it out, still counts."""
    import sample
    t = enc.encode_ordinary
    turns = [[*t("Hmm, wait. "), S["<tool_call>"], *t('{"name": "calculator", "arguments": {"expression": "2"}}'),
              S["</tool_call>"], E],
             [THINK, *t("actually, wait"), END_THINK, *t("2"), E]]

    def scripted(model, prompts, max_new_tokens, temperature, logprobs, **options):
        turn = turns.pop(0)
        logprobs[:] = [[0.0] * len(turn)]
        return [turn]

    monkeypatch.setattr(sample, "generate", scripted)
    row, = train.rollout(Mellum2(SMALL_TASKS).eval(), enc, [tasks.tool_task(random.Random(0))], max_tokens=96)
    assert row.finished and row.answer == "2" and row.reflections == 4
    row.reward = 1.0
    train.shape_rewards([row], "instruct", cap=96)
    assert row.shaped == 0.7


def test_a_tool_call_that_reaches_the_cap_is_unfinished(enc, monkeypatch):
    """Its answer would need tokens past the cap: it leaves the loss like any rollout cut off there,
    rather than staying in it as a finished answer that said nothing."""
    import sample
    call = [S["<tool_call>"], *enc.encode_ordinary('{"name": "calculator", "arguments": {"expression": "2"}}'),
            S["</tool_call>"], E]

    def scripted(model, prompts, max_new_tokens, temperature, logprobs, **options):
        logprobs[:] = [[0.0] * len(call) for _ in prompts]
        return [list(call) for _ in prompts]

    monkeypatch.setattr(sample, "generate", scripted)
    row, = train.rollout(Mellum2(SMALL_TASKS).eval(), enc, [tasks.math_task(random.Random(0))], max_tokens=len(call))
    assert row.ids == call and not row.finished and row.answer == ""


def test_a_rollouts_budget_counts_the_tokens_it_wrote_not_the_tools(enc, monkeypatch):
    """The tool's reply is read, not written: after a call of k tokens, an answer may write max_tokens - k."""
    import sample
    call = [S["<tool_call>"], *enc.encode_ordinary('{"name": "calculator", "arguments": {"expression": "2"}}'),
            S["</tool_call>"], E]
    turns, budgets = [call, [*enc.encode_ordinary("2"), E]], []

    def scripted(model, prompts, max_new_tokens, temperature, logprobs, **options):
        budgets.append(max_new_tokens)
        turn = turns.pop(0)
        logprobs[:] = [[0.0] * len(turn)]
        return [turn]

    monkeypatch.setattr(sample, "generate", scripted)
    row, = train.rollout(Mellum2(SMALL_TASKS).eval(), enc, [tasks.tool_task(random.Random(0))],
                         max_tokens=len(call) + 5)
    assert budgets == [len(call) + 5, 5] and row.finished and row.answer == "2"


def test_each_turn_of_a_rollout_draws_from_a_seed_of_its_own(enc, monkeypatch):
    """A row that calls the tool in every turn: turns seeded alike would draw the same numbers."""
    import sample
    call = [S["<tool_call>"], *enc.encode_ordinary('{"name": "calculator", "arguments": {"expression": "2"}}'),
            S["</tool_call>"], E]
    seeds = []

    def scripted(model, prompts, max_new_tokens, temperature, logprobs, seed, **options):
        seeds.append(seed)
        logprobs[:] = [[0.0] * len(call) for _ in prompts]
        return [list(call) for _ in prompts]

    monkeypatch.setattr(sample, "generate", scripted)
    train.rollout(Mellum2(SMALL_TASKS).eval(), enc, [tasks.tool_task(random.Random(0))], max_tokens=200, seed=3)
    assert seeds == [3 * train.MAX_TURNS + turn for turn in range(train.MAX_TURNS)]
    train.rollout(Mellum2(SMALL_TASKS).eval(), enc, [tasks.tool_task(random.Random(0))], max_tokens=200)
    assert seeds[train.MAX_TURNS:] == [None] * train.MAX_TURNS  # unseeded: fresh draws every turn


def test_each_batch_of_rollouts_draws_from_a_seed_of_its_own(monkeypatch):
    """Batches seeded alike would draw the same noise every step; the same batch, resampled after a
    resume, the same as before."""
    seeds = []
    monkeypatch.setattr(train, "rollout", lambda *args, seed, **options: seeds.append(seed) or [])
    model = Mellum2(SMALL_TASKS)
    worker = train.RolloutWorker(model, train.GRPO_RUNS["tiny"], "instruct", seed=7, concision=True, threads=1)
    try:
        for index in (0, 1, 0):
            worker._sample(index, train.copy_weights(model))
    finally:
        worker.close()
    assert seeds[0] != seeds[1] and seeds[2] == seeds[0]


def group_sampled_by(engine, answers_and_rewards):
    """A group of finished rollouts of one math prompt, with the engine's own log-probabilities (the
    trainer's too, so IcePop keeps every token)."""
    task, prompt, rows = tasks.math_task(random.Random(0)), [U, 5, 6, E, A], []
    for answer, reward in answers_and_rewards:
        with torch.no_grad():
            logp = train.token_logprobs(engine, torch.tensor([prompt + answer[:-1]]),
                                        torch.tensor([prompt[1:] + answer]))[0, -len(answer):].tolist()
        rows.append(train.Rollout(task, prompt, answer, [1] * len(answer), logp, True, "", reward, reward))
    return rows


def test_grpo_normalises_by_the_mini_batch_however_it_is_split(monkeypatch):
    """The loss is a mean over a mini-batch's tokens: splitting it into micro-batches of one row
    must give the same update (plain SGD shows the gradients themselves), and each of the two
    mini-batches divides by its own answer tokens, not the whole batch's."""
    torch.manual_seed(0)
    engine = Mellum2(SMALL_TASKS)
    rows = group_sampled_by(engine, [([40, E], 1.0), ([50, 51, 52, E], 0.0), ([41, 42, E], 1.0), ([50, E], 0.0)])
    updated, divisors = [], []
    grpo_loss = train.grpo_loss
    monkeypatch.setattr(train, "grpo_loss", lambda *args: divisors.append(int(args[-1])) or grpo_loss(*args))
    for micro_batch in (1, 16):
        model = copy.deepcopy(engine)
        train.grpo_update(model, [torch.optim.SGD(model.parameters(), lr=1.0)], [rows], micro_batch=micro_batch)
        updated.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (updated[0] - updated[1]).abs().max().item() < 1e-6
    assert divisors == [2 + 4] * 2 + [3 + 2] * 2 + [2 + 4, 3 + 2]  # micro-batches of 1, then of 16


def test_grpo_update_steps_once_per_mini_batch_against_the_policy_before_it():
    """Two mini-batches are two optimizer steps, and both are measured against the log-probs taken
    before the first: after a large first step the second one's ratios leave the clip range."""
    torch.manual_seed(0)
    model = Mellum2(SMALL_TASKS)
    rows = group_sampled_by(model, [([40, E], 1.0), ([50, 51, E], 0.0), ([41, 42, E], 1.0), ([50, E], 0.0)])
    fresh, steps = copy.deepcopy(model), []
    optimizer = torch.optim.SGD(model.parameters(), lr=30.0)
    optimizer.register_step_post_hook(lambda *args: steps.append(1))
    totals = train.grpo_update(model, [optimizer], [rows], minibatches=2, grad_clip=1e9)
    assert len(steps) == 2 and totals["clipped"] > 0
    # Each step's gradient is clipped (§5.2.4: at 1.0) before it is taken.
    before = [p.detach().clone() for p in fresh.parameters()]
    train.grpo_update(fresh, [torch.optim.SGD(fresh.parameters(), lr=1.0)], [rows], minibatches=1, grad_clip=1e-3)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(fresh.parameters(), before)])
    assert 0 < moved.norm() <= 1e-3 * 1.0001


def test_a_mini_batch_of_unfinished_rollouts_alone_trains_nothing_and_breaks_nothing():
    """Cut off by the cap, a rollout has no tokens in the loss: a mini-batch of only such rows
    divides a zero loss by zero tokens, which must be a zero gradient, not NaN."""
    torch.manual_seed(0)
    model = Mellum2(SMALL_TASKS)
    rows = group_sampled_by(model, [([40, E], 1.0), ([41, E], 1.0), ([50, 51], 0.0), ([52, 53], 0.0)])
    for row in rows[2:]:
        row.finished = False
    totals = train.grpo_update(model, [torch.optim.SGD(model.parameters(), lr=1.0)], [rows], minibatches=2)
    assert totals["tokens"] == 4 and all(torch.isfinite(p).all() for p in model.parameters())


def test_grpo_update_makes_rewarded_answers_more_likely():
    torch.manual_seed(0)
    model = Mellum2(SMALL_TASKS)
    good, bad = [40, 41, E], [50, 51, E]

    def margin():  # log p(good answer) - log p(bad answer) under the model as it is now
        good_row, bad_row = group_sampled_by(model, [(good, 1.0), (bad, 0.0)])
        return sum(good_row.logp) - sum(bad_row.logp)

    before = margin()
    optimizers = train.build_optimizers(model, 1e-3, weight_decay=0.0, optimizer="adamw")
    for _ in range(5):
        train.grpo_update(model, optimizers, [group_sampled_by(model, [(good, 1.0), (bad, 0.0), (bad, 0.0),
                                                                       (good, 1.0)])])
    assert margin() > before + 1.0
