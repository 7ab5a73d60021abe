"""``rftlab diagnose rewards`` on a tiny GPT-2 saved with save_pretrained and prompts written here: the per-prompt
statistics equal the experiment code's (same prompts and seed, same rewards), the recommendation rule, the
gradient norms, PEFT adapters, chat templates, and one-line errors for bad input."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from rftlab import config, models, results, tokenization
from rftlab.cli import app
from rftlab.diagnose import inputs, rewards
from rftlab.errors import RftlabError
from rftlab.lm_config import LMConfig
from rftlab.rl import train

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning", "the sun is warm",
         "cats and dogs play", "the park is green"] * 10
PROMPTS = ["the cat", "a dog", "birds", "the sun", "cats and", "the park", "a cat", "the dog"]
REWARD_MODULE = '''
def letter_share(prompts, completions, **kwargs):
    """Share of the letter a in each completion (0 when empty)."""
    return [c.count("a") / max(len(c), 1) for c in completions]

def constant(prompts, completions):
    return [1.0] * len(completions)

def with_column(prompts, completions, weight):
    return [float(w) * len(c) for c, w in zip(completions, weight)]

def broken(prompts, completions):
    raise ZeroDivisionError("no")

def short(prompts, completions):
    return [0.0]

def nan(prompts, completions):
    return [float("nan")] * len(completions)
'''


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tokenizer = tokenization.train_bpe_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = models.build_model(LMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64), tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p, "weight": i % 3} for i, p in enumerate(PROMPTS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def reward_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    return "my_rewards"


def diagnose(tmp_path: Path, *words: str) -> Path:
    from rftlab import diagnose as package

    cfg = config.resolve(rewards.Config, [], list(words))
    return package.execute("rewards", cfg, out_root=tmp_path / "out")


def invoke(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_cli_end_to_end_matches_the_experiment_statistics(tmp_path, saved_model, prompts_file, reward_module) -> None:
    start = time.perf_counter()
    code, out, err = invoke("diagnose", "rewards", "--model", saved_model, "--prompts", prompts_file, "--reward",
                            f"{reward_module}:letter_share", "-k", "6", "--max-new-tokens", "8", "--out",
                            tmp_path / "out", "grad_prompts=4", "seed=3", "label_budget=2")
    elapsed = time.perf_counter() - start
    assert code == 0, err
    folder = Path(out.strip().splitlines()[-1])
    assert folder.parent == tmp_path / "out" / "diagnose-rewards"
    assert json.loads((folder / "config.json").read_text())["status"] == "complete"
    table = results.read_table(folder, "prompts")
    assert len(table) == len(PROMPTS) and elapsed < 60

    # the oracle: the experiment code's per-input statistics on the same model, prompts, generation and seed
    model, tokenizer = inputs.load_model(str(saved_model))
    score = inputs.load_reward(f"{reward_module}:letter_share", inputs.load_prompts(str(prompts_file)))
    generation = {"max_new_tokens": 8, "min_new_tokens": 0, "top_k": 0, "top_p": 1.0, "max_prompt_length": None}
    expected, texts = train.per_input_rewards(model, tokenizer, PROMPTS, score, 6, generation, seed=3, batch_size=32)
    np.testing.assert_allclose(np.stack(table.rewards), expected)
    np.testing.assert_allclose(table.reward_std, expected.std(1))
    np.testing.assert_allclose(table.reward_mean, expected.mean(1))
    samples = results.read_table(folder, "samples")
    assert samples.completion.tolist() == texts
    np.testing.assert_allclose(samples.reward, [t.count("a") / max(len(t), 1) for t in texts])

    # gradient norms on 4 prompts spread over the std ranking, 0 exactly where the K samples tie
    measured = table[table.grad_norm.notna()]
    assert len(measured) == 4 and set(measured.prompt_id) == set(rewards.grad_subset(table.reward_std, 4))
    assert ((measured.grad_norm == 0) == (measured.grad_reward_std == 0)).all()
    # recommendation: 2 prompts, the rule of rewards.recommend
    assert table.recommended.sum() == 2
    picked = table[table.recommended].sort_values("sft_rank")
    assert picked.prompt_id.tolist() == rewards.recommend(table.reward_mean, table.reward_std, 2).tolist()
    subset = pd.read_json(folder / "sft_subset.jsonl", lines=True)
    assert subset.prompt.tolist() == picked.prompt.tolist() and "weight" in subset
    summary = (folder / "summary.md").read_text()
    share = (table.reward_std <= 0.05).mean()
    assert f"| 0.05 | {share:.1%} |" in summary and "Recommended SFT subset (2 prompts" in summary
    assert (folder / "figures" / "diagnose_rewards.png").stat().st_size > 10_000
    assert f"{share:.0%}" in err or "reward std" in err  # the summary is printed (stderr) before the path

    # rftlab plot re-renders the report's figure from disk
    (folder / "figures" / "diagnose_rewards.png").unlink()
    code, out, _ = invoke("plot", folder)
    assert code == 0 and Path(out.strip()).name == "diagnose_rewards.png"


def test_recommendation_takes_low_mean_prompts_by_std_then_mean() -> None:
    mean = np.array([0.9, 0.1, 0.2, 0.1, 0.8, 0.0])
    std = np.array([0.0, 0.3, 0.0, 0.0, 0.01, 0.2])
    # mean of means 0.35: low = ids 1, 2, 3, 5; by std: 2 and 3 (0.0; by mean: 3 first), 5 (0.2), 1 (0.3)
    assert rewards.recommend(mean, std, 3).tolist() == [3, 2, 5]
    assert rewards.recommend(mean, std, 6).tolist() == [3, 2, 5, 1, 0, 4]  # then the others, same order
    cfg = rewards.Config(label_budget=0.01)
    assert rewards.label_budget(cfg, 50) == 1 and rewards.label_budget(cfg, 1000) == 10
    assert rewards.label_budget(rewards.Config(label_budget=30), 20) == 20
    # std ranking 3, 1, 4, 2, 0: positions 0, 2, 4 of it are prompts 3, 4, 0
    assert rewards.grad_subset(np.array([0.5, 0.1, 0.3, 0.0, 0.2]), 3).tolist() == [0, 3, 4]


def test_constant_reward_reads_all_std_zero_and_zero_gradients(tmp_path, saved_model, prompts_file,
                                                               reward_module) -> None:
    folder = diagnose(tmp_path, f"model={saved_model}", f"prompts={prompts_file}", f"reward={reward_module}:constant",
                      "k=4", "max_new_tokens=4", "grad_prompts=3")
    table = results.read_table(folder, "prompts")
    assert (table.reward_std == 0).all() and (table.grad_norm.dropna() == 0).all()
    metrics = results.read_metrics(folder)
    assert metrics["frac_std_below_0"].item() == 1.0 and metrics["n_grad"].item() == 3


def test_user_reward_receives_the_data_columns_it_names(tmp_path, saved_model, prompts_file, reward_module) -> None:
    folder = diagnose(tmp_path, f"model={saved_model}", f"prompts={prompts_file}",
                      f"reward={reward_module}:with_column", "k=3", "max_new_tokens=4", "grad_prompts=0")
    table = results.read_table(folder, "prompts")
    samples = results.read_table(folder, "samples")
    weight = samples.prompt_id % 3  # the file's weight column
    np.testing.assert_allclose(samples.reward, weight * samples.completion.str.len())
    assert table.grad_norm.isna().all()


def test_registry_reward_scores_against_the_reference_column(tmp_path, saved_model) -> None:
    path = tmp_path / "p.csv"
    pd.DataFrame({"prompt": PROMPTS[:4], "reference": ["the cat sat"] * 4}).to_csv(path, index=False)
    folder = diagnose(tmp_path, f"model={saved_model}", f"prompts={path}", "reward=rouge_l_max", "k=3",
                      "max_new_tokens=4", "grad_prompts=0")
    samples = results.read_table(folder, "samples")
    from rftlab.rewards import rouge_l_max

    np.testing.assert_allclose(samples.reward, rouge_l_max(samples.completion.tolist(), [["the cat sat"]] * 12))


def test_peft_adapter_folder_loads_its_base_and_trains_only_the_adapter(tmp_path, saved_model) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(saved_model)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    peft_model.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    assert json.loads(config_file.read_text())["base_model_name_or_path"] == str(saved_model)
    model, tokenizer = inputs.load_model(str(tmp_path / "adapter"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(tokenizer) == len(tokenization.load_tokenizer(str(saved_model)))


def test_conversational_prompts_use_the_chat_template(tmp_path, saved_model) -> None:
    tokenizer = tokenization.load_tokenizer(str(saved_model))
    messages = [{"role": "user", "content": "the cat"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": messages}) + "\n")
    assert inputs.load_prompts(str(path), tokenizer=tokenizer)[0].prompt == "the cat"  # no template: contents
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}" \
                              "{% if add_generation_prompt %}<assistant>{% endif %}"
    assert inputs.load_prompts(str(path), tokenizer=tokenizer)[0].prompt == "<user> the cat <assistant>"


@pytest.mark.parametrize(("reward", "message"), [
    ("broken", "raised ZeroDivisionError: no"),
    ("short", "returned 1 values for"),
    ("nan", "NaN or infinite"),
])
def test_a_bad_reward_function_is_a_one_line_error(tmp_path, saved_model, prompts_file, reward_module, reward,
                                                   message) -> None:
    code, out, err = invoke("diagnose", "rewards", "--model", saved_model, "--prompts", prompts_file, "--reward",
                            f"{reward_module}:{reward}", "-k", "2", "--max-new-tokens", "2", "--out", tmp_path / "o")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and err.strip().endswith(errors[0])
    (folder,) = (tmp_path / "o" / "diagnose-rewards").iterdir()  # the folder records the failure
    assert json.loads((folder / "config.json").read_text())["status"] == "failed"


@pytest.mark.parametrize(("args", "message"), [
    (["--prompts", "{prompts}", "--reward", "my_rewards:constant"], "needs --model"),
    (["--model", "{model}", "--prompts", "missing.jsonl", "--reward", "my_rewards:constant"], "does not exist"),
    (["--model", "./no-model", "--prompts", "{prompts}", "--reward", "my_rewards:constant"], "does not exist"),
    (["--model", "{model}", "--prompts", "{prompts}", "--reward", "bleuu"], "unknown reward 'bleuu'"),
    (["--model", "{model}", "--prompts", "{prompts}", "--reward", "nomodule:f"], "cannot import reward"),
    (["--model", "{model}", "--prompts", "{prompts}", "--reward", "my_rewards:constant", "k=1"], "k must be"),
])
def test_bad_input_fails_in_one_line_before_any_folder(tmp_path, saved_model, prompts_file, reward_module, args,
                                                       message) -> None:
    args = [a.format(model=saved_model, prompts=prompts_file) for a in args]
    code, _, err = invoke("diagnose", "rewards", *args, "--out", tmp_path / "o")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unreadable_data_and_missing_columns_are_one_line_errors(tmp_path, saved_model) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(RftlabError, match="cannot read prompts"):
        inputs.load_prompts(str(bad))
    other = tmp_path / "other.csv"
    pd.DataFrame({"question": ["x"]}).to_csv(other, index=False)
    with pytest.raises(RftlabError, match="lacks column\\(s\\) prompt; found question"):
        inputs.load_prompts(str(other))
    with pytest.raises(RftlabError, match="no reference"):
        inputs.load_reward("bleu", inputs.load_prompts(str(other), column="question"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "the cat"}\n{"prompt": "  "}\n')
    with pytest.raises(RftlabError, match="empty.jsonl, row 1, column 'prompt': the prompt is empty"):
        inputs.load_prompts(str(empty))
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(RftlabError, match="cannot load model from folder"):
        inputs.load_model(str(broken))


def test_the_command_help_names_the_papers_quantity() -> None:
    code, out, _ = invoke("diagnose", "rewards", "--help")
    assert code == 0 and "reward std" in out and textwrap.dedent("--label-budget") in out
