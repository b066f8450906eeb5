"""The deploy/rotate progress bars of `stip-developer ... --wait`, fed the statuses P1 reports."""

import pytest

from developer_service.commands import _ProgressView
from shared.api import DeploymentStatus, Progress


def status(stage: str, done: int = 0, total: int = 0, state: str = "pending") -> DeploymentStatus:
    return DeploymentStatus.model_validate(
        {
            "deployment_id": "dep-1",
            "model_id": "m-1",
            "family": "llama",
            "cloud_url": "http://cloud.test",
            "status": state,
            "progress": Progress.model_validate({"stage": stage, "done": done, "total": total}),
        }
    )


def test_bars_show_real_units_start_where_the_job_is_and_complete(capsys: pytest.CaptureFixture[str]) -> None:
    view = _ProgressView()
    view(status("queued"))
    assert view.bar is None  # no bar for a stage without a count
    view(status("transforming", 3, 10))
    view(status("pushing", 6 << 20, 8 << 20))  # the poll missed the end of transforming, and the push's start
    assert view.bar.format_dict["initial"] == 6 << 20  # its rate counts from what this bar saw, not from 0
    view(status("done", 8 << 20, 8 << 20, state="active"))
    assert view.bar is None  # no bar for "done"
    view.close()
    err = capsys.readouterr().err
    assert "| 10/10 [" in err and "tensor/s]" in err  # transforming shown complete, in tensors
    assert "| 8.00M/8.00M [" in err and "B/s]" in err  # pushing complete, in bytes (binary prefixes)


def test_a_failed_job_leaves_its_bar_where_it_stopped(capsys: pytest.CaptureFixture[str]) -> None:
    view = _ProgressView()
    view(status("transforming", 4, 10))
    view(status("failed", 4, 10, state="failed"))
    view.close()
    err = capsys.readouterr().err
    assert "4/10" in err and "10/10" not in err
