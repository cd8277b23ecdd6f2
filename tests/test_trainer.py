"""AdaRank inside a user's own Trainer script: their optimizer and its hyperparameters, their LR schedule,
gradient accumulation, a second train(), importance read before clipping."""

import math

import pytest
import torch
from conftest import tiny_bert, tiny_t5, write_glue

from adarank import AdaRankConfig, get_task
from adarank.callback import AdaRankCallback
from adarank.data import load_split, make_collator, tokenize
from adarank.modeling import apply_lora

FORCED = dict(r0=2, r_max=8, alpha=2, tol=0.0, check_every=3, warmup_steps=3, criterion="threshold")


def trainer_for(tmp_path, tok, strategy="expand", optimizers=(None, None), seq2seq=False, evaluate=False, **args):
    """A user-style script: a PEFT LoRA model, TrainingArguments, Trainer, then AdaRank attached."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    glue = write_glue(tmp_path / "glue", n_train=32, n_eval=8)
    task = get_task("mrpc")
    rows = tokenize(load_split(task, "train", glue), task, tok, seq2seq, 48, 4)
    if seq2seq:
        rows = [{k: v for k, v in r.items() if k != "class_label"} for r in rows]
        model = apply_lora(tiny_t5(vocab_size=len(tok)), True, 2, 4, None, 0.0)
        collator = DataCollatorForSeq2Seq(tok)
    else:
        model = apply_lora(tiny_bert(vocab_size=len(tok)), False, 2, 4, None, 0.0)
        collator = make_collator(tok, False)
    if optimizers[0] == "sgd":  # built by the user on the model they just made
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9, nesterov=True)
        optimizers = (opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.97 ** s))
    settings = dict(output_dir=str(tmp_path / "t"), per_device_train_batch_size=8, max_steps=12, learning_rate=1e-2,
                    report_to=[], save_strategy="no", eval_strategy="no", logging_steps=1, use_cpu=True,
                    remove_unused_columns=False, seed=0)
    settings.update(args)
    eval_rows = tokenize(load_split(task, "validation", glue), task, tok, seq2seq, 48, 4) if evaluate else None
    trainer = Seq2SeqTrainer(model=model, args=Seq2SeqTrainingArguments(**settings), train_dataset=rows,
                             eval_dataset=eval_rows, data_collator=collator, optimizers=optimizers)
    callback = AdaRankCallback(AdaRankConfig(**{**FORCED, "strategy": strategy})).attach(trainer)
    return trainer, callback, model


class LRLog:
    """Records the LR each optimizer step used, read from the optimizer's groups before the step."""

    def __init__(self):
        self.lrs = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def add_lr_log(trainer) -> LRLog:
    from transformers import TrainerCallback

    log = type("LRLogCallback", (LRLog, TrainerCallback), {})()
    trainer.add_callback(log)
    return log


def held(trainer, model) -> bool:
    """The Trainer's optimizer holds exactly the model's trainable tensors."""
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return ({id(p) for g in inner.param_groups for p in g["params"]}
            == {id(p) for p in model.parameters() if p.requires_grad})


@pytest.mark.parametrize("strategy", ["merge", "expand", "masked"])
def test_the_users_adam_settings_and_decay_groups_survive_growth(tmp_path, bert_tok, strategy):
    trainer, callback, model = trainer_for(tmp_path, bert_tok, strategy, adam_beta1=0.8, adam_beta2=0.95,
                                           adam_epsilon=1e-6, weight_decay=0.05)
    trainer.train()
    assert [e["to_rank"] for e in callback.events] == [4, 6, 8]
    inner = trainer.optimizer.optimizer
    assert type(inner).__name__ == "AdamW" and held(trainer, model)
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in inner.param_groups)
    # the Trainer's grouping: weight decay on the LoRA factors and the head's weight, not on its bias
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in inner.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert any("lora_A" in n for n in decay) and not any(n.endswith("bias") for n in decay)


