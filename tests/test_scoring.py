"""Scoring on the shared tiny engine, over real HTTP: /score and OpenAI's legacy echo scoring
against peft + transformers in float32, the predictive's arithmetic, limits, and lm-evaluation-
harness driving the server as its ``local-completions`` backend."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import POOL_SIZE

from ivonserve import calibration
from ivonserve import choices as mc
from ivonserve.predictive import sequence_predictive, token_predictive

PROMPT = "What is 4 * 6?"
CONTINUATIONS = ["4 * 6 = 24\nThe answer is 24.", "The answer is 5."]
TIGHT = 2e-4  # float32 log-softmax over a short sequence


def _ids(engine, continuation: str) -> tuple[list[int], list[int]]:
    return engine.render(PROMPT), engine.encode(continuation)


def _reference(hf, adapter, prompt_ids, continuation_ids) -> list[float]:
    return hf.logprobs(adapter, prompt_ids + continuation_ids, len(prompt_ids))


def test_score_equals_peft_for_every_draw_and_the_predictive(client, engine, hf):
    pool = engine.pools["tiny"]
    body = {"prompt": PROMPT, "continuations": CONTINUATIONS, "n_models": POOL_SIZE,
            "return_tokens": True}  # fmt: skip
    answer = client.post("/score", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["object"] == "ivonserve.score" and result["model"] == "tiny"
    assert result["n_models"] == POOL_SIZE
    assert result["prompt_tokens"] == len(engine.render(PROMPT))
    for i, (score, text) in enumerate(zip(result["scores"], CONTINUATIONS, strict=True)):
        prompt_ids, continuation_ids = _ids(engine, text)
        per_draw = [_reference(hf, d.lora_path, prompt_ids, continuation_ids) for d in pool.draws]
        assert score["index"] == i and score["tokens"] == len(continuation_ids)
        assert score["token_ids"] == continuation_ids
        assert score["draws"] == pytest.approx([sum(d) for d in per_draw], abs=TIGHT)
        assert score["logprob"] == pytest.approx(
            sequence_predictive([sum(d) for d in per_draw]), abs=TIGHT
        )
        assert score["token_logprobs"] == pytest.approx(token_predictive(per_draw), abs=TIGHT)
        assert score["disagreement"] == pytest.approx(
            score["logprob"] - np.mean(score["draws"]), abs=1e-9
        )
        assert score["disagreement"] > 0  # the tiny posterior's draws differ
    assert result["usage"]["completion_tokens"] == 0
    assert set(result["timing"]) == {"queue_s", "score_s", "total_s"}


def test_score_of_the_mean_and_of_a_plain_adapter(client, engine, hf):
    prompt_ids, continuation_ids = _ids(engine, CONTINUATIONS[0])
    for model in ("tiny", "tiny-mean"):
        body = {"prompt": PROMPT, "continuations": CONTINUATIONS[:1], "n_models": 0, "model": model}
        (score,) = client.post("/score", json=body).json()["scores"]
        mean = engine.pools[model].mean.lora_path
        expected = sum(_reference(hf, mean, prompt_ids, continuation_ids))
        assert score["logprob"] == pytest.approx(expected, abs=TIGHT)
        assert score["draws"] == [score["logprob"]] and score["disagreement"] == 0
        assert score["token_logprobs"] is None


def test_draws_are_nested_so_smaller_k_is_a_prefix(client):
    """The predictive of K draws uses draws 0..K-1: a client can derive K = 1, 2, 4 from 8."""
    body = {"prompt": PROMPT, "continuations": CONTINUATIONS[:1]}
    four = client.post("/score", json={**body, "n_models": 4}).json()["scores"][0]
    two = client.post("/score", json={**body, "n_models": 2}).json()["scores"][0]
    assert two["draws"] == pytest.approx(four["draws"][:2], abs=1e-6)
    assert two["logprob"] == pytest.approx(sequence_predictive(four["draws"][:2]), abs=1e-6)


def test_score_messages_and_errors(client, serve_with):
    msgs = [{"role": "user", "content": PROMPT}]
    by_messages = client.post("/score", json={"messages": msgs, "continuations": ["x 1"]})
    by_prompt = client.post("/score", json={"prompt": PROMPT, "continuations": ["x 1"]})
    assert by_messages.json()["scores"][0]["logprob"] == pytest.approx(
        by_prompt.json()["scores"][0]["logprob"], abs=1e-6
    )
    cases = [
        ({"prompt": PROMPT}, "continuations"),
        ({"prompt": PROMPT, "continuations": []}, "continuations"),
        ({"prompt": PROMPT, "continuations": [""]}, "continuations"),
        ({"continuations": ["a"]}, "prompt"),
        ({"prompt": PROMPT, "continuations": ["a"], "n_models": POOL_SIZE + 1}, "n_models"),
        ({"prompt": PROMPT, "continuations": ["a"], "n_models": -1}, "n_models"),
        ({"prompt": PROMPT, "continuations": ["a"], "temperature": 1}, "temperature"),
        ({"prompt": PROMPT, "continuations": ["a" * 3000]}, "continuations"),
    ]
    for body, field in cases:
        answer = client.post("/score", json=body)
        assert answer.status_code == 422, (body, answer.text)
        assert field in answer.json()["error"]["message"], (field, answer.text)
    unknown = client.post("/score", json={"prompt": "x", "continuations": ["a"], "model": "nope"})
    assert unknown.status_code == 404
    small = serve_with(max_continuations=2)
    many = {"prompt": PROMPT, "continuations": ["a", "b", "c"]}
    import httpx

    answer = httpx.post(f"{small.url}/score", json=many, timeout=60)
    assert answer.status_code == 422 and "max_continuations 2" in answer.json()["error"]["message"]


def test_echo_scoring_shapes_and_values_equal_peft(client, engine, hf):
    ids = engine.encode("Natalia sold 48 clips in April.")
    mean = engine.pools["tiny"].mean.lora_path
    expected = hf.logprobs(mean, ids, 1)
    body = {"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 2, "temperature": 0}
    answer = client.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    (choice,) = answer.json()["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=TIGHT)
    assert choice["text"] == "".join(lp["tokens"]) == engine.tokenizer.decode(ids)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    for top, actual in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:], strict=True):
        assert 1 <= len(top) <= 2 and max(top.values()) >= actual - 1e-6
    # max_tokens 1 (what lm-eval sends): one more token at the end, the greedy one
    one = client.post("/v1/completions", json={**body, "max_tokens": 1}).json()
    lp1 = one["choices"][0]["logprobs"]
    assert len(lp1["tokens"]) == len(ids) + 1
    assert lp1["token_logprobs"][: len(ids)] == pytest.approx(lp["token_logprobs"], abs=1e-6)
    assert lp1["token_logprobs"][-1] == pytest.approx(max(lp1["top_logprobs"][-1].values()))
    assert one["usage"]["prompt_tokens"] == len(ids) and one["usage"]["completion_tokens"] == 1


def test_echo_with_n_models_is_the_token_predictive_and_takes_batches(client, engine, hf):
    texts = ["Natalia sold 48 clips.", "Weng earns 12 dollars an hour."]
    draws = engine.pools["tiny"].draws[:2]
    body = {"prompt": texts, "echo": True, "max_tokens": 0, "n_models": 2}
    answer = client.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    choices = answer.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for choice, text in zip(choices, texts, strict=True):
        ids = engine.encode(text)
        per_draw = [hf.logprobs(d.lora_path, ids, 1) for d in draws]
        got = choice["logprobs"]["token_logprobs"]
        assert got[0] is None
        assert got[1:] == pytest.approx(token_predictive(per_draw), abs=TIGHT)
        assert choice["logprobs"]["top_logprobs"] == [None] * len(ids)  # logprobs not asked


def test_echo_errors_name_the_field(client):
    cases = [
        ({"prompt": "hi", "echo": True, "max_tokens": 5}, "echo"),
        ({"prompt": "hi", "logprobs": 1, "max_tokens": 5}, "logprobs"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": ["a", "b"], "max_tokens": 4}, "prompt"),
        ({"prompt": [1, 2, 10**6], "echo": True, "max_tokens": 0}, "prompt"),
        ({"prompt": "hi", "echo": True, "max_tokens": 0, "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "echo": True, "max_tokens": 0, "stream": True}, "stream"),
    ]
    for body, field in cases:
        answer = client.post("/v1/completions", json=body)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["error"]["param"] == field or field in answer.text, answer.text


def _write_task(folder, name: str) -> list[dict]:
    """A small multiple-choice task in lm-eval's local-json form."""
    rows = [
        {"question": "What is 2 + 3?", "choices": ["5", "7", "9"], "gold": 0},
        {"question": "Half of 48?", "choices": ["12", "24", "36"], "gold": 1},
        {"question": "What is 10 - 7?", "choices": ["3", "4", "17"], "gold": 0},
    ]
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n"
    )
    return rows


