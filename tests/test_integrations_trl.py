"""rftlab.integrations.trl: the DPO pair-gradient and GRPO reward-std callbacks inside real TRL training runs.

Tiny random GPT-2 models (1 layer, width 32) with word/character tokenizers built offline; every run is a few
optimizer steps on the CPU. Oracles: ``pair_gradient_stats(method="exact")`` on the probe pairs with the model of
the measured step, TRL's own sequence log-prob convention recomputed by hand, TRL's collator truncation, TRL's
logged ``frac_reward_zero_std`` and its per-completion rewards of the last generation batch.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("trl")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer  # noqa: E402

from rftlab.diagnostics import pair_gradient_stats  # noqa: E402
from rftlab.errors import RftlabError  # noqa: E402
from rftlab.integrations.trl import (  # noqa: E402
    PAIR_TABLE,
    PROMPT_TABLE,
    PairGradientCallback,
    RewardStdCallback,
    dpo_loss_method,
    group_std_stats,
)
from rftlab.preference import REGIMES, classify_regimes, predicted_changes  # noqa: E402
from rftlab.tokenization import char_tokenizer, word_tokenizer  # noqa: E402

PAIRS = [  # at init pair 2 is entangled (ρ > a: the chosen falls); pair 3's responses are identical (ρ = a = b)
    {"prompt": "the cat", "chosen": " sat a b", "rejected": " ran c"},
    {"prompt": "the dog", "chosen": " ran d", "rejected": " sat e f g"},
    {"prompt": "the cat", "chosen": " a", "rejected": " a a a a"},
    {"prompt": "the dog", "chosen": " sat h", "rejected": " sat h"},
]
PAIR_COLUMNS = ["step", "pair", "norm_chosen", "norm_rejected", "inner", "cosine", "regime", "logp_chosen",
                "logp_rejected", "c_chosen", "c_rejected"]


def tiny_gpt2(tokenizer, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)  # no dropout, as TRL's trainers run it (disable_dropout=True)


def common_args(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path), logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                gradient_checkpointing=False, save_strategy="no", disable_tqdm=True, seed=0)


def dpo_trainer(tmp_path, *, peft: bool = False, **config) -> tuple[DPOTrainer, GPT2LMHeadModel]:
    """A DPOTrainer on PAIRS (twice) and a copy of its initial model, taken before TRL patches the model's forward
    (a copy made after it would still run the original model's forward)."""
    tokenizer = word_tokenizer(["a b c d e f g h the cat dog sat ran"])
    model = tiny_gpt2(tokenizer)
    initial = copy.deepcopy(model)
    kwargs = {}
    if peft:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    else:  # an explicit copy: TRL would otherwise reload the reference from model.config's (absent) path
        kwargs["ref_model"] = copy.deepcopy(model)
    args = DPOConfig(per_device_train_batch_size=2, learning_rate=1e-2, **common_args(tmp_path), **config)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PAIRS * 2),
                         processing_class=tokenizer, **kwargs)
    return trainer, initial


def trl_sequence_logp(model, prompt: list[int], response: list[int]) -> float:
    """log π(y|x) as DPOTrainer sums it: one unpadded forward over prompt + response, next-token log-probs."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    token_logp = logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return token_logp[len(prompt) - 1:].sum().item()


def assert_row_matches(row: dict, oracle: pd.DataFrame) -> None:
    """Logged means and regime shares of one measurement equal the oracle frame's (rel 1e-4 of the scale)."""
    scale = float((oracle["norm_chosen"] * oracle["norm_rejected"]).mean())
    assert row["grad/inner"] == pytest.approx(oracle["inner"].mean(), rel=1e-4, abs=1e-4 * scale)
    assert row["grad/cosine"] == pytest.approx(oracle["cosine"].mean(), rel=1e-4, abs=1e-5)
    assert row["grad/norm_chosen"] == pytest.approx(oracle["norm_chosen"].mean(), rel=1e-4)
    assert row["grad/norm_rejected"] == pytest.approx(oracle["norm_rejected"].mean(), rel=1e-4)
    shares = oracle["regime"].value_counts(normalize=True)
    for regime in REGIMES:
        assert row[f"regime/{regime}"] == pytest.approx(shares.get(regime, 0.0), abs=1e-12), regime


# ============================================================================================== DPO
@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """One 4-step sigmoid-DPO run measured at steps 0, 2 and 4 on the first 4 train rows; the initial model."""
    out = tmp_path_factory.mktemp("dpo")
    trainer, initial = dpo_trainer(out, max_steps=4)
    callback = PairGradientCallback(trainer, n_pairs=4, every_n_steps=2)
    trainer.add_callback(callback)
    trainer.train()
    return trainer, callback, initial