@pytest.mark.parametrize("strategy", ["merge", "expand", "masked"])
def test_adafactor_survives_growth_and_keeps_training(tmp_path, bert_tok, strategy):
    """Adafactor's factored second moments cannot be padded: grown factors start fresh, nothing crashes."""
    trainer, callback, model = trainer_for(tmp_path, bert_tok, strategy, optim="adafactor")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert [e["to_rank"] for e in callback.events] == [4, 6, 8] and held(trainer, model)
    assert type(trainer.optimizer.optimizer).__name__ == "Adafactor"
    assert all(math.isfinite(x) for x in callback.losses)
    after = dict(model.named_parameters())
    for n in before:  # every column of B in use trained (merge: the fresh adapter's; masked: none beyond rank 8)
        assert torch.count_nonzero(after[n][:, :8]) == after[n][:, :8].numel() and not torch.equal(before[n], after[n])
        assert torch.count_nonzero(after[n][:, 8:]) == 0


def test_a_users_own_optimizer_and_scheduler_are_kept(tmp_path, bert_tok):
    trainer, callback, model = trainer_for(tmp_path, bert_tok, "expand", optimizers=("sgd", None))
    opt, sched = trainer.optimizer, trainer.lr_scheduler
    lrs = add_lr_log(trainer)
    trainer.train()
    assert len(callback.events) == 3 and trainer.optimizer.optimizer is opt and trainer.lr_scheduler is sched
    assert held(trainer, model) and opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["nesterov"]
    assert lrs.lrs == pytest.approx([0.05 * 0.97**s for s in range(12)], rel=1e-12)
    state = opt.state[dict(model.named_parameters())[next(n for n, _ in model.named_parameters() if "lora_A" in n)]]
    assert state["momentum_buffer"].shape[0] == 8  # expand padded the momentum of the grown A


@pytest.mark.parametrize("kind", ["cosine", "constant_with_warmup"])
def test_the_trainers_schedule_continues_exactly_across_growth(tmp_path, bert_tok, kind):
    trainer, callback, _ = trainer_for(tmp_path, bert_tok, "merge", lr_scheduler_type=kind, warmup_steps=2)
    lrs = add_lr_log(trainer)
    trainer.train()
    assert len(callback.events) == 3

    def formula(step, warmup=2, total=12):
        if step < warmup:
            return step / warmup
        if kind == "constant_with_warmup":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    assert lrs.lrs == pytest.approx([1e-2 * formula(s) for s in range(12)], rel=1e-9, abs=1e-15)
    callbacks = trainer.callback_handler
    assert callbacks.optimizer is trainer.optimizer and callbacks.lr_scheduler is trainer.lr_scheduler


def test_a_second_train_call_continues_growing(tmp_path, bert_tok):
    trainer, callback, model = trainer_for(tmp_path, bert_tok, "expand", max_steps=6)
    trainer.train()
    assert [(e["step"], e["to_rank"]) for e in callback.events] == [(3, 4)]  # (no decision at the last step)
    trainer.train()  # the controller starts counting again, from the model's rank
    assert [(e["step"], e["to_rank"]) for e in callback.events] == [(3, 4), (3, 6)] and held(trainer, model)