def test_lm_eval_harness_scores_through_the_server(live, engine, hf, tiny_model, tmp_path):
    """lm-evaluation-harness's own local-completions backend drives /v1/completions; its
    accuracy equals the argmax of the mean adapter's peft log-likelihoods."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    rows = _write_task(tmp_path, "ivonserve_tiny_mc")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(
            f"base_url={live.url}/v1/completions,model=tiny,tokenizer={tiny_model},"
            "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1"
        ),
        tasks=["ivonserve_tiny_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        limit=len(rows),
    )
    accuracy = results["results"]["ivonserve_tiny_mc"]["acc,none"]
    mean = engine.pools["tiny"].mean.lora_path
    right = 0
    for row in rows:
        context = hf.tokenizer.encode(f"Question: {row['question']}\nAnswer:")
        totals = []
        for choice in row["choices"]:
            ids = context + hf.tokenizer.encode(f" {choice}")
            totals.append(math.fsum(hf.logprobs(mean, ids, len(context))))
        right += int(np.argmax(totals) == row["gold"])
    assert accuracy == pytest.approx(right / len(rows))


# --- multiple choice: /score/choices ------------------------------------------------------------
QUESTION, CHOICES = "What is 4 * 6?", ["10", "20", "24", "30"]


def _choice_logprobs(hf, adapter, engine) -> list[float]:
    """peft's log p(letter) after the question's prompt (one forward pass)."""
    ids = mc.prompt_ids(engine.tokenizer, QUESTION, CHOICES)
    letters = mc.letter_token_ids(engine.tokenizer, len(CHOICES))
    return [hf.logprobs(adapter, [*ids, t], len(ids))[0] for t in letters]


def test_choices_equal_peft_for_the_mean_and_each_draw(client, engine, hf):
    pool = engine.pools["tiny"]
    body = {"question": QUESTION, "choices": CHOICES, "n_models": 3}
    answer = client.post("/score/choices", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["object"] == "ivonserve.choice_score" and result["letters"] == list("ABCD")
    expected = [_choice_logprobs(hf, d.lora_path, engine) for d in pool.draws[:3]]
    assert np.allclose(result["choice_logprobs"], expected, atol=TIGHT, rtol=0)
    draws = [calibration.softmax_over(lp) for lp in expected]
    assert np.allclose(result["draws"], draws, atol=TIGHT, rtol=0)
    assert result["probs"] == pytest.approx(np.mean(draws, axis=0), abs=TIGHT)
    assert sum(result["probs"]) == pytest.approx(1.0)
    assert result["answer"] == int(np.argmax(result["probs"]))
    assert result["confidence"] == pytest.approx(max(result["probs"]))
    assert result["disagreement"] > 0  # the tiny posterior's draws differ
    assert result["prompt_tokens"] == len(mc.prompt_ids(engine.tokenizer, QUESTION, CHOICES))

    mean = client.post("/score/choices", json={**body, "n_models": 0}).json()
    expected_mean = _choice_logprobs(hf, pool.mean.lora_path, engine)
    assert mean["choice_logprobs"] == [pytest.approx(expected_mean, abs=TIGHT)]
    assert mean["disagreement"] == 0 and len(mean["draws"]) == 1


def test_choices_as_text_equal_peft_sequence_likelihoods(client, engine, hf):
    pool = engine.pools["tiny"]
    body = {"question": QUESTION, "choices": CHOICES, "n_models": 2, "form": "text"}
    answer = client.post("/score/choices", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["form"] == "text"
    prompt = mc.text_prompt_ids(engine.tokenizer, QUESTION)
    assert result["prompt_tokens"] == len(prompt)
    expected = [
        [sum(hf.logprobs(d.lora_path, prompt + mc.choice_token_ids(engine.tokenizer, c),
                         len(prompt))) for c in CHOICES]
        for d in pool.draws[:2]
    ]  # fmt: skip
    assert np.allclose(result["choice_logprobs"], expected, atol=TIGHT, rtol=0)
    draws = [calibration.softmax_over(lp) for lp in expected]
    assert np.allclose(result["probs"], np.mean(draws, axis=0), atol=TIGHT, rtol=0)


def test_choices_two_and_five_and_the_errors(client):
    for choices in (["yes", "no"], ["1", "2", "3", "4", "5"]):
        answer = client.post("/score/choices", json={"question": "Pick", "choices": choices})
        assert answer.status_code == 200 and len(answer.json()["probs"]) == len(choices)
    bad = [
        ({"question": "q", "choices": ["a"]}, "choices"),
        ({"question": "q", "choices": list("abcdef")}, "choices"),
        ({"question": "q", "choices": ["a", " "]}, "choices"),
        ({"question": "q", "choices": ["a", "b"], "n_models": POOL_SIZE + 1}, "n_models"),
        ({"question": "", "choices": ["a", "b"]}, "question"),
    ]
    for body, field in bad:
        answer = client.post("/score/choices", json=body)
        assert answer.status_code == 422, (body, answer.text)
        assert field in answer.json()["error"]["message"], answer.text
    missing = client.post("/score/choices", json={"question": "q", "choices": ["a", "b"],
                                                  "model": "nope"})  # fmt: skip
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
