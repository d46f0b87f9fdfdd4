"""The deployment's celeryconfig.py: read by path, overriding, never a host's module, JSON only."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mes_tasks.config import CHECKOUT_CONFIG, EXIT_CONFIG, overrides
from mes_tasks.errors import ConfigurationError

REPO = Path(__file__).resolve().parent.parent
SHOW = (
    "from mes_tasks import app; "
    "print(app.conf.task_routes['mes_tasks.tasks.update_quantity'], app.conf.result_expires)"
)


def python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full, capture_output=True, text=True)


def test_the_checkout_config_is_the_top_level_file() -> None:
    assert CHECKOUT_CONFIG == REPO / "celeryconfig.py"


@pytest.mark.slow  # a subprocess
def test_a_host_applications_own_celeryconfig_is_neither_read_nor_shadowed(tmp_path: Path) -> None:
    (tmp_path / "celeryconfig.py").write_text("task_routes = {}\nresult_expires = 5\nHOST = True\n")
    code = f"import celeryconfig; assert celeryconfig.HOST; {SHOW}"
    done = python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["{'queue':", "'workorder'}", "86400"]


@pytest.mark.slow  # a subprocess
def test_the_deployment_file_overrides_what_it_assigns(tmp_path: Path) -> None:
    path = tmp_path / "site.py"
    path.write_text("import os\nresult_expires = 60\n_private = 1\n")
    done = python(SHOW, tmp_path, MES_CELERY_CONFIG=str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "60"
    assert overrides(path) == {"result_expires": 60}  # modules and private names are left out


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('task_serializer = "pickle"\n', "JSON only"),
        ('accept_content = ["json", "pickle"]\n', "JSON only"),
        ("result_expires = 1 / 0\n", "ZeroDivisionError"),
    ],
)
def test_a_bad_deployment_file_is_refused(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "site.py"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=needle):
        overrides(path)


@pytest.mark.slow  # a subprocess
def test_a_bad_setting_raises_in_a_host_and_is_one_line_exit_78_under_celery(tmp_path: Path) -> None:
    host = python("import mes_tasks", tmp_path, MES_LEASE_TTL_S="-1")
    assert host.returncode == 1 and "ConfigurationError: MES_LEASE_TTL_S" in host.stderr  # no exit
    cli = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "mes_tasks", "queue", "status"],
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO),
            "MES_CELERY_CONFIG": str(tmp_path / "none.py"),
        },
        capture_output=True,
        text=True,
    )
    assert cli.returncode == EXIT_CONFIG
    missing = f"MES_CELERY_CONFIG={tmp_path / 'none.py'}: no such file"
    assert cli.stderr.strip().splitlines() == [f"error [CONFIG_INVALID]: mes_tasks configuration: {missing}"]


@pytest.mark.slow  # a subprocess
def test_the_wheel_carries_the_runtime_package_only(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("mes_tasks-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"mes_tasks"}