@pytest.mark.parametrize("seq2seq", [False, True])
def test_the_controller_sees_the_same_loss_with_and_without_gradient_accumulation(tmp_path, bert_tok, t5_tok, seq2seq):
    """2 micro-batches of 4 or one batch of the same 8 examples: the step's loss is the same. BERT's classifier
    and T5 take **kwargs but their losses ignore num_items_in_batch, so transformers would not divide their
    losses by the accumulation steps (its own logged loss and gradients would double); a user tells it so, as
    transformers advises, with model_accepts_loss_kwargs. (A loss that does use it: the next test.)"""
    tok = t5_tok if seq2seq else bert_tok
    runs = {}
    for accumulation in (1, 2):
        trainer, callback, _ = trainer_for(tmp_path / str(accumulation), tok, "expand", seq2seq=seq2seq, max_steps=8,
                                           gradient_accumulation_steps=accumulation,
                                           per_device_train_batch_size=8 // accumulation)
        assert trainer.model_accepts_loss_kwargs
        trainer.model_accepts_loss_kwargs = False
        trainer.train()
        runs[accumulation] = callback.losses
        assert callback.losses == pytest.approx([h["loss"] for h in trainer.state.log_history if "loss" in h], rel=1e-5)
    # T5: a mean of two micro-batches' token means against one token mean over both, which differ a little
    # when the micro-batches hold different numbers of target tokens; never by the factor 2
    assert len(runs[1]) == 8 and runs[2] == pytest.approx(runs[1], rel=1e-2 if seq2seq else 1e-4)


def test_a_loss_normalised_by_num_items_in_batch_under_gradient_accumulation(tmp_path):
    """A LLaMA-style causal LM, whose loss divides by the tokens of the whole accumulated step: sequences of
    different lengths in 2 micro-batches of 4, or one batch of the same 8, give the controller the same loss."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 64, (int(n),), generator=g).tolist()}
            for n in torch.randint(4, 20, (64,), generator=g)]

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in batch])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    runs = {}
    for accumulation in (1, 2):
        torch.manual_seed(0)
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
        model = get_peft_model(llama, LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, lora_alpha=4,
                                                 target_modules=["q_proj", "v_proj"]))
        args = TrainingArguments(output_dir=str(tmp_path / str(accumulation)), per_device_train_batch_size=8 // accumulation,
                                 gradient_accumulation_steps=accumulation, max_steps=6, learning_rate=1e-2, report_to=[],
                                 save_strategy="no", logging_steps=1, use_cpu=True, seed=0, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        assert trainer.model_accepts_loss_kwargs
        callback = AdaRankCallback(AdaRankConfig(**FORCED)).attach(trainer)
        trainer.train()
        runs[accumulation] = callback.losses
    assert len(runs[1]) == 6 and runs[2] == pytest.approx(runs[1], rel=1e-4)


def test_importance_is_read_before_clipping(tmp_path, bert_tok):
    """With a clipping norm of 1e-6, clipped gradients would give a total score of at most about 1e-12."""
    trainer, callback, _ = trainer_for(tmp_path, bert_tok, "expand", max_grad_norm=1e-6, max_steps=2)
    callback.config.grow_top_k = 1
    from adarank.importance import ImportanceTracker

    callback.importance = ImportanceTracker("grad_norm")
    trainer.train()
    assert sum(float(v) for v in callback.importance.scores.values()) > 1e-8


def logits(model, tok):
    batch = tok(["the cat sat on a mat", "a dog ran"], ["the cat sat on the mat", "big red car"], padding=True,
                return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def plain_peft(base_dir_model, directory):
    """The adapter in `directory` on a fresh original base, with nothing but PEFT."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_dir_model, directory)


@pytest.mark.parametrize("strategy", ["merge", "expand", "masked"])
def test_save_model_reloads_with_plain_peft_on_the_original_base(tmp_path, bert_tok, strategy):
    trainer, callback, model = trainer_for(tmp_path, bert_tok, strategy)
    trainer.train()
    assert len(callback.events) == 3
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    reloaded = plain_peft(tiny_bert(vocab_size=len(bert_tok)), str(out))
    assert (logits(reloaded, bert_tok) - logits(model, bert_tok)).abs().max() <= 1e-4
    assert (out / "adarank" / "checkpoint.json").is_file()

    # export: from the directory (adarank export), and from the model in memory (a Python function)
    from adarank.export import export_adapter, export_model

    base = tmp_path / "base"
    tiny_bert(vocab_size=len(bert_tok)).save_pretrained(base)
    log = export_adapter(str(out), str(tmp_path / "exp"), base=str(base))
    assert log["max_abs_logit_diff"] <= 1e-4
    export_model(model, str(tmp_path / "exp2"))
    again = plain_peft(tiny_bert(vocab_size=len(bert_tok)), str(tmp_path / "exp2"))
    assert (logits(again, bert_tok) - logits(model, bert_tok)).abs().max() <= 1e-4


@pytest.mark.parametrize("strategy", ["merge", "expand", "masked"])
def test_resume_from_a_trainer_checkpoint_between_growths(tmp_path, bert_tok, strategy):
    """Checkpoints every 4 steps; growths at 3, 6, 9. Resuming from checkpoint-4 (one growth done, two to
    come) ends at the ranks, weights and losses of the run that was never stopped."""
    reference, ref_cb, ref_model = trainer_for(tmp_path / "ref", bert_tok, strategy, save_strategy="steps", save_steps=4)
    reference.train()
    ckpt = tmp_path / "ref" / "t" / "checkpoint-4"
    assert (ckpt / "adarank" / "checkpoint.json").is_file()

    resumed, cb, model = trainer_for(tmp_path / "res", bert_tok, strategy, save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=str(ckpt))
    key = lambda e: (e["step"], e["from_rank"], e["to_rank"])  # noqa: E731
    assert [key(e) for e in cb.events] == [key(e) for e in ref_cb.events] == [(3, 2, 4), (6, 4, 6), (9, 6, 8)]
    assert cb.losses == pytest.approx(ref_cb.losses, abs=1e-6)
    assert (logits(model, bert_tok) - logits(ref_model, bert_tok)).abs().max() <= 1e-5


@pytest.mark.parametrize("best, rank", [(4, 4), (2, 2)])
def test_load_best_model_at_end_restores_the_best_checkpoints_ranks_and_base(tmp_path, bert_tok, best, rank):
    """Merges at 3, 6 and 9 change the base; the model at the end has rank 8. The best checkpoint (by
    construction the first) is taken after the first merge (step 4) or before any (step 2):
    load_best_model_at_end brings back its ranks and its base."""
    from transformers import TrainerCallback

    from adarank import lora_ranks

    trainer, callback, model = trainer_for(tmp_path, bert_tok, "merge", evaluate=True, save_strategy="steps",
                                           save_steps=best, eval_strategy="steps", eval_steps=best,
                                           load_best_model_at_end=True, metric_for_best_model="eval_loss",
                                           greater_is_better=False)
    snapshots = {}

    class Best(TrainerCallback):  # make the first checkpoint the best, and remember the model there
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics["eval_loss"] = float(state.global_step)
            if state.global_step == best:
                snapshots["logits"] = logits(model, bert_tok)
                model.train()

    trainer.add_callback(Best())
    trainer.train()
    assert len(callback.events) == 3 and trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    assert set(lora_ranks(model).values()) == {rank}
    assert (logits(model, bert_tok) - snapshots["logits"]).abs().max() <= 1e-5
    out = tmp_path / "saved"  # and what save_model writes then is that model, on the original base
    trainer.save_model(str(out))
    assert (logits(plain_peft(tiny_bert(vocab_size=len(bert_tok)), str(out)), bert_tok) - snapshots["logits"]).abs().max() <= 1e-4


def test_resume_with_the_users_own_optimizer(tmp_path, bert_tok):
    """optimizers=(SGD, LambdaLR): on resume the Trainer keeps that optimizer, which must get the resized
    factors before the checkpoint's state is loaded into it."""
    reference, ref_cb, ref_model = trainer_for(tmp_path / "ref", bert_tok, "expand", optimizers=("sgd", None),
                                               save_strategy="steps", save_steps=4)
    reference.train()
    resumed, cb, model = trainer_for(tmp_path / "res", bert_tok, "expand", optimizers=("sgd", None),
                                     save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "ref" / "t" / "checkpoint-4"))
    assert held(resumed, model) and [e["to_rank"] for e in cb.events] == [e["to_rank"] for e in ref_cb.events]
    assert cb.losses == pytest.approx(ref_cb.losses, abs=1e-6)
    assert (logits(model, bert_tok) - logits(ref_model, bert_tok)).abs().max() <= 1e-5


def test_attach_refuses_what_growth_would_fail_on(tmp_path, bert_tok):
    from transformers import Trainer, TrainingArguments

    model = apply_lora(tiny_bert(vocab_size=len(bert_tok)), False, 4, 8, None, 0.0)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    with pytest.raises(ValueError, match=r"the model's LoRA rank is \[4\] but AdaRankConfig.r0 is 2"):
        AdaRankCallback(AdaRankConfig(**FORCED)).attach(trainer)
    from peft import LoraConfig

    model.add_adapter("second", LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="one LoRA adapter named 'default'; the model has \\['default', 'second'\\]"):
        AdaRankCallback(AdaRankConfig(**{**FORCED, "r0": 4})).attach(trainer)
