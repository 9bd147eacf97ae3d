"""The per-problem choice of conv2d_act's forward path (fastgan.ops.conv_choice)."""
import json

import pytest

from fastgan.ops import conv_choice


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.delenv("FASTGAN_CONV", raising=False)
    monkeypatch.delenv("FASTGAN_CONV_CACHE", raising=False)
    conv_choice.clear_choices()
    yield
    conv_choice.clear_choices()


def _timed(monkeypatch, times):
    """Make timing return ``times[name]`` for each candidate and record what was timed."""
    timed = []

    def fake_time_ms(run):
        name = run()
        timed.append(name)
        return times[name]

    monkeypatch.setattr(conv_choice, "_time_ms", fake_time_ms)
    return timed


def _candidates():
    return {name: (lambda name=name: name) for name in conv_choice.PATHS}


def test_times_once_per_problem_and_keeps_the_fastest(monkeypatch):
    timed = _timed(monkeypatch, {"triton": 2.0, "cudnn": 1.0})
    assert conv_choice.choose("k", _candidates(), timeable=True) == "cudnn"
    assert conv_choice.choose("k", _candidates(), timeable=True) == "cudnn"
    assert timed == ["triton", "cudnn"]
    choices = conv_choice._report_choices()["choices"]
    assert choices == {"k": {"path": "cudnn", "triton_ms": 2.0, "cudnn_ms": 1.0,
                             "source": "timed"}}


def test_not_timeable_runs_triton_without_timing(monkeypatch):
    timed = _timed(monkeypatch, {"triton": 2.0, "cudnn": 1.0})
    assert conv_choice.choose("k", _candidates(), timeable=False) == "triton"
    assert timed == []


@pytest.mark.parametrize("forced", ["triton", "cudnn"])
def test_forced_path_wins_over_cache_and_timing(forced, monkeypatch):
    timed = _timed(monkeypatch, {"triton": 2.0, "cudnn": 1.0})
    monkeypatch.setenv("FASTGAN_CONV", forced.upper())
    assert conv_choice.choose("k", _candidates(), timeable=True) == forced
    assert timed == []


def test_bad_forced_path(monkeypatch):
    monkeypatch.setenv("FASTGAN_CONV", "fastest")
    with pytest.raises(ValueError, match="FASTGAN_CONV must be"):
        conv_choice.choose("k", _candidates(), timeable=True)


def test_cache_file_is_read_and_extended(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"known": {"path": "cudnn"}, "junk": {"path": "nope"}}))
    monkeypatch.setenv("FASTGAN_CONV_CACHE", str(path))
    timed = _timed(monkeypatch, {"triton": 1.0, "cudnn": 3.0})
    assert conv_choice.choose("known", _candidates(), timeable=True) == "cudnn"
    assert conv_choice.choose("junk", _candidates(), timeable=True) == "triton"
    assert timed == ["triton", "cudnn"]  # only "junk" was timed
    saved = json.loads(path.read_text())
    assert saved["known"] == {"path": "cudnn"}
    assert saved["junk"] == {"path": "triton", "triton_ms": 1.0, "cudnn_ms": 3.0}


def test_cache_file_merges_atomically(tmp_path):
    path = tmp_path / "sub" / "choices.json"
    conv_choice.write_cache_file(str(path), "a", {"path": "triton"})
    conv_choice.write_cache_file(str(path), "b", {"path": "cudnn"})
    assert conv_choice.read_cache_file(str(path)) == {"a": {"path": "triton"},
                                                      "b": {"path": "cudnn"}}
    assert [p.name for p in path.parent.iterdir()] == ["choices.json"]  # no temp file left
    path.write_text("{not json")
    assert conv_choice.read_cache_file(str(path)) == {}
