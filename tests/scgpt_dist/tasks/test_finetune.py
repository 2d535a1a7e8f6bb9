"""scgpt_dist.tasks.finetune: the one single-process finetuning loop, on problems whose answer is known."""

from __future__ import annotations

import torch

from scgpt_dist.tasks.finetune import LoopConfig, train_epochs


def test_train_epochs_fits_a_known_line_decays_the_rate_and_skips_frozen_weights():
    torch.manual_seed(0)
    x = torch.randn(256, 1)
    y = 3.0 * x - 1.0
    model = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
    model[0].weight.requires_grad_(False)  # frozen: must not move
    frozen = model[0].weight.detach().clone()
    cfg = LoopConfig(epochs=40, batch_size=32, lr=0.05, schedule_gamma=0.95, seed=0)
    seen_epochs = []

    def batches(epoch):
        seen_epochs.append(epoch)
        order = torch.randperm(len(x))
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            yield x[idx], y[idx]

    def loss_of(batch):
        xb, yb = batch
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        return loss, {"mse": loss.detach()}

    logged = []
    history = train_epochs(model, cfg, batches, loss_of, on_epoch=lambda e, m: logged.append(e))
    assert seen_epochs == logged == list(range(40)) and len(history) == 40
    assert set(history[0]) == {"loss", "mse"} and history[0]["loss"] == history[0]["mse"]
    assert history[-1]["loss"] < 1e-3 < history[0]["loss"]  # the line is learnt
    assert torch.equal(model[0].weight, frozen)
    assert not model.training  # left in eval mode
