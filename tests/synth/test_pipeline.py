"""`dptrain synth` end to end on the tiny random Llama: files, one ledger for histogram + training, adapters-only
checkpoints, the LM task through THE loop, resume without re-spending, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import accounting as acc
from dptrain.config import RecipeError, parse_recipe
from dptrain.lifecycle import CHECKPOINT
from dptrain.synth.lm import PrefixLMTask, add_lora, encode_records, load_causal_lm, per_example_lm_loss
from dptrain.trainers.checkpoint import load_checkpoint

NORMAL = ["heart size is normal lungs clear", "lungs clear heart size is normal", "no effusion lungs clear",
          "heart size is normal no effusion"]
ABNORMAL = ["small left effusion", "left effusion heart size is normal", "small effusion lungs clear",
            "small left effusion no"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = [{"text": str(rng.choice(NORMAL if k else ABNORMAL)), "label": "normal" if k else "abnormal"}
            for k in rng.integers(0, 2, 160)]
    path = tmp_path_factory.mktemp("texts") / "reports.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _recipe(tiny, corpus, _drop=(), **over):
    tree = {
        "name": "tiny-synth",
        "data": {"source": str(corpus), "positive_label": "abnormal", "test_fraction": 0.25,
                 "classes": ["normal", "abnormal"]},
        "model": {"name": "causal_lm", "source": str(tiny), "max_length": 32,
                  "lora": {"r": 2, "alpha": 4, "top_layers": 1}},
        "trainer": {"backend": "opacus"},
        "privacy": {"epsilon": 8.0, "clipping_norm": 1.0},
        "optimizer": {"name": "adam", "lr": 0.01},
        "training": {"epochs": 2, "batch_size": 16},
        "synthesis": {"prompt": "report ({label}):", "records": 12, "histogram_noise_multiplier": 5.0,
                      "generation": {"max_new_tokens": 6, "batch_size": 8},
                      "evaluation": {"canaries": 1, "canary_repetitions": [1, 3], "canary_references": 40,
                                     "fidelity_records": 20}},
        "seed": 0,
    }
    for key, value in over.items():
        node = tree
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    for key in _drop:  # dotted keys to remove
        node = tree
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node.pop(last, None)
    return parse_recipe(tree)


def test_task_cached_and_uncached_losses_equal_the_full_model(tiny):
    torch.manual_seed(0)
    model, tok = load_causal_lm(str(tiny))
    lora = add_lora(model, r=2, top_layers=1)
    x, y = encode_records(tok, ["report (normal):", "report (abnormal):", "report (normal):"],
                          ["heart size is normal", "small left effusion lungs clear", "no"], max_length=16)
    with torch.no_grad():
        full = per_example_lm_loss(lora(input_ids=torch.from_numpy(x[:, 0]), attention_mask=torch.from_numpy(x[:, 1]))
                                   .logits, torch.from_numpy(y))
        rows = np.array([[2], [0]])  # any subset, in any order
        for task in (PrefixLMTask(lora, x), PrefixLMTask(lora, x, cache_below=1)):
            xt, yt = task.tensors(rows, y[rows[:, 0]])
            assert xt[1].shape[1] == x[rows[:, 0], 1].sum(1).max()  # trimmed to the longest row of the batch
            torch.testing.assert_close(task.per_row_loss(lora, xt, yt), full[rows[:, 0]], rtol=1e-5, atol=1e-5)


def test_synth_end_to_end(tiny, corpus, tmp_path):
    from dptrain.synth.pipeline import synthesize

    torch.set_num_threads(1)
    recipe = _recipe(tiny, corpus)
    out = tmp_path / "run"
    rec = synthesize(recipe, out, progress=False, keep_checkpoint=True).record
    for f in ("release/synthetic.jsonl", "release/DATACARD.md", "private/record.json", "release/ledger.json",
              "release/config.yaml", "release/privacy.json", f"private/{CHECKPOINT}", "private/evaluation.md",
              "release/adapters/adapter_model.safetensors"):
        assert (out / f).exists(), f
    lines = [json.loads(x) for x in (out / "release" / "synthetic.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and {r["label"] for r in lines} <= {"normal", "abnormal"}
    assert sum(rec["label_counts"]["generated"].values()) == 12

    # one ledger under add/remove: the DP count of records, the label histogram once, every training step;
    # the target covers all three
    led = acc.PrivacyLedger.load(out / "release" / "ledger.json")
    assert led.count("label_histogram") == 1 and led.count("unit_count") == 1 and led.steps == rec["privacy"]["steps"]
    p = rec["privacy"]
    assert p["neighbouring_relation"] == "add_or_remove"
    assert rec["data"]["num_units"] == 120 + 1 + 3  # 120 training records + canaries inserted 1x and 3x
    released = p["units"]["value"] + p["units"]["added_by_dptrain"]  # the DP count + the public canary rows
    assert p["units"]["added_by_dptrain"] == 4 and p["sampling_rate"] == pytest.approx(16 / released)
    # recomputed directly with dp_accounting: count (std 20, sensitivity 1), histogram (std 5, sensitivity 1),
    # then the steps -- all under add/remove
    import dp_accounting as dpa
    from dp_accounting.pld import pld_privacy_accountant

    direct = pld_privacy_accountant.PLDAccountant(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                  value_discretization_interval=1e-4)
    direct.compose(dpa.GaussianDpEvent(recipe.privacy.count_noise_multiplier))
    direct.compose(dpa.GaussianDpEvent(5.0))
    direct.compose(dpa.PoissonSampledDpEvent(16 / released, dpa.GaussianDpEvent(p["noise_multiplier"])), p["steps"])
    assert p["epsilon"] == pytest.approx(direct.get_epsilon(p["delta"]), rel=2e-3)
    assert p["epsilon"] <= 8.0
    assert p["epsilon_independent_check"]["epsilon"] == pytest.approx(p["epsilon"], rel=2e-3)
    assert p["epsilon"] > 7.5  # calibrated tight to the target, not merely below it
    assert p["releases"]["label_histogram"] == {"noise_std": 5.0, "l2_sensitivity": 1.0}

    # checkpoint (kept on request): adapters only (the frozen base model comes from model.source)
    state = load_checkpoint(out / "private" / CHECKPOINT)["trainer"]["model"]
    assert state and all("lora_" in k for k in state)

    ev = rec["evaluation"]
    assert ev["covered_by_dp"] is False
    assert set(ev["downstream"]) >= {"synthetic", "real_non_private", "real_dp"}
    assert ev["downstream"]["real_dp"]["epsilon"] <= 8.0
    assert set(ev["canaries"]["by_repetitions"]) == {"1", "3"}
    assert 0 <= ev["memorisation"]["ngram_overlap"]["train_overlap"] <= 1
    card = (out / "release" / "DATACARD.md").read_text()
    assert f"{p['epsilon']:.4f}" in card and "private/evaluation.md" in card
    assert "Downstream" not in card and "kNN" not in card  # the evaluation against real records stays private
    evaluation = (out / "private" / "evaluation.md").read_text()
    assert "NOT covered by the DP guarantee" in evaluation and "Downstream" in evaluation
    assert "train_loss_mean" not in json.dumps(rec["privacy"])
    assert all(m["train_loss_mean"] is None for m in rec["training_log"])  # an un-noised statistic: never written

    # the histogram is paid for: without it (public prior) the same target needs less noise
    from dptrain.trainers.plan import PrivacyPlan, UnitCount

    prior = _recipe(tiny, corpus, **{"synthesis.label_counts": "prior", "synthesis.prior": [0.5, 0.5]})
    count = UnitCount(p["units"]["value"], "dp_count", 20.0, 4)
    assert PrivacyPlan.from_recipe(prior, count).noise_multiplier < p["noise_multiplier"]


def test_resume_after_a_crash_in_generation_spends_nothing_twice(tiny, corpus, tmp_path, monkeypatch):
    from dptrain.synth import lm, pipeline

    torch.set_num_threads(1)
    recipe = _recipe(tiny, corpus, **{"synthesis.evaluation.canaries": 0, "synthesis.evaluation.dp_baseline": False})
    out = tmp_path / "run"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm, "generate", boom)
    with pytest.raises(KeyboardInterrupt):
        pipeline.synthesize(recipe, out, progress=False)
    first = acc.PrivacyLedger.load(out / "release" / "ledger.json")
    monkeypatch.undo()
    with pytest.raises(Exception, match="not empty"):
        pipeline.synthesize(recipe, out, progress=False)
    rec = pipeline.synthesize(recipe, out, resume=True, progress=False).record
    led = acc.PrivacyLedger.load(out / "release" / "ledger.json")
    assert led.count("label_histogram") == 1 and led.steps == first.steps == rec["privacy"]["steps"]
    assert rec["privacy"]["epsilon"] == pytest.approx(first.epsilon(rec["privacy"]["delta"]))
    assert rec["label_counts"]["noisy_counts"] is not None


def test_synth_run_and_its_dp_baseline_are_charged_to_the_dataset_budget(tiny, corpus, tmp_path):
    """A synth run on a dataset with a budget is charged, and so is its DP baseline (a run of its own, in
    private/dp_baseline/); a second synth run that would overspend is refused before writing anything."""
    from dptrain.data.identity import dataset_identity
    from dptrain.synth.baseline import baseline_recipe
    from dptrain.synth.histogram import histogram_event
    from dptrain.synth.pipeline import synthesize
    from dptrain.trainers.plan import PrivacyPlan, UnitCount

    torch.set_num_threads(1)
    over = {"privacy.dataset_size": 120, "synthesis.evaluation.canaries": 0}  # declared: the same plan every run
    count = UnitCount(120, "declared")
    synth_plan = PrivacyPlan.from_recipe(_recipe(tiny, corpus, **over), count,
                                         releases=(("label_histogram", histogram_event(5.0)),))
    eps = synth_plan.planned_ledger().epsilon(synth_plan.delta)
    base_plan = PrivacyPlan.from_recipe(baseline_recipe(epsilon=eps, delta=synth_plan.delta, seed=0,
                                                        released_units=120), count)
    total = synth_plan.planned_ledger()
    total.extend(base_plan.planned_ledger())
    one_run = total.epsilon(synth_plan.delta)  # a synth run with its baseline
    total.extend(synth_plan.planned_ledger())
    budget = (one_run + total.epsilon(synth_plan.delta)) / 2  # fits one run, not the next synth run
    recipe = _recipe(tiny, corpus, **over, **{"privacy.dataset_budget": budget})
    path = acc.budget_path(dataset_identity(recipe.data))  # under this test's $DPTRAIN_HOME

    rec = synthesize(recipe, tmp_path / "first", progress=False).record
    real_dp = rec["evaluation"]["downstream"]["real_dp"]
    assert "skipped" not in real_dp and real_dp["epsilon"] <= rec["privacy"]["epsilon"] + 1e-9
    data = json.loads(path.read_text())
    assert data["epsilon"] == pytest.approx(budget)
    assert set(data["runs"]) == {rec["run_id"], real_dp["run_id"]}
    assert rec["run_id"].startswith("first-") and real_dp["run_id"].startswith("dp_baseline-")
    assert all(r["status"] == "settled" for r in data["runs"].values())
    assert acc.DatasetBudget(path).spent() <= budget
    baseline = tmp_path / "first" / "private" / "dp_baseline"  # an ordinary run directory, on the private side
    assert json.loads((baseline / "private" / "record.json").read_text())["run_id"] == real_dp["run_id"]
    assert acc.PrivacyLedger.load(baseline / "release" / "ledger.json").steps == real_dp["steps"]
    assert not list(baseline.rglob("*checkpoint*"))  # no secret seed left behind

    before = path.read_bytes()
    with pytest.raises(acc.BudgetExceededError, match="second"):
        synthesize(recipe, tmp_path / "second", progress=False)
    assert not (tmp_path / "second").exists() and path.read_bytes() == before


def test_recipe_errors_name_the_field(tiny, corpus, tmp_path):
    from dptrain.run import RunError, train
    from dptrain.synth.pipeline import synthesize

    with pytest.raises(RecipeError, match=r"synthesis.prompt must contain \{label\}"):
        _recipe(tiny, corpus, **{"synthesis.prompt": "a report:"})
    with pytest.raises(RecipeError, match="prior needs synthesis.prior"):
        _recipe(tiny, corpus, **{"synthesis.label_counts": "prior"})
    with pytest.raises(RecipeError, match="trainer.backend"):
        _recipe(tiny, corpus, **{"trainer.backend": "jax"})
    with pytest.raises(RunError, match="dptrain synth"):
        train(_recipe(tiny, corpus), tmp_path / "x")
    with pytest.raises(RunError, match="synthesis.prior: 3 weights for the 2 declared classes"):
        synthesize(_recipe(tiny, corpus, **{"synthesis.label_counts": "prior", "synthesis.prior": [1, 1, 1]}),
                   tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_lm_task_clipped_update_equals_brute_force_per_record(tiny):
    """The Opacus step with the (cached) prefix-LM task clips each record's own gradient: compare the update
    with per-record autograd on the uncached model, every record clipped to C, summed, / expected batch."""
    from dptrain.config import OptimizerConfig
    from dptrain.trainers.base import Batch
    from dptrain.trainers.opacus_backend import OpacusTrainer
    from dptrain.trainers.plan import PrivacyPlan

    torch.manual_seed(0)
    model, tok = load_causal_lm(str(tiny))
    lora = add_lora(model, r=2, top_layers=1)
    with torch.no_grad():  # LoRA B starts at zero: move it so A gets gradients too
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    texts = ["heart size is normal", "small left effusion lungs clear", "no", "lungs clear no effusion"]
    prompts = ["report (normal):", "report (abnormal):", "report (normal):", "report (abnormal):"]
    x, y = encode_records(tok, prompts, texts, max_length=16)
    params = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    C, B = 1e-3, 3.0
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(texts)):
        lora.zero_grad()
        ids, mask, lab = (torch.from_numpy(a[i:i + 1]) for a in (x[:, 0], x[:, 1], y))
        per_example_lm_loss(lora(input_ids=ids, attention_mask=mask).logits, lab).sum().backward()
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params.values()))
        assert norm > 10 * C  # every record is clipped
        for n, p in params.items():
            expected[n] -= (C / norm) * p.grad / B  # SGD lr 1
    lora.zero_grad()
    plan = PrivacyPlan(scheme=acc.PoissonSampling(0.5), noise_multiplier=0.0, clipping_norm=C, steps=1,
                       expected_batch_size=B, delta=1e-5, accountant="pld", mode="clip_only",
                       privacy_unit="example", size=4)
    trainer = OpacusTrainer(OptimizerConfig(name="sgd", lr=1.0), task=PrefixLMTask(lora, x, cache_below=1),
                            max_physical_batch_size=3, device="cpu")  # 2 virtual steps
    trainer.init(lora, plan, seed=0, dp_seed=1)
    trainer.dp_step(Batch(np.arange(4)[:, None], y, np.arange(4)))
    got = torch.cat([(p.detach() - before[n]).ravel() for n, p in params.items()])
    want = torch.cat([expected[n].ravel() for n in params])
    # float32 parameters: the update (~1e-4) is read back by subtraction, so compare as vectors
    assert torch.linalg.vector_norm(got - want) < 1e-3 * torch.linalg.vector_norm(want)
    assert set(trainer.state_dict()["model"]) == {k for k in lora.state_dict() if "lora_" in k}


def test_subset_keeps_each_record_independently_of_the_others():
    from dptrain.synth.pipeline import _subset

    texts = [f"report number {i}" for i in range(2000)]
    keep = set(_subset(texts, 0.25, seed=3))
    assert 400 < len(keep) < 600
    # removing (or adding) one record never changes whether another is used: the rate is public and fixed
    without = [t for i, t in enumerate(texts) if i != 7]
    kept_texts = {texts[i] for i in keep} - {texts[7]}
    assert {without[i] for i in _subset(without, 0.25, seed=3)} == kept_texts
    added = [*texts, "one more report"]
    assert {added[i] for i in _subset(added, 0.25, seed=3)} - {"one more report"} == {texts[i] for i in keep}
    assert list(_subset(texts, None, seed=3)) == list(range(2000))


def test_unsupported_train_options_are_refused_not_ignored(tiny, corpus):
    for key, value in [("data.privacy_unit", "patient"), ("training.ema", 0.9)]:
        with pytest.raises(RecipeError, match="dptrain synth does not support " + key.replace(".", r"\.")):
            _recipe(tiny, corpus, **{key: value})


def test_unusable_generations_are_recorded_as_skipped_not_a_crash(tiny, corpus, tmp_path, monkeypatch):
    from dptrain.synth import lm, pipeline

    torch.set_num_threads(1)
    monkeypatch.setattr(lm, "generate", lambda model, tok, prompt, n, **k: [""] * n)
    recipe = _recipe(tiny, corpus, **{"synthesis.evaluation.canaries": 0, "synthesis.evaluation.dp_baseline": False})
    rec = pipeline.synthesize(recipe, tmp_path / "run", progress=False).record
    ev = rec["evaluation"]
    assert "skipped" in ev["downstream"]["synthetic"] and "skipped" in ev["fidelity"]["distances"]
    assert (tmp_path / "run" / "release" / "DATACARD.md").exists()


@pytest.mark.slow  # ~30 s; the crash-in-generation resume test covers the histogram in the default suite
def test_resume_mid_training_keeps_the_histogram_and_the_steps(tiny, corpus, tmp_path, monkeypatch):
    from dptrain.synth import pipeline
    from dptrain.trainers.opacus_backend import OpacusTrainer

    torch.set_num_threads(1)
    recipe = _recipe(tiny, corpus, **{"synthesis.evaluation.canaries": 0, "synthesis.evaluation.dp_baseline": False,
                                      "training.epochs": 3})
    out = tmp_path / "run"
    real_step, calls = OpacusTrainer.dp_step, {"n": 0}

    def crash_after_an_epoch(self, batch):
        calls["n"] += 1
        if calls["n"] > 10:  # an epoch is 8 steps (120 units / 16): a checkpoint exists
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(OpacusTrainer, "dp_step", crash_after_an_epoch)
    with pytest.raises(KeyboardInterrupt):
        pipeline.synthesize(recipe, out, progress=False)
    state = load_checkpoint(out / "private" / CHECKPOINT)
    saved_counts = json.loads((out / "private" / "state.json").read_text())["noisy_label_counts"]
    saved_step = int(state["step"])
    assert 0 < saved_step < 23
    monkeypatch.undo()
    rec = pipeline.synthesize(recipe, out, resume=True, progress=False).record
    led = acc.PrivacyLedger.load(out / "release" / "ledger.json")
    assert led.count("label_histogram") == 1 and led.steps == rec["privacy"]["steps"] == rec["privacy"]["planned_steps"]
    assert list(rec["label_counts"]["noisy_counts"].values()) == saved_counts  # never redrawn
    assert rec["privacy"]["epsilon"] == pytest.approx(rec["privacy"]["epsilon_independent_check"]["epsilon"], rel=2e-3)


def test_synth_under_torchrun_is_refused_by_the_shared_lifecycle_check(tiny, corpus, tmp_path, monkeypatch):
    """`train` and `synth` meet WORLD_SIZE > 1 in the same place (``Session``): synth refuses it there, before
    anything is read or written, with the same wording a future command gets for free."""
    from dptrain.lifecycle import RunError, Session
    from dptrain.synth.pipeline import synthesize

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunError, match=r"dptrain synth runs in one process \(WORLD_SIZE=2"):
        synthesize(_recipe(tiny, corpus), tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    with pytest.raises(RunError, match=r"dptrain newcmd runs in one process \(WORLD_SIZE=2"):
        Session(_recipe(tiny, corpus), tmp_path / "n", command="newcmd", data_parallel=False)
