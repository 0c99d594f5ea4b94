"""The hang sites: every wait the trainer bounds, one row each, defined once here.

Readers: `hang_guards.HangGuards.fire` (the hint printed after "Try:"), `fault_injection`
(which names `FLUXTRAIN_INJECT_HANG` accepts), the README's guard table (a test compares it
with this table, code links included) and `args.add_hardening_arguments` defaults (a test
pins that they agree). Stdlib only: DataLoader workers import it through fault_injection.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HangSite:
    name: str              # "HANG GUARD [name]" on the console; FLUXTRAIN_INJECT_HANG=name in tests
    flag: str              # the command-line flag that sets the bound
    default: float | None  # the flag's default in `unit`; None: off unless given
    unit: str              # "s" or "min"
    hint: str              # printed after "Try:" when the guard fires
    code: str              # file that enforces the bound, relative to the repository root
    symbol: str            # function or Class.method in that file where the bound is applied
    injectable: bool = True  # the code calls fault_injection.inject_point(name) inside the bound
    ends_run: bool = True    # False: a diagnosis only (a stack dump), the run goes on

    def default_text(self) -> str:
        """`300 s` / `off`: how the README's guard table writes the default."""
        return "off" if self.default is None else f"{self.default:g} {self.unit}"


_SITES = (
    HangSite(
        "dataloader", "--dataloader_timeout", 300.0, "s",
        "a DataLoader worker is stuck reading an image or cache file. Check the disk or network mount of the "
        "dataset, try fewer workers (--max_data_loader_n_workers 0..2) or drop --persistent_data_loader_workers, "
        "or raise --dataloader_timeout if the data really is that slow.",
        "sd-scripts/library/train_loop.py", "training_batches"),
    HangSite(
        "block_swap", "--block_swap_timeout", 60.0, "s",
        "moving a transformer block between CPU and GPU did not finish. Lower --blocks_to_swap (0 turns block "
        "swap off), free system RAM (on Windows turn off the CUDA sysmem fallback), or raise --block_swap_timeout.",
        "sd-scripts/library/offloading.py", "BlockSwapper._wait"),
    HangSite(
        "cache_io", "--cache_io_timeout", 30.0, "s",
        "reading a cached .npz file did not finish. Check the disk or network mount of the dataset, delete the "
        "*_flux.npz / *_flux_te.npz cache files so they are rebuilt, or raise --cache_io_timeout.",
        "sd-scripts/library/npz_io.py", "bounded_npz_load"),
    HangSite(
        "sample", "--sample_timeout", 600.0, "s",
        "generating one sample image took too long. Use fewer sample steps (--s in the prompt file) or larger "
        "--sample_every_n_steps/epochs, or raise --sample_timeout.",
        "sd-scripts/library/sampling.py", "generate_samples"),
    HangSite(
        "save", "--save_timeout", 900.0, "s",
        "writing a checkpoint did not finish; the previous checkpoint is intact. Check free space and the health "
        "of the output disk, or raise --save_timeout for a slow network drive.",
        "sd-scripts/library/checkpointer.py", "Checkpointer.save"),
    HangSite(
        "ddp", "--ddp_timeout", None, "min",
        "another process (rank) did not reach the synchronisation point. Look for the first error in the other "
        "ranks' output; raise --ddp_timeout (minutes) if one rank is only slow, e.g. while caching.",
        "sd-scripts/library/train_session.py", "RunControl.ddp_deadline", injectable=False),
    HangSite(
        "step", "--stall_dump_timeout", 600.0, "s",
        "a training step did not finish. Check the GPU (nvidia-smi), lower the batch size or resolution, "
        "and read the stack dump to see where it stopped.",
        "sd-scripts/library/train_loop.py", "training_step", ends_run=False),
)

SITES: dict[str, HangSite] = {site.name: site for site in _SITES}
INJECTABLE: frozenset[str] = frozenset(s.name for s in _SITES if s.injectable)


def hint_for(name: str) -> str:
    site = SITES.get(name)
    return site.hint if site is not None else "see the stack dump"