def test_dpo_callback_logs_stats_equal_to_direct_measurement(dpo_run):
    trainer, callback, initial = dpo_run
    history = trainer.state.log_history
    rows = [r for r in history if "grad/inner" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]
    # TRL's own log rows survive at every logging step, with its buffered metrics in them
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]
    assert all("rewards/margins" in r for r in history if "loss" in r)

    probe = callback.probe
    head = trainer.train_dataset[:4]
    assert probe == (head["prompt_ids"], head["chosen_ids"], head["rejected_ids"])
    for row, model in ((rows[0], initial), (rows[-1], trainer.model)):
        oracle = pair_gradient_stats(model, *probe, method="exact")
        assert_row_matches(row, oracle)
        assert oracle["regime"].iloc[3] == "both"  # identical responses
    assert rows[0]["regime/chosen_down"] == 0.25
    shares = [rows[0][f"regime/{r}"] for r in ("ideal", "chosen_down", "rejected_up", "both")]
    assert sum(shares) == pytest.approx(1.0) and rows[0]["regime/inactive"] == 0.0


def test_dpo_log_probs_follow_trl_convention(dpo_run):
    trainer, callback, initial = dpo_run
    table = callback.table
    first = table[table["step"] == 0]
    for (prompt, chosen, rejected), (_, row) in zip(zip(*callback.probe, strict=True), first.iterrows(), strict=True):
        assert row["logp_chosen"] == pytest.approx(trl_sequence_logp(initial, prompt, chosen), abs=1e-4)
        assert row["logp_rejected"] == pytest.approx(trl_sequence_logp(initial, prompt, rejected), abs=1e-4)
    # sigmoid DPO: thresholds (1, 1), so the regime column is pair_gradient_stats' DPO regime
    assert (table["c_chosen"] == 1.0).all() and (table["c_rejected"] == 1.0).all()


def test_dpo_table_written_with_documented_columns(dpo_run):
    trainer, callback, _ = dpo_run
    table = pd.read_parquet(f"{trainer.args.output_dir}/{PAIR_TABLE}")
    assert list(table.columns) == PAIR_COLUMNS
    assert len(table) == 3 * 4 and table["step"].tolist() == [0] * 4 + [2] * 4 + [4] * 4
    assert table["pair"].tolist() == [0, 1, 2, 3] * 3
    logged = {r["step"]: r["grad/inner"] for r in trainer.state.log_history if "grad/inner" in r}
    assert table.groupby("step")["inner"].mean().to_dict() == pytest.approx(logged, rel=1e-12)
    pd.testing.assert_frame_equal(table, callback.table)


def test_dpo_probe_from_text_pairs_matches_dataset_and_truncation(dpo_run):
    trainer, callback, _ = dpo_run
    texts = tuple([p[k] for p in PAIRS] for k in ("prompt", "chosen", "rejected"))
    assert PairGradientCallback(trainer, pairs=texts).probe == callback.probe
    # TRL's collator truncates prompt + response to max_length; the probe must score the same tokens
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    max_length, trainer.args.max_length = trainer.args.max_length, 4
    try:
        prompts, chosen, rejected = PairGradientCallback(trainer, pairs=callback.probe).probe
    finally:
        trainer.args.max_length = max_length
    assert max(len(p) + len(c) for p, c in zip(prompts, chosen, strict=True)) == 4 and chosen != callback.probe[1]
    batch = DataCollatorForPreference(pad_token_id=0, max_length=4)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in zip(*callback.probe, strict=True)])
    n = len(prompts)
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True)):
        for row, response in ((i, c), (i + n, r)):
            ids, mask = batch["input_ids"][row], batch["completion_mask"][row].bool()
            kept = int(batch["attention_mask"][row].sum())
            assert p + response == ids[:kept].tolist()
            assert response == ids[mask].tolist()


