"""Experiment trackers (TensorBoard, wandb) with upstream sd-scripts' tag names and folder layout.

- Folder: `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/<log_tracker_name>/events.out.tfevents.*` (the
  layout accelerate's TensorBoard tracker gives upstream), so TensorBoard dashboards find the same runs.
- Tags: `loss/current`, `loss/average`, `lr/<group>` per optimizer step; `loss/epoch_average` per epoch
  (TensorBoard step = epoch number, as upstream); validation tags from `library.validation`.
- The step axis is the absolute optimizer step, so a resumed run continues the curve instead of
  restarting at 0 (upstream restarts unless --skip_until_initial_step).
Main process only; every other rank gets a tracker whose calls do nothing.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from library.settings import TrackingSettings

log = logging.getLogger(__name__)
SECRET_FLAGS = ("wandb_api_key", "huggingface_token")  # never sent to a tracker with --log_config


class LossRecorder:
    """Upstream's `loss/average`: the mean of the most recent loss at each batch position of an epoch."""

    def __init__(self):
        self.losses: list[float] = []
        self.total = 0.0

    def add(self, *, epoch: int, step: int, loss: float) -> None:
        if epoch == 0 or step >= len(self.losses):
            self.losses.append(loss)
        else:
            self.total -= self.losses[step]
            self.losses[step] = loss
        self.total += loss

    @property
    def moving_average(self) -> float:
        return self.total / max(1, len(self.losses))

    def state(self) -> dict:
        """Saved in a state folder's manifest, so a resumed run continues the same average."""
        return {"losses": list(self.losses), "total": self.total}

    def restore_from_state(self, state_dir: Path) -> None:
        from library.checkpoint_validation import read_manifest

        try:
            saved = read_manifest(state_dir).get("loss_recorder") or {}
        except (OSError, ValueError):
            return  # an upstream-made state: start the average afresh, as upstream does
        if saved:
            self.losses, self.total = [float(x) for x in saved["losses"]], float(saved["total"])


def sanitized_config(raw: dict) -> dict:
    """--log_config: the flags as plain scalars (lists as strings), secrets left out."""
    config = {}
    for key, value in sorted(raw.items()):
        if key in SECRET_FLAGS:
            continue
        if isinstance(value, (list, tuple)):
            value = str(value)
        if value is None or isinstance(value, (bool, int, float, str)):
            config[key] = value
    return config


def lr_tags(param_groups: list[dict], train_clip: bool) -> dict[str, float]:
    """`lr/<description>` per param group, with the descriptions upstream's lora_flux gives its groups."""
    names = (["textencoder 1 "] if train_clip else []) + ["unet"]
    tags = {}
    for index, group in enumerate(param_groups):
        name = names[index] if index < len(names) else f"group{index}"
        tags[f"lr/{name}"] = float(group["lr"])
    return tags


class Tracker:
    """The run's trackers; `enabled` is False when no --logging_dir/--log_with was given or off the main rank."""

    def __init__(self, settings: TrackingSettings, *, is_main: bool, raw_flags: dict):
        self.settings = settings
        self.enabled = bool(settings.log_with) and is_main
        self.recorder = LossRecorder()
        self.run_dir: Path | None = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        config = sanitized_config(raw_flags) if settings.log_config else None
        if settings.logging_dir:
            stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
            self.run_dir = Path(settings.logging_dir) / f"{settings.log_prefix}{stamp}"
        if "tensorboard" in settings.log_with:
            self._start_tensorboard(config)
        if "wandb" in settings.log_with:
            self._start_wandb(config)

    def _start_tensorboard(self, config: dict | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = self.run_dir / self.settings.tracker_name
        # flush_secs bounds what a crash can lose without a flush (and a disk write) on every step
        kwargs = {"flush_secs": 10, **self.settings.tracker_config.get("tensorboard", {})}
        self._tb = SummaryWriter(str(folder), **kwargs)
        if config is not None:
            self._tb.add_hparams({k: ("None" if v is None else v) for k, v in config.items()}, metric_dict={},
                                 run_name=".")
        print(f"logging to TensorBoard: {folder}")

    def _start_wandb(self, config: dict | None) -> None:
        import wandb

        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.wandb_api_key:
            wandb.login(key=self.settings.wandb_api_key)
        kwargs = dict(self.settings.tracker_config.get("wandb", {}))
        if self.run_dir is not None:
            kwargs.setdefault("dir", str(self.run_dir))
        self._wandb = wandb.init(project=self.settings.tracker_name, config=config, **kwargs)
        for metric in ("epoch", "val_step"):
            self._wandb.define_metric(metric, hidden=True)

    # ------------------------------------------------------------------ logging
    def log(self, values: dict[str, float], *, step: int, epoch: int, axis: str = "step") -> None:
        """TensorBoard gets `step` (or `epoch` for per-epoch values); wandb gets global_step and epoch keys."""
        if not self.enabled:
            return
        if self._tb is not None:
            x = epoch if axis == "epoch" else step
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, global_step=x)
        if self._wandb is not None:
            self._wandb.log({**values, "global_step": step, "epoch": epoch})

    def log_step(self, session, loss: float) -> None:
        """After each optimizer step: loss/current, loss/average and the learning rates."""
        pos = session.pos  # already advanced past this step; the epoch has not been closed yet
        self.recorder.add(epoch=pos.epoch, step=pos.batch_in_epoch - 1, loss=loss)
        if not self.enabled:
            return
        values = {"loss/current": loss, "loss/average": self.recorder.moving_average}
        values.update(lr_tags(session.opt.optimizer.param_groups, session.models.train_clip))
        self.log(values, step=pos.step, epoch=pos.epoch + 1)

    def log_epoch_end(self, session, epoch: int | None = None) -> None:
        """`epoch`: the 1-based epoch that ends (default: the one just completed)."""
        self.log({"loss/epoch_average": self.recorder.moving_average}, step=session.pos.step,
                 epoch=session.pos.epoch if epoch is None else epoch, axis="epoch")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
