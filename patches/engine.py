"""Plan, apply, check and reverse the hardening patches on an sd-scripts checkout.

Responsibilities: load the patch modules named in `series`; compute every edit in memory (a Plan) and
report drift without writing; write all changed files atomically and byte-compile them; keep the state
folder (original copies, hashes, upstream commit) that lets `reverse` restore the exact original bytes.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import py_compile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from patches import astedit

TOOL_VERSION = 1
STATE_DIR = ".fluxtrain-hardening"
HELPER_REL = "library/fluxtrain_hardening.py"
PATCHES_DIR = Path(__file__).resolve().parent
RUNTIME_HELPER = PATCHES_DIR / "runtime" / "fluxtrain_hardening.py"


class UsageError(Exception):
    """Bad command-line input (exit 2)."""


@dataclass
class FileReport:
    file: str
    sites: int = 0
    patched: int = 0
    pending: int = 0
    symbols: list = field(default_factory=list)


@dataclass
class PatchReport:
    id: str
    title: str
    description: str
    why: str
    status: str = "not applicable"  # applied | missing | not applicable | drift
    files: list = field(default_factory=list)
    drift: list = field(default_factory=list)
    absent: list = field(default_factory=list)


@dataclass
class Plan:
    root: Path
    reports: list
    new_texts: dict  # relpath -> patched text (only files that change)
    helper: str  # installed | missing | outdated | not needed

    @property
    def drift(self) -> list:
        return [d for r in self.reports for d in r.drift]

    @property
    def complete(self) -> bool:
        return all(r.status in ("applied", "not applicable") for r in self.reports) and self.helper in (
            "installed",
            "not needed",
        )


def load_series(series: Path | None = None) -> list:
    """The patch modules listed in the series file, in order."""
    series = series or PATCHES_DIR / "series"
    modules = []
    for line in series.read_text(encoding="utf-8").splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            modules.append(importlib.import_module(f"patches.hardening.{Path(name).stem}"))
    return modules


def check_checkout(path) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{path} is not a directory; pass the sd-scripts checkout folder")
    markers = (root / "train_network.py").is_file() or (root / "library" / "train_util.py").is_file()
    if not ((root / "library").is_dir() and markers):
        raise UsageError(
            f"{path} does not look like a kohya-ss/sd-scripts checkout "
            "(expected library/ and train_network.py or library/train_util.py)"
        )
    return root.resolve()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_source(root: Path, rel: str, cache: dict):
    if rel not in cache:
        raw = (root / rel).read_bytes()
        text = raw.decode("utf-8")
        bom = text.startswith("\ufeff")
        cache[rel] = (astedit.Source(text[1:] if bom else text), bom)
    return cache[rel]


def _plan_patch(root: Path, patch, cache: dict, edits: dict) -> PatchReport:
    report = PatchReport(patch.ID, patch.TITLE, patch.DESCRIPTION, patch.WHY)
    found = {}
    for rel in patch.candidate_files(root):
        if not (root / rel).is_file():
            report.absent.append(rel)
            continue
        try:
            src, _ = _read_source(root, rel, cache)
            sites = patch.find_sites(rel, src)
            found[rel] = sites
            report.files.append(_plan_file(src, rel, patch, sites, edits))
        except astedit.Drift as exc:
            report.drift.append(f"{patch.ID} {exc.relpath}: {exc.symbol}: {exc.detail}")
        except astedit.Unsupported as exc:
            report.drift.append(f"{patch.ID} {rel}: {exc}")
        except (SyntaxError, UnicodeDecodeError) as exc:
            hint = "run apply.py with the Python that runs sd-scripts" if isinstance(exc, SyntaxError) else "not UTF-8"
            report.drift.append(f"{patch.ID} {rel}: cannot be parsed ({exc}); {hint}")
    if hasattr(patch, "check_total") and not report.drift:
        try:
            patch.check_total(found)
        except astedit.Drift as exc:
            report.drift.append(f"{patch.ID} {exc.relpath}: {exc.symbol}: {exc.detail}")
    report.status = _status(report)
    return report


def _plan_file(src, rel: str, patch, sites: list, edits: dict) -> FileReport:
    fr = FileReport(rel, sites=len(sites))
    pending: dict = {}
    for site in sites:
        fr.symbols.append(site.symbol)
        if src.in_marked_block(site.stmt, patch.ID):
            fr.patched += 1
        elif site.edits:
            pending.setdefault(id(site.stmt), []).append(site)
        else:
            fr.patched += 1  # upstream already does what the patch would add
    for group in pending.values():
        fr.pending += len(group)
        try:
            block = astedit.block_edits(src, group[0].stmt, patch.ID, patch.FIX, group)
        except astedit.Unsupported as exc:
            raise astedit.Drift(rel, group[0].symbol, f"cannot edit safely: {exc}") from None
        edits.setdefault(rel, []).extend(block)
    fr.symbols = sorted(set(fr.symbols))
    return fr


def _status(report: PatchReport) -> str:
    if report.drift:
        return "drift"
    if not any(f.sites for f in report.files):
        return "not applicable"
    return "missing" if any(f.pending for f in report.files) else "applied"


def plan(root: Path, patches: list) -> Plan:
    """Every edit the patches need on this checkout, computed in memory; nothing is written."""
    cache, edits = {}, {}
    reports = [_plan_patch(root, p, cache, edits) for p in patches]
    new_texts = {}
    for rel, file_edits in edits.items():
        src, bom = cache[rel]
        try:
            text = astedit.apply_edits(src.text, file_edits)
            compile(text, rel, "exec")  # the edited file must still be valid Python before anything is written
        except (astedit.Unsupported, SyntaxError) as exc:
            for report in reports:
                if any(f.file == rel and f.pending for f in report.files):
                    report.drift.append(f"{report.id} {rel}: the edited file would not compile ({exc})")
                    report.status = "drift"
            continue
        new_texts[rel] = ("\ufeff" if bom else "") + text
    applicable = any(r.status != "not applicable" for r in reports)
    helper_path = root / HELPER_REL
    if not applicable:
        helper = "not needed"
    elif not helper_path.is_file():
        helper = "missing"
    else:
        helper = "installed" if helper_path.read_bytes() == RUNTIME_HELPER.read_bytes() else "outdated"
    return Plan(root, reports, new_texts, helper)


# --- state folder ------------------------------------------------------------------------------------


def upstream_commit(root: Path) -> str | None:
    """HEAD commit of a git checkout, read from the files so git need not be installed."""
    git = root / ".git"
    try:
        if git.is_file():  # worktree or submodule: "gitdir: <path>"
            git = (root / git.read_text(encoding="utf-8").split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        if (git / ref).is_file():
            return (git / ref).read_text(encoding="utf-8").strip()
        for line in (git / "packed-refs").read_text(encoding="utf-8").splitlines():
            if line.endswith(" " + ref):
                return line.split(" ", 1)[0]
    except (OSError, IndexError):
        return None
    return None


def load_state(root: Path) -> dict | None:
    path = root / STATE_DIR / "state.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is None:  # a new file gets the usual permissions, not mkstemp's owner-only ones
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _has_markers(data: bytes) -> bool:
    return b"# hardening:" in data


# --- apply / reverse ---------------------------------------------------------------------------------


def apply_plan(p: Plan) -> list:
    """Write every planned change (helper module included) and record originals; returns changed paths.

    Callers must not call this when the plan has drift. Originals are copied into the state folder
    before any file is replaced, so an interrupted run can still be reversed.
    """
    root = p.root
    changes = {rel: text.encode("utf-8") for rel, text in p.new_texts.items()}
    if p.helper in ("missing", "outdated"):
        changes[HELPER_REL] = RUNTIME_HELPER.read_bytes()
    if not changes:
        return []
    state = load_state(root) or {"tool": "fluxtrain patches/apply.py", "files": {}}
    for rel in changes:
        _remember_original(root, state, rel)
    written = []
    try:
        for rel, data in changes.items():
            _atomic_write(root / rel, data)
            written.append(rel)
        _byte_compile(root, written)
    except BaseException:
        _restore(root, state, written)
        raise
    for rel, data in changes.items():
        state["files"][rel]["patched_sha256"] = sha256(data)
        state["files"][rel]["patches"] = sorted({r.id for r in p.reports for f in r.files if f.file == rel and f.sites})
    state.update(
        version=TOOL_VERSION,
        upstream_commit=upstream_commit(root),
        applied=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        patches={r.id: r.status if r.status == "not applicable" else "applied" for r in p.reports},
    )
    _atomic_write(root / STATE_DIR / "state.json", (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
    return sorted(changes)


def _remember_original(root: Path, state: dict, rel: str) -> None:
    path = root / rel
    record = state["files"].get(rel)
    current = path.read_bytes() if path.is_file() else None
    if record is not None and current is not None and sha256(current) == record.get("patched_sha256"):
        return  # still our last output: the recorded original stays valid
    if current is not None and rel != HELPER_REL and _has_markers(current) and record is not None:
        return  # partly ours already (older tool run); keep the first pristine copy
    entry = {"created": current is None, "original_sha256": sha256(current) if current is not None else None}
    if current is not None:
        _atomic_write(root / STATE_DIR / "originals" / rel, current)
    state["files"][rel] = entry


def _byte_compile(root: Path, rels: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for i, rel in enumerate(rels):
            if rel.endswith(".py"):
                # cfile in a temp dir: prove it compiles without leaving .pyc files in the user's checkout
                py_compile.compile(str(root / rel), cfile=os.path.join(tmp, f"{i}.pyc"), doraise=True)


def _restore(root: Path, state: dict, rels: list) -> None:
    for rel in rels:
        entry = state["files"].get(rel, {})
        if entry.get("created"):
            (root / rel).unlink(missing_ok=True)
        else:
            original = root / STATE_DIR / "originals" / rel
            if original.is_file():
                _atomic_write(root / rel, original.read_bytes())


def reverse(root: Path) -> tuple:
    """Restore every file this tool changed to its original bytes; returns (restored, problems)."""
    state = load_state(root)
    if state is None:
        marked = [str(p.relative_to(root)) for p in _marked_files(root)]
        return [], [f"{rel}: has hardening markers but no state was recorded" for rel in marked]
    restored, problems = [], []
    for rel, entry in sorted(state["files"].items()):
        path = root / rel
        current = path.read_bytes() if path.is_file() else None
        if current is None and entry.get("created"):
            continue
        digest = sha256(current) if current is not None else None
        if digest == entry.get("original_sha256"):
            continue  # already original
        if digest != entry.get("patched_sha256"):
            problems.append(f"{rel}: changed since it was patched; not restored (compare with {STATE_DIR}/originals)")
            continue
        _restore(root, state, [rel])
        restored.append(rel)
    if not problems:
        _remove_state(root)
    return restored, problems


def _remove_state(root: Path) -> None:
    base = root / STATE_DIR
    for path in sorted(base.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    if base.exists():
        base.rmdir()


def _marked_files(root: Path) -> list:
    found = []
    for path in list(root.glob("*.py")) + list((root / "library").rglob("*.py")):
        if _has_markers(path.read_bytes()):
            found.append(path)
    return sorted(found)
