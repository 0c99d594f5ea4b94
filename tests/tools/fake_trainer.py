"""Stand-in trainer for the monitor tests: upstream-like console progress, heartbeat.json, state folders.

Prints a tqdm-like `steps:` bar on stderr with `\\r` updates, `epoch k/E` and `saving checkpoint:` on stdout,
writes `NAME-step########-state` folders (train_state.json + our checkpoint.json manifest) and a final
`NAME.safetensors`; honours `--resume DIR`. Faults on demand: hang, sigstop, crash, crawl, silent-caching,
silent-saving, flood, linger (never exits after the final save), oom (dies like torch out of memory while
`--blocks_to_swap` < `--oom-below`); `--spawn-children` starts grandchildren
(one ignores SIGTERM, one in its own session).
Stdlib only (plus the stdlib heartbeat writer from sd-scripts/library). Records each launch for the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sd-scripts"))

FAULTS = ("none", "hang", "sigstop", "crash", "crawl", "silent-caching", "silent-saving", "flood", "linger", "oom")


def parse_args(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--output-name", default="fake")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--step-time", type=float, default=0.05)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", type=Path, default=None)
    p.add_argument("--caching-time", type=float, default=0.0, help="healthy silent caching phase (s)")
    p.add_argument("--saving-time", type=float, default=0.0, help="healthy silent time inside each save (s)")
    p.add_argument("--no-heartbeat", action="store_true", help="behave like upstream: console output only")
    p.add_argument("--fault", choices=FAULTS, default="none")
    p.add_argument("--fault-at", type=int, default=None, help="absolute step before which the fault happens")
    p.add_argument("--fault-after", type=int, default=None, help="fault after this many steps of this launch")
    p.add_argument("--fault-times", type=int, default=1, help="faults across launches (counted in the folder)")
    p.add_argument("--crash-code", type=int, default=1)
    p.add_argument("--crawl-factor", type=float, default=20.0)
    p.add_argument("--crawl-steps", type=int, default=4)
    p.add_argument("--flood-mb", type=int, default=50)
    p.add_argument("--spawn-children", action="store_true")
    p.add_argument("--blocks_to_swap", type=int, default=0, help="as the trainer's; the last value counts")
    p.add_argument("--oom-below", type=int, default=10**6, help="oom fault only while --blocks_to_swap < this")
    return p.parse_args(argv)


def write_safetensors(path: Path, metadata: dict | None = None) -> None:
    header = {"lora.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<f", 0.5))


def save_state(output_dir: Path, name: str, step: int, epoch: int) -> Path:
    """A state folder the shared validator accepts: files, train_state.json, manifest last, atomic rename."""
    final = output_dir / f"{name}-step{step:08d}-state"
    tmp = output_dir / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    write_safetensors(tmp / "model.safetensors")
    for name in ("optimizer.bin", "scheduler.bin"):  # torch.save files are zip archives
        with zipfile.ZipFile(tmp / name, "w") as zf:
            zf.writestr("data.pkl", f"{name} at step {step}")
    (tmp / "train_state.json").write_text(json.dumps({"current_epoch": epoch, "current_step": step}))
    files = {}
    for f in sorted(tmp.iterdir()):
        files[f.name] = {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    manifest = {
        "format": "fluxtrain-checkpoint", "version": 1, "kind": "state", "output_name": name, "step": step,
        "epoch": epoch - 1, "data_position": {"epoch": epoch - 1, "batch_in_epoch": 0}, "files": files,
        "versions": {}, "args_digest": "0" * 64, "resume_settings": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (tmp / "checkpoint.json").write_text(json.dumps(manifest))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _dump_stacks(output_dir: Path) -> None:
    frames = sys._current_frames()
    lines = []
    for th in threading.enumerate():
        lines.append(f"Thread {th.name} ({th.ident}):")
        if th.ident in frames:
            lines.extend(traceback.format_stack(frames[th.ident]))
    (output_dir / f"stacks-{time.strftime('%Y%m%d-%H%M%S')}.txt").write_text("".join(ln + "\n" for ln in lines))


def _hang_forever() -> None:
    while True:
        time.sleep(0.2)


class Fake:
    def __init__(self, args):
        self.a = args
        self.out: Path = args.output_dir
        self.hb = None
        if not args.no_heartbeat:
            from library.heartbeat import Heartbeat

            self.hb = Heartbeat(self.out)
        self.spe = max(1, -(-args.steps // args.epochs))  # steps per epoch, rounded up

    def beat(self, method: str, *a) -> None:
        if self.hb is not None:
            getattr(self.hb, method)(*a)

    def should_fault(self, kind: str, step: int, started_at: int) -> bool:
        """Is this the step for fault `kind` (by --fault-at / --fault-after), and are faults left?"""
        a = self.a
        hit = (a.fault_at is not None and step == a.fault_at) or (
            a.fault_after is not None and step - started_at - 1 == a.fault_after
        )
        return a.fault == kind and hit and self.consume_fault(kind, step)

    def consume_fault(self, kind: str, step: int) -> bool:
        counter = self.out / "fake-faults.txt"
        done = int(counter.read_text()) if counter.exists() else 0
        if done >= self.a.fault_times:
            return False
        counter.write_text(str(done + 1))
        with open(self.out / "fake-fault-at.txt", "a") as fh:
            fh.write(f"{kind} {step} {time.time()}\n")
        return True

    def bar(self, n: int) -> None:
        total = self.a.steps
        pct = int(100 * n / total)
        fill = "#" * (pct // 10)
        sys.stderr.write(f"\rsteps: {pct:3d}%|{fill:<10}| {n}/{total} [00:01<00:01,  2.00it/s, avr_loss=0.123]")
        sys.stderr.flush()

    def save(self, step: int, epoch: int, started_at: int) -> None:
        name = self.a.output_name
        print(f"\nsaving checkpoint: {self.out / f'{name}-step{step:08d}.safetensors'}", flush=True)
        self.beat("phase", "saving")
        write_safetensors(self.out / f"{name}-step{step:08d}.safetensors")
        time.sleep(self.a.saving_time)
        if self.a.fault == "silent-saving" and self.consume_fault("silent-saving", step):
            _hang_forever()
        path = save_state(self.out, name, step, epoch)
        print(f"saving state at step {step}", flush=True)
        self.beat("checkpoint", str(path))
        self.beat("phase", "training")

    def fault(self, step: int, started_at: int) -> None:
        a = self.a
        if self.should_fault("hang", step, started_at):
            _hang_forever()
        if self.should_fault("sigstop", step, started_at):
            os.kill(os.getpid(), signal.SIGSTOP)
        if a.fault == "oom" and a.blocks_to_swap < a.oom_below and self.should_fault("oom", step, started_at):
            print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (fake)", file=sys.stderr,
                  flush=True)
            os._exit(1)
        if self.should_fault("crash", step, started_at):
            print("Traceback (most recent call last):\nRuntimeError: fake trainer crash", file=sys.stderr, flush=True)
            os._exit(a.crash_code)
        if self.should_fault("flood", step, started_at):
            line = b"flood " + b"x" * 93 + b"\n"
            t0 = time.time()
            for _ in range(a.flood_mb * 1024 * 1024 // len(line)):
                sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
            (self.out / "fake-flood.txt").write_text(str(time.time() - t0))
        if a.fault == "crawl" and a.fault_at is not None and a.fault_at <= step < a.fault_at + a.crawl_steps:
            time.sleep(a.step_time * (a.crawl_factor - 1))

    def run(self) -> int:
        a = self.a
        self.out.mkdir(parents=True, exist_ok=True)
        start = 0
        if a.resume is not None:
            try:
                start = json.loads((a.resume / "train_state.json").read_text())["current_step"]
            except (OSError, ValueError, KeyError) as exc:
                print(f"error: --resume {a.resume}: {exc}", file=sys.stderr)
                return 2
        with open(self.out / "fake-launches.jsonl", "a") as fh:
            fh.write(json.dumps({"argv": sys.argv[1:], "pid": os.getpid(), "start_step": start}) + "\n")
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, lambda s, f: _dump_stacks(self.out))
        if a.spawn_children:
            self.spawn_children()
        self.beat("set_totals", a.steps, a.epochs)
        print("loading model (fake)...", flush=True)
        if a.caching_time > 0 or a.fault == "silent-caching":
            print("caching latents...", flush=True)
            self.beat("phase", "caching_latents")
            time.sleep(a.caching_time)
            if a.fault == "silent-caching" and self.consume_fault("silent-caching", start):
                _hang_forever()
        self.beat("phase", "training")
        self.beat("step", start, start // self.spe + 1)
        self.bar(start)
        for step in range(start + 1, a.steps + 1):
            epoch = (step - 1) // self.spe + 1
            if (step - 1) % self.spe == 0:
                print(f"\nepoch {epoch}/{a.epochs}", flush=True)
            self.fault(step, start)
            time.sleep(a.step_time)
            self.beat("step", step, epoch)
            self.bar(step)
            if a.save_every and step % a.save_every == 0 and step < a.steps:
                self.save(step, epoch, start)
        final = self.out / f"{a.output_name}.safetensors"
        print(f"\nsaving checkpoint: {final}", flush=True)
        write_safetensors(final)
        print("model saved.", flush=True)
        self.beat("done")
        if a.fault == "linger" and self.consume_fault("linger", a.steps):
            _hang_forever()  # like a stuck non-daemon thread keeping a finished run alive
        return 0

    def spawn_children(self) -> None:
        code = "import time\nwhile True: time.sleep(0.2)"
        stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(0.2)"
        kids = [
            subprocess.Popen([sys.executable, "-c", code]),
            subprocess.Popen([sys.executable, "-c", stubborn]),
            subprocess.Popen([sys.executable, "-c", code], start_new_session=True),  # escapes the process group
        ]
        (self.out / "fake-children.json").write_text(json.dumps([k.pid for k in kids]))


def main(argv=None) -> int:
    return Fake(parse_args(sys.argv[1:] if argv is None else argv)).run()


if __name__ == "__main__":
    sys.exit(main())
