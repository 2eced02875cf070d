"""Two-rank CPU training with FNGDTrainer; run by tests/test_distributed.py.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/dist_train.py OUT_DIR

(without ACCELERATE_USE_CPU=1 both processes silently run as rank 0 of 1.) Trains a tiny BART for
3 epochs (GA 2, sharing on, checkpoints every 2 steps), then resumes a second trainer from a
checkpoint in the shared phase, then trains once more with ``fngd_share_by="sample"``. Then the same
without the Trainer, in a plain accelerate loop (``accelerator.save_state``/``load_state``), resumed with
and without ``attach_accelerator``. Each rank writes ``OUT_DIR/rank{r}.json``: world size, losses, SHA-256
digests of its final parameters and checksums of its coefficient banks.
"""

import hashlib
import json
import sys
from pathlib import Path

import warnings

import torch
import tiny_models
from fngd_hf import FNGD, attach_accelerator
from fngd_hf.integrations import FNGDTrainer, FNGDTrainingArguments


class CopyTask(torch.utils.data.Dataset):
    def __init__(self, n, length=6, vocab=20, seed=0):
        self.rows = torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        x = self.rows[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def tiny_bart():
    return tiny_models.tiny_bart(0, vocab_size=20, d_model=32, ffn_dim=64, max_position_embeddings=16)


def digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(out: Path, resume: str | None = None, **overrides) -> FNGDTrainer:
    settings = dict(
        output_dir=str(out / "run"), optimizer="fngd", use_cpu=True, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, num_train_epochs=3, learning_rate=1e-2, logging_steps=4,
        fngd_adamw_lr=1e-2, fngd_trust_ratio=1.0, fngd_step_length="trust_region",  # the rates this toy was tuned at
        save_strategy="steps", save_steps=2, report_to=[], disable_tqdm=True, seed=0,
    )
    args = FNGDTrainingArguments(**{**settings, **overrides})
    trainer = FNGDTrainer(model=tiny_bart(), args=args, train_dataset=CopyTask(32))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def accelerate_loop(checkpoint: Path, keep: bool, resume: bool) -> tuple[str, list[str]]:
    """FNGD in a plain accelerate loop: 2 epochs of 8 steps per rank, saved after step 11 (in the shared
    phase); ``resume``: a fresh model, optimizer and accelerator load that and do steps 12-16. Returns the
    parameters' digest and the warnings raised."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_bart()
    opt = FNGD(model, lr=1e-2)
    loader = torch.utils.data.DataLoader(CopyTask(32), batch_size=2)  # no shuffling: the same order on resume
    model, opt, loader = accelerator.prepare(model, opt, loader)
    opt.optimizer.steps_per_epoch = len(loader)  # per rank, after prepare
    handle = attach_accelerator(accelerator, opt) if keep else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if resume:
            accelerator.load_state(str(checkpoint))
        done = 0
        for _ in range(2):
            for batch in loader:
                done += 1
                if resume and done <= 11:
                    continue  # the checkpoint's steps
                accelerator.backward(model(**batch).loss)
                opt.step()
                opt.zero_grad()
                if done == 11 and not resume:
                    accelerator.save_state(str(checkpoint))
    if handle is not None:
        handle.remove()
    return digest(accelerator.unwrap_model(model)), [str(w.message) for w in caught]


def main() -> None:
    out = Path(sys.argv[1])
    full = run(out)
    state = full.accelerator.state
    opt = full.fngd_optimizer
    bank = sum(float(s["coef_bank"].double().sum()) for s in opt.state.values() if "coef_bank" in s)
    # 16 samples per rank / batch 2 = 8 batches / GA 2 = 4 steps per epoch: checkpoint-6 is mid-epoch 2.
    resumed = run(out / "resumed", resume=str(out / "run" / "checkpoint-6"))
    # Sharing by sample: every rank stores every rank's samples (the sampler moves samples between ranks).
    by_sample = run(out / "by_sample", fngd_share_by="sample", save_strategy="no")
    sample_opt = by_sample.fngd_optimizer
    sample_bank = sum(float(s["coef_sample"].double().sum()) for s in sample_opt.state.values() if "coef_sample" in s)
    # Grafting: each rank's plain gradients are averaged before AdamW's moments, as DDP averages .grad.
    grafted = run(out / "graft", fngd_step_length="adamw", fngd_trust_ratio="auto", save_strategy="no")
    # Muon's step, the default: each rank orthogonalises the same averaged direction.
    orthogonal = run(out / "muon", fngd_step_length="muon", fngd_trust_ratio="auto", learning_rate=4e-3,
                     fngd_adamw_lr=4e-3, save_strategy="no")
    checkpoint = out / "accelerate_checkpoint"
    loop_params, _ = accelerate_loop(checkpoint, keep=True, resume=False)
    loop_resumed, loop_warnings = accelerate_loop(checkpoint, keep=True, resume=True)
    loop_unkept, unkept_warnings = accelerate_loop(checkpoint, keep=False, resume=True)
    record = {
        "accelerate_params": loop_params,
        "accelerate_resumed_params": loop_resumed,
        "accelerate_resumed_warnings": loop_warnings,
        "accelerate_unkept_params": loop_unkept,
        "accelerate_unkept_warnings": unkept_warnings,
        "accelerate_rank_files": sorted(p.name for p in checkpoint.glob("fngd_coefficients_rank*.pt")),
        "world_size": state.num_processes,
        "rank": state.process_index,
        "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None,
        "steps_per_epoch": opt.steps_per_epoch,
        "global_step": full.state.global_step,
        "losses": [r["loss"] for r in full.state.log_history if "loss" in r],
        "params": digest(full.model),
        "resumed_params": digest(resumed.model),
        "bank_checksum": bank,
        "fresh_fraction": [r.get("fngd/fresh_fraction") for r in full.state.log_history if "loss" in r],
        "by_sample_params": digest(by_sample.model),
        "muon_params": digest(orthogonal.model),
        "muon_losses": [r["loss"] for r in orthogonal.state.log_history if "loss" in r],
        "graft_params": digest(grafted.model),
        "graft_losses": [r["loss"] for r in grafted.state.log_history if "loss" in r],
        "by_sample_rows": len(sample_opt._sample_index),
        "by_sample_bank_checksum": sample_bank,
        "by_sample_fresh_fraction": [r.get("fngd/fresh_fraction") for r in by_sample.state.log_history if "loss" in r],
    }
    (out / f"rank{state.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    try:
        main()
    finally:
        # Without this, gloo's threads can abort the interpreter at exit (SIGABRT, seen in CI).
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
