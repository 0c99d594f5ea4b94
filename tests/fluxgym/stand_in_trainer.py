"""Stand-in for sd-scripts/flux_train_network.py in fluxgym tests: records argv, then behaves per FG_MODE.

FG_RECORD: json file that receives {"argv": sys.argv[1:], "pid": ..., "cwd": ...}.
FG_MODE: ok (write <output_dir>/<output_name>.safetensors, exit 0) | fail (exit 1 after an error line) |
nolora (exit 0, write nothing) | flood (FG_FLOOD_MB of output, then ok) | spawn (start a grandchild,
record both pids in FG_PIDS, then sleep until killed) | ignore_term (like spawn, but ignores SIGTERM) |
oom_once (without --blocks_to_swap in argv: die like a CUDA out-of-memory error; with it: ok) |
slow (print a step line every 0.2 s for FG_SLEEP seconds, then write a valid empty safetensors LoRA and a
`done` heartbeat, then linger 0.2 s like the real trainer's teardown).
"""

import json
import os
import signal
import subprocess
import sys
import time


def last_value(argv, flag):
    value = None
    for i, tok in enumerate(argv[:-1]):
        if tok == flag:
            value = argv[i + 1]
    return value


def write_lora(argv):
    out_dir, name = last_value(argv, "--output_dir"), last_value(argv, "--output_name")
    with open(os.path.join(out_dir, name + ".safetensors"), "wb") as f:
        f.write(b"stand-in lora")


def write_done(argv):
    """A LoRA file that passes checkpoint validation (header only, no tensors) and heartbeat phase `done`."""
    out_dir, name = last_value(argv, "--output_dir"), last_value(argv, "--output_name")
    header = b'{"__metadata__":{"ss_steps":"5"}}'
    with open(os.path.join(out_dir, name + ".safetensors"), "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
    with open(os.path.join(out_dir, "heartbeat.json"), "w") as f:
        json.dump({"version": 1, "pid": os.getpid(), "phase": "done", "step": 5, "total_steps": 5, "epoch": 1,
                   "total_epochs": 1, "time": time.time(), "phase_started": time.time(), "last_checkpoint": None,
                   "message": f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}"}, f)


def main():
    argv = sys.argv[1:]
    if os.environ.get("FG_RECORD"):
        with open(os.environ["FG_RECORD"], "w", encoding="utf-8") as f:
            json.dump({"argv": argv, "pid": os.getpid(), "cwd": os.getcwd()}, f)
    mode = os.environ.get("FG_MODE", "ok")
    print("stand-in trainer starting", flush=True)
    if mode == "fail":
        print("RuntimeError: something broke in the stand-in", file=sys.stderr, flush=True)
        return 1
    if mode == "nolora":
        print("model saved.", flush=True)
        return 0
    if mode == "flood":
        line = ("x" * 1023 + "\n").encode()
        for _ in range(int(os.environ.get("FG_FLOOD_MB", "30")) * 1024):
            sys.stdout.buffer.write(line)
        sys.stdout.flush()
    if mode == "oom_once" and "--blocks_to_swap" not in argv:
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr, flush=True)
        return 1
    if mode == "slow":
        end = time.time() + float(os.environ.get("FG_SLEEP", "3"))
        while time.time() < end:
            print("steps: working", flush=True)
            time.sleep(0.2)
        write_done(argv)
        print("model saved.", flush=True)
        time.sleep(0.2)  # like the real trainer's teardown after its last heartbeat
        return 0
    if mode in ("spawn", "ignore_term"):
        if mode == "ignore_term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = "import signal,time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)\n"
        child = subprocess.Popen([sys.executable, "-c", code])
        with open(os.environ["FG_PIDS"], "w") as f:
            json.dump({"trainer": os.getpid(), "grandchild": child.pid}, f)
        print("steps: waiting", flush=True)
        time.sleep(600)
        return 0
    write_lora(argv)
    print("model saved.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