def test_dpo_ipo_thresholds_with_peft_reference(tmp_path):
    trainer, _ = dpo_trainer(tmp_path, peft=True, max_steps=1, loss_type=["ipo"])
    callback = PairGradientCallback(trainer, n_pairs=4, every_n_steps=5)  # step 1 is measured when training ends
    assert callback.params == "lora" and callback.loss == "ipo" and callback.loss_hparams == {"beta": 0.1}
    trainer.add_callback(callback)
    trainer.train()
    table = callback.table
    start = table[table["step"] == 0]
    # LoRA's B starts at 0, so the adapter-disabled reference equals the initial policy
    np.testing.assert_allclose(callback.ref_logps, start[["logp_chosen", "logp_rejected"]].to_numpy().T, atol=1e-5)
    # IPO below its target margin 1/(2β): c_chosen = |y_l|/|y_w|, c_rejected = |y_w|/|y_l| (TRL's token averages)
    len_w = np.array([len(c) for c in callback.probe[1]], float)
    len_l = np.array([len(r) for r in callback.probe[2]], float)
    np.testing.assert_allclose(start["c_chosen"], len_l / len_w, rtol=1e-6)
    np.testing.assert_allclose(start["c_rejected"], len_w / len_l, rtol=1e-6)
    # after one step the averaged margin is still far below 1/(2β) = 5: IPO's p ∝ 1/|y_w|, q ∝ 1/|y_l|
    end = table[table["step"] == 1]
    np.testing.assert_allclose(end["c_chosen"], len_l / len_w, rtol=1e-6)
    steps = [r["step"] for r in trainer.state.log_history if "grad/inner" in r]
    assert steps == [0, 1] and table["step"].tolist() == [0] * 4 + [1] * 4
    last = [r for r in trainer.state.log_history if "grad/inner" in r][-1]
    oracle = pair_gradient_stats(trainer.model, *callback.probe, params="lora", method="exact")
    a, b = oracle["norm_chosen"].to_numpy() ** 2, oracle["norm_rejected"].to_numpy() ** 2
    oracle["regime"] = classify_regimes(a, b, oracle["inner"].to_numpy(), 1 / len_w, 1 / len_l)
    assert_row_matches(last, oracle)


def test_dpo_hinge_reads_precomputed_reference(tmp_path):
    trainer, _ = dpo_trainer(tmp_path, max_steps=1, loss_type=["hinge"], precompute_ref_log_probs=True)
    assert "ref_chosen_logps" in trainer.train_dataset.column_names  # TRL scored the reference once, up front
    callback = PairGradientCallback(trainer, n_pairs=4, every_n_steps=1)
    assert callback.loss == "slic" and callback.loss_hparams == {"beta": 0.1, "sft_weight": 0.0}
    head = trainer.train_dataset[:4]
    np.testing.assert_array_equal(callback.ref_logps, [head["ref_chosen_logps"], head["ref_rejected_logps"]])
    trainer.add_callback(callback)
    trainer.train()
    table = callback.table
    # the reference is a copy of the initial policy: its precomputed log-probs are the step-0 ones (fused LM head)
    start = table[table["step"] == 0]
    np.testing.assert_allclose(callback.ref_logps, start[["logp_chosen", "logp_rejected"]].to_numpy().T, atol=1e-4)
    # an active hinge pushes like DPO: thresholds (1, 1), so the regimes are pair_gradient_stats' DPO regimes
    assert (table["c_chosen"] == 1.0).all() and (table["c_rejected"] == 1.0).all()
    oracle = pair_gradient_stats(trainer.model, *callback.probe)
    assert table[table["step"] == 1]["regime"].tolist() == oracle["regime"].tolist()


def test_dpo_loss_mapping():
    def mapped(**config):
        return dpo_loss_method(DPOConfig(output_dir="unused", bf16=False, **config))

    assert mapped(beta=0.3) == ("dpo", {"beta": 0.3}, None)
    assert mapped(loss_type=["ipo"]) == ("ipo", {"beta": 0.1}, None)
    assert mapped(loss_type=["hinge"]) == ("slic", {"beta": 0.1, "sft_weight": 0.0}, None)
    assert mapped(loss_type=["sigmoid", "sft"], loss_weights=[2.0, 1.0]) == (
        "rpo", {"beta": 0.1, "alpha": 0.5}, None)
    name, hparams, caveat = mapped(loss_type=["robust"], label_smoothing=0.1)
    assert (name, hparams) == ("dpo", {"beta": 0.1}) and "no rftlab counterpart" in caveat
    assert "use_weighting" in mapped(use_weighting=True)[2]


def test_classify_regimes_agrees_with_gradient_flow():
    rng = np.random.default_rng(0)
    n = 2000
    a, b = rng.uniform(0.1, 4, n), rng.uniform(0.1, 4, n)
    rho = rng.uniform(-4, 4, n)
    p, q = rng.normal(size=n), rng.normal(size=n)
    p[:100], q[100:200] = 0.0, 0.0
    dx_w, dx_l = predicted_changes(-p, q, a, b, rho)  # ∂L/∂x_w = −p, ∂L/∂x_l = q
    regime = classify_regimes(a, b, rho, p, q, rtol=0.0)
    down, up = dx_w < 0, dx_l > 0
    expected = np.select([down & up, down, up], ["both", "chosen_down", "rejected_up"], "ideal")
    assert (regime == expected).all()
    assert (classify_regimes(a[:3], b[:3], rho[:3], np.zeros(3), np.zeros(3)) == "inactive").all()
    # ties count as crossing, as in pair_gradient_stats: ρ = a = b reads "both" for DPO's p = q
    assert classify_regimes(np.ones(1), np.ones(1), np.ones(1), np.ones(1), np.ones(1))[0] == "both"


