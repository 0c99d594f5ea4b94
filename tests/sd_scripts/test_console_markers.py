"""A fired guard's line is the HANG GUARD marker. What a whole training run prints is checked against
MARKERS in test_trainer_bf16_run.py (one in-process run shared with the bf16 checks)."""
from __future__ import annotations

import pytest

from library import console_markers as cm
from train_helpers import marker_groups


def test_hang_guard_line_is_the_marker(tmp_path, capsys):
    from library.hang_guards import HangGuards

    guards = HangGuards(tmp_path, None, stall_dump_timeout=0, exit_func=lambda code: None)
    try:
        with pytest.raises(SystemExit):
            guards.fire("save", "writing x-state within 1 s")
    finally:
        guards.close()
    err = capsys.readouterr().err
    assert marker_groups(err)["failed"] == ["HANG GUARD ["]
    assert cm.HANG_GUARD.format(site="save", detail="writing x-state within 1 s") in err


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
