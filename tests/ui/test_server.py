"""`python -m fluxgym ui` options: other hosts need a login; the login guards the pages and the API."""
from __future__ import annotations

import base64

import pytest

from fluxgym.webui import server


def test_non_local_host_without_auth_is_refused(capsys):
    assert server.main(["--host", "0.0.0.0", "--port", "1"]) == server.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--host 0.0.0.0" in err and "--auth" in err and "other machines" in err


@pytest.mark.parametrize("argv,needle", [
    (["--auth", "nopassword"], "USER:PASSWORD"),
    (["--auth", ":pw"], "both parts"),
    (["--auth-file", "/nonexistent/auth"], "cannot read it"),
])
def test_bad_auth_values(argv, needle, capsys):
    assert server.main(argv) == server.EXIT_USAGE
    assert needle in capsys.readouterr().err


def test_auth_file_lines(tmp_path):
    f = tmp_path / "auth"
    f.write_text("# users\nann:s3cret:with:colons\n\nbob:pw\n")
    a = server.build_parser().parse_args(["--auth-file", str(f)])
    assert server.load_auth(a) == [("ann", "s3cret:with:colons"), ("bob", "pw")]
    f.write_text("# nobody\n")
    with pytest.raises(ValueError, match="no USER:PASSWORD line"):
        server.load_auth(a)


def test_api_needs_the_login_when_auth_is_set(api_root):
    from fastapi.testclient import TestClient

    app = server.create_app(api_root, auth=[("ann", "pw")])
    with TestClient(app) as c:
        r = c.get("/api/jobs")
        assert r.status_code == 401 and r.json()["field"] == "authorization"
        bad = base64.b64encode(b"ann:wrong").decode()
        assert c.get("/api/jobs", headers={"Authorization": f"Basic {bad}"}).status_code == 401
        good = base64.b64encode(b"ann:pw").decode()
        assert c.get("/api/jobs", headers={"Authorization": f"Basic {good}"}).json() == {"jobs": []}
        assert c.get("/config").status_code == 401  # the pages' data: Gradio's login first
        assert c.post("/login", data={"username": "ann", "password": "no"}).status_code != 200
        assert c.post("/login", data={"username": "ann", "password": "pw"}).json()["success"] is True
        assert c.get("/config").status_code == 200
