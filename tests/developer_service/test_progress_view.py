"""The deploy/rotate progress bars of `stip-developer ... --wait`, fed the statuses P1 reports."""

import pytest
import tqdm.std

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


def test_the_loading_bar_counts_the_tensor_bytes_p2_loaded_and_completes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])  # the bars' clock, moved by the polls below
    view = _ProgressView()
    view(status("pushing", 3 << 20, 3 << 20))
    now[0] += 0.5
    view(status("loading", 0, 4 << 20))  # the last byte is out; P1's count of θ′'s tensor bytes
    assert view.bar.format_dict["unit"] == "B" and view.bar.total == 4 << 20
    now[0] += 0.5
    view(status("loading", 1 << 20, 4 << 20))  # what P2 reports
    assert view.bar.n == 1 << 20
    now[0] += 1.5
    view(status("done", 3 << 20, 3 << 20, state="active"))  # P2 answered: loaded and tested
    assert view.bar is None
    err = capsys.readouterr().err
    assert "pushing: 100%" in err and "| 3.00M/3.00M [" in err
    # 4 MiB in the 2 s this bar lived: 2,097,152 B/s (tqdm writes rates in decimal prefixes), the
    # real average, not the jump between two polls over an instant
    assert "loading on P2: 100%" in err and "| 4.00M/4.00M [00:02<00:00, 2.10MB/s]" in err
