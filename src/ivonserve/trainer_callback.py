"""IVON in a ``transformers.Trainer``: ``IVONTrainer`` runs every training step under IVON's
weight sample, and ``PosteriorCallback`` writes an ivonserve posterior folder inside every
checkpoint the Trainer saves (``checkpoint-N/posterior``) and at the end of training
(``<output_dir>/posterior``).

Imported only by a Trainer's user (it imports transformers at its top); the server never
imports it. The folder is ``posterior.save_posterior``'s, the same bytes that ``ivonserve
posterior import checkpoint-N`` writes from the checkpoint's adapter and ``optimizer.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ivonserve.errors import IvonserveError
from ivonserve.posterior import save_posterior
from ivonserve.posterior_import import trainer_record

FOLDER = "posterior"


class IVONTrainer(Trainer):
    """A Trainer whose every training step runs inside ivon-opt's ``sampled_params``: the loss
    and its gradient at a weight sample, which is how IVON learns its Hessian. The Trainer's own
    loop knows nothing of it. Pass IVON through ``optimizers=(IVON(...), None)``."""

    def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        with ivon_optimizer(self.optimizer).sampled_params(train=True):
            return super().training_step(model, inputs, *args, **kwargs)


class PosteriorCallback(TrainerCallback):
    """``IVONTrainer(..., optimizers=(IVON(...), None), callbacks=[PosteriorCallback(base_model=
    NAME)])``. ``base_model``: the name posterior.json records (default: the adapter config's
    base_model_name_or_path); ``training``: more to record."""

    def __init__(
        self, base_model: str | None = None, training: dict[str, Any] | None = None
    ) -> None:
        self.base_model = base_model
        self.training = training or {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Refuse before the first step, not at the first save."""
        ivon_optimizer(kwargs.get("optimizer"))
        if args.gradient_accumulation_steps != 1:
            raise IvonserveError(
                f"PosteriorCallback: gradient_accumulation_steps is "
                f"{args.gradient_accumulation_steps}; IVON needs 1 (each step reads the gradient "
                "of one weight sample; accumulating mixes samples: ivon-opt's issue 6)"
            )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self._write(checkpoint / FOLDER, state, kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._write(Path(args.output_dir) / FOLDER, state, kwargs)

    def _write(self, out: Path, state: Any, kwargs: dict[str, Any]) -> None:
        if not state.is_world_process_zero:
            return
        model = kwargs["model"]
        save_posterior(
            getattr(model, "module", model),  # a distributed wrapper holds the PEFT model
            ivon_optimizer(kwargs.get("optimizer")),
            out,
            base_model=self.base_model,
            training=trainer_record(state.global_step) | self.training,
        )


def ivon_optimizer(optimizer: Any) -> Any:
    """The Trainer's optimizer as IVON (accelerate wraps it); anything else is refused."""
    import ivon

    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, ivon.IVON):
        raise IvonserveError(
            f"PosteriorCallback: the Trainer's optimizer is {type(inner).__name__}, not "
            "ivon-opt's IVON: pass IVON through IVONTrainer(optimizers=(IVON(...), None))"
        )
    return inner
