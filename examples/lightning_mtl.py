"""PyTorch Lightning recipe: mtlsam_fast's multi-task optimizers in a LightningModule.

    python examples/lightning_mtl.py --optimizer fmtl --weighting mgda --epochs 4
    python examples/lightning_mtl.py --optimizer samo --precision bf16-mixed --resume last.ckpt

Trains :class:`~mtlsam_fast.models.MultiTaskNet` on MultiDigits (two digit-classification tasks
built from scikit-learn's bundled digits, no download) with F-MTL, SAMO or plain gradient
aggregation (``MTLOptimizer``), any weighting of ``mtlsam_fast.weighting.names()``.

The rules this recipe follows (docs/integrations.md explains them):

* Manual optimization (``automatic_optimization = False``). ``training_step`` hands a closure --
  the forward pass, returning the K task losses, no ``backward`` -- to
  ``self.optimizers().step(closure=...)``; the optimizer runs its own backward passes (K per
  step for ``MTLOptimizer``, 2K for F-MTL, 1 + K for SAMO) and evaluates the closure again at
  perturbed weights. Do not call ``manual_backward``.
* ``configure_optimizers`` builds the optimizer over the shared trunk and one parameter list per
  head, and an LR scheduler; in manual optimization Lightning does not step schedulers, so
  ``on_train_epoch_end`` does. The scheduler sees our param groups (and may schedule ``rho``).
* Checkpoints are Lightning's own (``ModelCheckpoint``, ``trainer.save_checkpoint``,
  ``fit(ckpt_path=...)``): the optimizer's ``state_dict`` has torch's layout and carries the
  weighting's state and the step counter, so a resumed run is bitwise the uninterrupted one.
* Precision: ``"32-true"`` or ``"bf16-mixed"`` (Lightning runs ``training_step``, hence the
  closure, under autocast). ``"16-mixed"`` is not supported through Lightning's plugin, whose
  GradScaler calls ``optimizer.step()`` without a closure; for fp16 step the raw optimizer,
  ``self.optimizers().optimizer.step(closure, grad_scaler=scaler)``, then ``scaler.update()``.
* Lightning calls ``on_before_optimizer_step`` after every evaluation of the closure (1 + K times
  per F-MTL step), before the gradients are final: inspect gradients after the step instead.
* One process: under Lightning's DDP strategy the optimizer's own backward passes, run inside
  ``training_step``, are not all-reduced by DDP's reducer, so every process would train its own
  replica on its own data shard, silently (measured: two CPU processes end the first epoch with
  different weights). ``configure_optimizers`` refuses a world size above 1; multi-process
  training needs the optimizers' own distributed mode (docs/integrations.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import mtlsam_fast
from mtlsam_fast.data import MultiTaskData, multidigits
from mtlsam_fast.models import MultiTaskNet
from mtlsam_fast.train import task_losses

OPTIMIZERS = {"fmtl": mtlsam_fast.FMTL, "samo": mtlsam_fast.SAMO, "plain": mtlsam_fast.MTLOptimizer}


class MultiTaskModule(L.LightningModule):
    """A shared trunk, one head per task, trained by one of mtlsam_fast's optimizers."""

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 12, 12),
        num_classes: Sequence[int] = (10, 10),
        *,
        optimizer: str = "fmtl",
        weighting: str = "mgda",
        lr: float = 0.05,
        momentum: float = 0.9,
        rho: float = 0.05,
        lr_step: int = 2,
        lr_gamma: float = 0.5,
        width: int = 8,
        seed: int = 0,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False  # the optimizer runs its own backward passes
        self.net = MultiTaskNet(image_shape, num_classes, width=width, hidden=64, head_hidden=32)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch

        def closure() -> list[torch.Tensor]:
            return task_losses(self.net(x), y)  # the forward only: no backward, no zero_grad

        losses = self.optimizers().step(closure=closure)
        self.log("train/loss", losses.mean(), prog_bar=True)
        for k, loss in enumerate(losses):
            self.log(f"train/loss_{k}", loss)

    def on_train_epoch_end(self) -> None:
        self.lr_schedulers().step()  # manual optimization: schedulers are stepped by hand

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        for k, (loss, lg) in enumerate(zip(task_losses(logits, y), logits)):
            self.log(f"val/loss_{k}", loss)
            self.log(f"val/acc_{k}", (lg.argmax(1) == y[:, k]).float().mean())

    def configure_optimizers(self) -> dict[str, Any]:
        if self.trainer.world_size > 1:
            raise RuntimeError(
                f"MultiTaskModule trains in one process (world size {self.trainer.world_size}): "
                "Lightning's DDP does not synchronize the gradients of mtlsam_fast's own backward "
                "passes, so the replicas would diverge; use devices=1"
            )
        hp = self.hparams
        extra = {} if hp.optimizer == "plain" else {"rho": hp.rho}
        if hp.optimizer == "samo":
            extra["seed"] = hp.seed
        opt = OPTIMIZERS[hp.optimizer](
            self.net.shared_parameters(),
            self.net.task_parameters(),
            torch.optim.SGD,
            hp.weighting,
            lr=hp.lr,
            momentum=hp.momentum,
            **extra,
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.lr_step, gamma=hp.lr_gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def loaders(
    n_train: int = 512, n_test: int = 256, batch_size: int = 64, seed: int = 0
) -> tuple[DataLoader, DataLoader, MultiTaskData]:
    """MultiDigits as two DataLoaders (a fixed order: a resumed epoch replays the same batches)."""
    data = multidigits(n_train=n_train, n_test=n_test, seed=seed)
    train = TensorDataset(data.images(data.x_train), data.y_train)
    test = TensorDataset(data.images(data.x_test), data.y_test)
    return DataLoader(train, batch_size=batch_size), DataLoader(test, batch_size=256), data


def trainer(epochs: int, precision: str = "32-true", root: str = ".", **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        precision=precision,
        accelerator="auto",
        devices=1,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=kwargs.pop("enable_progress_bar", False),
        enable_model_summary=False,
        **kwargs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="fmtl")
    ap.add_argument("--weighting", default="mgda", choices=mtlsam_fast.weighting.names())
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    ap.add_argument("--n-train", type=int, default=2048)
    ap.add_argument("--root", default="lightning_mtl", help="checkpoint directory")
    ap.add_argument("--resume", default=None, help="a checkpoint to resume from")
    args = ap.parse_args(argv)
    train, test, data = loaders(n_train=args.n_train)
    module = MultiTaskModule(
        data.image_shape,
        data.num_classes,
        optimizer=args.optimizer,
        weighting=args.weighting,
        lr=args.lr,
        rho=args.rho,
    )
    fit = trainer(args.epochs, args.precision, args.root, enable_progress_bar=True)
    fit.fit(module, train, test, ckpt_path=args.resume)
    print({k: round(float(v), 4) for k, v in fit.callback_metrics.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