def test_missing_trl_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    for callback in (PairGradientCallback, RewardStdCallback):
        with pytest.raises(RftlabError, match=r"needs trl: pip install 'rftlab\[trl\]'"):
            callback(None)


def test_rftlab_help_does_not_import_trl():
    code = ("import contextlib, io, sys, rftlab, rftlab.integrations\n"
            "from rftlab.cli import app\n"
            "sys.argv = ['rftlab', '--help']\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    app()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trl', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ============================================================================================= GRPO
def frac_a(completions, **kwargs):
    return [c.count("a") / max(len(c), 1) for c in completions]


def constant(completions, **kwargs):
    return [1.0] * len(completions)


def grpo_run(tmp_path, reward_funcs, reward_weights=None):
    tokenizer = char_tokenizer(["abcdefgh xyz"])
    args = GRPOConfig(max_steps=3, per_device_train_batch_size=12, num_generations=4, max_completion_length=8,
                      reward_weights=reward_weights, **common_args(tmp_path))
    prompts = [{"prompt": p} for p in ("abc", "xyz", "hag", "fed", "aaa", "bcd")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=tiny_gpt2(tokenizer), reward_funcs=reward_funcs, args=args,
                              train_dataset=Dataset.from_list(prompts), processing_class=tokenizer)
    callback = RewardStdCallback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    rows = [r for r in trainer.state.log_history if "frac_reward_zero_std" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    return trainer, callback, rows


def test_grpo_reward_std_matches_trl_and_weighted_total(tmp_path):
    trainer, callback, rows = grpo_run(tmp_path, [frac_a, constant], reward_weights=[2.0, 1.0])
    table = pd.read_parquet(tmp_path / PROMPT_TABLE)
    assert list(table.columns) == ["step", "prompt", "reward_mean", "reward_std", "zero_std"]
    assert table["step"].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # 12 completions = 3 prompts × 4 per step
    for row in rows:
        groups = table[table["step"] == row["step"]]
        assert row["rewards/frac_std_zero"] == pytest.approx(row["frac_reward_zero_std"], abs=1e-6)
        assert row["rewards/frac_std_zero"] == pytest.approx(groups["zero_std"].mean())
        assert row["rewards/frac_std_below_0.05"] == pytest.approx((groups["reward_std"] < 0.05).mean())
        assert row["rewards/group_std_mean"] == pytest.approx(groups["reward_std"].mean())
    # the last generation batch, recomputed from TRL's own per-function record: total = 2·frac_a + 1·constant
    prompts = list(trainer._logs["prompt"])
    total = 2 * torch.tensor(list(trainer._logs["rewards"]["frac_a"])) + 1.0
    last = table[table["step"] == 3]
    assert last["prompt"].tolist() == prompts[::4]
    np.testing.assert_allclose(last["reward_std"], total.view(-1, 4).std(-1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(last["reward_mean"], total.view(-1, 4).mean(-1).numpy(), rtol=1e-6)


def test_grpo_constant_reward_is_all_zero_std(tmp_path):
    _, callback, rows = grpo_run(tmp_path, [constant])
    for row in rows:
        assert row["rewards/frac_std_zero"] == 1.0 == row["frac_reward_zero_std"]
        assert row["rewards/frac_std_below_0.05"] == 1.0 and row["rewards/group_std_mean"] == 0.0
    assert callback.table["zero_std"].all() and (callback.table["reward_std"] == 0).all()


def test_group_std_stats_ignores_unscored_completions():
    nan = float("nan")
    rewards = torch.tensor([[1.0, nan, 1.0, 1.0], [0.0, 1.0, nan, 1.0], [nan, nan, nan, nan], [2.0, 2.0, 2.0, 2.0]])
    mean, std, zero = group_std_stats(rewards)
    assert zero.tolist() == [True, False, False, True]
    np.testing.assert_allclose(mean[:2], [1.0, 2 / 3])
    np.testing.assert_allclose(std[:2], [0.0, np.std([0.0, 1.0, 1.0], ddof=1)])
    assert std[2].isnan() and std[3] == 0.0
