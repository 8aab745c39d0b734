"""--threads: parsing, and ``auto`` following the machine's load (simulated /proc readings)."""

from __future__ import annotations

import pytest
import torch

from reneg import threads as T


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    T._governor = None
    torch.set_num_threads(n)


def test_parse_threads():
    assert T.parse_threads("auto") == "auto" and T.parse_threads(None) == "auto" and T.parse_threads(" AUTO ") == "auto"
    assert T.parse_threads("3") == 3 and T.parse_threads(1) == 1
    for bad in ("0", "-2", "two", "1.5", "99999"):
        with pytest.raises(ValueError, match="--threads"):
            T.parse_threads(bad)


class FakeProc:
    """/proc/stat and /proc/self/stat as counters the test advances (100 ticks a second)."""

    def __init__(self):
        self.busy = self.own = 0
        self.clock = 1000.0

    def advance(self, seconds: float, others_cores: float, own_cores: float):
        self.clock += seconds
        self.busy += int(round((others_cores + own_cores) * seconds * 100))
        self.own += int(round(own_cores * seconds * 100))

    def ticks(self):
        return self.busy, self.own


def _fake(monkeypatch, cores=2):
    fake = FakeProc()
    monkeypatch.setattr(T, "_cpu_ticks", fake.ticks)
    monkeypatch.setattr(T.time, "monotonic", lambda: fake.clock)
    monkeypatch.setattr(T.time, "sleep", lambda s: fake.advance(s, 0.0, 0.0))
    monkeypatch.setattr(T.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(T.os, "sysconf", lambda name: 100)
    return fake


def test_auto_follows_the_load(monkeypatch):
    fake = _fake(monkeypatch, cores=2)
    assert T.apply_threads("auto") == 2  # an idle machine: both cores
    assert torch.get_num_threads() == 2

    def look(others, own, seconds=1.0):
        fake.advance(seconds, others_cores=others, own_cores=own)
        T.tick()
        return torch.get_num_threads()

    assert look(1.8, 0.2, seconds=0.5) == 2  # not a second yet: no look
    assert look(1.8, 0.2) == 2  # other work took the machine: one look is a blip...
    assert look(1.8, 0.2) == 1  # ...two in a row are a load: one thread
    assert look(0.9, 1.0) == 1  # one busy process beside us: still one
    assert look(0.1, 1.0) == 1  # the load went away...
    assert look(1.9, 0.1) == 1  # ...for one look only: nothing changes
    assert look(0.1, 1.0) == 1
    assert look(0.1, 1.0) == 2  # gone for two looks: both cores again
    assert "auto" in T.describe()
    T.release()
    assert look(1.9, 0.1) == 2 and look(1.9, 0.1) == 2  # after the command: no longer followed


def test_auto_cap_and_fixed_counts(monkeypatch):
    fake = _fake(monkeypatch, cores=16)
    assert T.apply_threads("auto", most=2) == 2  # the demo's cap
    assert T.apply_threads("auto") == T.MAX_AUTO
    assert T.apply_threads(3) == 3 and T._governor is None
    fake.advance(2.0, others_cores=15.0, own_cores=1.0)
    T.tick()  # a fixed count is never changed
    assert torch.get_num_threads() == 3


def test_auto_without_proc_keeps_torch_default(monkeypatch):
    monkeypatch.setattr(T, "_cpu_ticks", lambda: None)
    n = torch.get_num_threads()
    assert T.apply_threads("auto") == n and T._governor is None


def test_real_proc_readings_are_sane():
    ticks = T._cpu_ticks()
    if ticks is None:
        pytest.skip("no /proc here")
    busy, own = ticks
    assert busy >= 0 and 0 <= own


def test_cli_refuses_bad_threads(capsys):
    from reneg.cli import main

    for cmd in (["train"], ["tune"], ["eval"]):
        rc = main(cmd + ["--threads", "many"])
        assert rc == 2
        assert "--threads" in capsys.readouterr().err


def test_environment_replaces_auto(monkeypatch):
    monkeypatch.delenv(T.ENV, raising=False)
    assert T.default_spec() == "auto"
    monkeypatch.setenv(T.ENV, "3")
    assert T.default_spec() == 3
    monkeypatch.setenv(T.ENV, "auto")
    assert T.default_spec() == "auto"
    monkeypatch.setenv(T.ENV, "lots")
    with pytest.raises(ValueError, match=T.ENV):
        T.default_spec()


def test_cli_takes_the_environment_for_auto_and_a_number_over_it(monkeypatch, tmp_path):
    from reneg.cli import main

    seen = []
    monkeypatch.setattr(T, "apply_threads", lambda spec, most=None: seen.append(spec) or 1)
    monkeypatch.setenv(T.ENV, "3")
    missing = str(tmp_path / "missing")
    main(["eval", "--model", missing, "--out", str(tmp_path / "o")])  # fails on --model, after the threads
    main(["eval", "--threads", "2", "--model", missing, "--out", str(tmp_path / "o")])
    assert seen == [3, "2"]
