"""Eval generation: sorted batches give the unsorted outputs in prompt order; an interrupted
eval resumes from its JSONL to the same file; two ranks give what one gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sftkit.eval.config import GenerationSection
from sftkit.eval.generate import GenerationStream, batch_plan, generate_all

REPO = Path(__file__).resolve().parents[3]
QUICKSTART_EVAL = REPO / "examples" / "configs" / "evals" / "quickstart.yaml"  # local data
WORDS = "one two three four five six seven eight nine ten".split()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer


def mixed_prompts(count: int = 10) -> list[str]:
    """Prompts of 2..20 words (a 10x spread), not in length order."""
    lengths = [(7 * i) % count + 1 for i in range(count)]
    return [" ".join(WORDS[j % 10] for j in range(2 * n)) for n in lengths]


def test_batch_plan_is_longest_first_and_covers_every_prompt() -> None:
    assert batch_plan([3, 9, 1, 9, 5], 2) == [[1, 3], [4, 0], [2]]
    assert batch_plan([3, 9, 1], 2, sort=False) == [[0, 1], [2]]


def test_sorted_batches_give_unsorted_outputs_in_prompt_order(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompts = mixed_prompts()
    cfg = GenerationSection(max_new_tokens=3, batch_size=3)
    ordered = generate_all(model, tokenizer, prompts, cfg, 2, 0, sort=True)
    plain = generate_all(model, tokenizer, prompts, cfg, 2, 0, sort=False)
    alone = [generate_all(model, tokenizer, [p], cfg, 2, 0)[0] for p in prompts[:2]]
    assert ordered == plain and ordered[:2] == alone
    assert all(len(group) == 2 and group[0] == group[1] for group in ordered)  # greedy


class Interrupted(Exception):
    pass


def test_interrupted_eval_resumes_to_the_same_file(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    """Sampling (seeded per batch) is stopped after 2 of 4 batches; the rerun generates only
    the other 2 and leaves the file an uninterrupted run writes, one row per prompt."""
    model, tokenizer = tiny
    prompts = mixed_prompts(8)
    cfg = GenerationSection(max_new_tokens=3, batch_size=2, temperature=0.9, top_k=20)
    fingerprint = {"run": "x"}
    whole = GenerationStream(tmp_path / "whole.jsonl", fingerprint)
    expected = generate_all(model, tokenizer, prompts, cfg, 2, 0, seed=3, stream=whole)

    calls = {"n": 0}
    real_generate = model.generate

    def stop_after_two(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupted
        return real_generate(*args, **kwargs)

    path = tmp_path / "resumed.jsonl"
    model.generate = stop_after_two
    try:
        with pytest.raises(Interrupted):
            generate_all(model, tokenizer, prompts, cfg, 2, 0, seed=3,
                         stream=GenerationStream(path, fingerprint))  # fmt: skip
        assert len(path.read_text().splitlines()) == 1 + 4  # header + 2 batches of 2
        with path.open("a") as f:
            f.write('{"index": 5, "samp')  # a line cut by the kill
        calls["n"] = -10
        again = generate_all(model, tokenizer, prompts, cfg, 2, 0, seed=3,
                             stream=GenerationStream(path, fingerprint))  # fmt: skip
    finally:
        del model.generate
    assert calls["n"] == -10 + 2  # only the 2 missing batches ran
    assert again == expected
    assert path.read_text() == (tmp_path / "whole.jsonl").read_text()
    rows = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert [r["index"] for r in rows] == list(range(8))
    with pytest.raises(ValueError, match="holds generations of another eval run.*delete it"):
        GenerationStream(path, {"run": "other model"}).done()


@pytest.mark.slow
def test_two_ranks_generate_what_one_does(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`sftkit eval cluster.gpus_per_node=2` (self-launched gloo ranks, each a share of the
    batches) saves the same generations and score as one process."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input": p, "output": "7"}) + "\n"
                            for p in mixed_prompts(10)))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    saved = {}
    for ranks in (1, 2):
        out = tmp_path / f"eval{ranks}.json"
        result = subprocess.run(
            [sys.executable, "-m", "sftkit.cli", "eval", "--config", str(QUICKSTART_EVAL),
             f"generation.model_name={tiny_model_dir}",
             f"data.data_path={data}", "generation.batch_size=3", "generation.max_new_tokens=4",
             "generation.device=cpu", f"cluster.gpus_per_node={ranks}", f"eval.save_path={out}",
             "eval.metric=pass@k",
             f"eval.generations_path={tmp_path / f'gen{ranks}.jsonl'}"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        saved[ranks] = json.loads(out.read_text())
    assert saved[2]["generations"] == saved[1]["generations"]
    assert saved[2]["score"] == saved[1]["score"] and saved[1]["verify_timed_out"] == 0
    assert (tmp_path / "gen2.jsonl").read_text() == (tmp_path / "gen1.jsonl").read_text()
    assert not list(tmp_path.glob("gen2.jsonl.rank*"))  # the ranks' files merged


def test_fingerprint_changes_with_the_weights_and_the_sampling(tmp_path: Path) -> None:
    from sftkit.eval.config import load_eval_config
    from sftkit.eval.run import run_fingerprint

    model = tmp_path / "final_hf"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"old")
    cfg = load_eval_config(None, [f"generation.model_name={model}"])
    first = run_fingerprint(cfg, ["a", "b"], str(model), None)
    assert run_fingerprint(cfg, ["a", "b"], str(model), None) == first
    assert run_fingerprint(cfg, ["a", "c"], str(model), None) != first
    (model / "model.safetensors").write_bytes(b"retrained")  # same name, new weights
    second = run_fingerprint(cfg, ["a", "b"], str(model), None)
    assert second["weights"] != first["weights"]
    cfg.generation.temperature = 0.7
    assert run_fingerprint(cfg, ["a", "b"], str(model), None)["sampling"] != second["sampling"]


# A real SIGKILL of `sftkit eval` (39 s here); the in-process interruption test above covers
# the same resume path in the default suite.
@pytest.mark.heavy
@pytest.mark.slow
def test_killed_eval_resumes_to_the_same_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`sftkit eval` killed (SIGKILL) after some batches reached its JSONL: the same command
    again generates only the rest and ends with the file an uninterrupted run writes."""
    import signal
    import time

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input": p, "output": "7"}) + "\n"
                            for p in mixed_prompts(12)))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "sftkit.cli", "eval", "--config", str(QUICKSTART_EVAL),
                f"generation.model_name={tiny_model_dir}",
                f"data.data_path={data}", "generation.batch_size=1", "generation.max_new_tokens=48",
                "generation.device=cpu", f"eval.generations_path={tmp_path / name}"]  # fmt: skip

    whole = subprocess.run(command("whole.jsonl"), env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    path = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(command("killed.jsonl"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= 1 + 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the eval finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(path.read_text().splitlines()) - 1
    assert 3 <= done < 12
    again = subprocess.run(command("killed.jsonl"), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming: {done} of 12 prompts already generated" in again.stderr
    assert path.read_text() == (tmp_path / "whole.jsonl").read_text()
    rows = [json.loads(line)["index"] for line in path.read_text().splitlines()[1:]]
    assert rows == list(range(12))  # one row per prompt, no duplicates


def test_stream_skips_a_cut_line_and_keeps_rows_appended_after_it(tmp_path: Path) -> None:
    path = tmp_path / "gens.jsonl"
    stream = GenerationStream(path, {"run": 1})
    stream.append([(0, ["a"])])
    with path.open("a") as f:
        f.write('{"index": 1, "samp')  # the kill came mid-write
    stream.append([(2, ["c"])])
    assert stream.done() == {0: ["a"], 2: ["c"]}
    path.write_text('{"sftkit_eval_str')  # killed while writing the header
    assert stream.done() == {} and not path.exists()
